"""mixed_depthwise_conv2d: every backend against the reference, forward and every gradient."""
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastseg
from fastseg.backend import unavailable_reason
from fastseg.layers import MixedDepthwiseConv2d
from fastseg.ops import mixed_depthwise_conv2d, mixed_depthwise_conv2d_reference

FUSED = ["cpu", "triton"]
# (N, C, H, W, splits, kernel sizes): odd sizes, uneven splits, kernels wider than the image.
SHAPES = [
    (2, 10, 13, 17, [4, 2, 2, 2], [3, 5, 7, 9]),
    (1, 7, 5, 3, [1, 2, 2, 2], [3, 5, 7, 9]),
    (2, 6, 11, 20, [3, 3], [1, 5]),
]


def needs(backend, device="cpu"):
    why = unavailable_reason(backend, device)
    return pytest.mark.skipif(why is not None, reason=str(why))


def make_inputs(N, C, H, W, splits, ks, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g, dtype=dtype)
    weights = [torch.randn(c, 1, k, k, generator=g, dtype=dtype) for c, k in zip(splits, ks)]
    biases = [torch.randn(c, generator=g, dtype=dtype) for c in splits] if bias else None
    return x, weights, biases


def grads(fn, x, weights, biases, residual, backend, layout=None):
    x = x.clone().requires_grad_()
    weights = [w.clone().requires_grad_() for w in weights]
    biases = [b.clone().requires_grad_() for b in biases] if biases is not None else None
    inp = layout(x) if layout is not None else x
    y = fn(inp, weights, biases, residual) if backend is None else \
        fn(inp, weights, biases, residual, backend=backend)
    g = torch.Generator().manual_seed(1)
    # Drawn in float64 and cast: the same values whatever the dtype and device of the call.
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device, y.dtype)
    leaves = [x, *weights, *(biases or [])]
    return y, torch.autograd.grad(y, leaves, gy)


def assert_close(actual, expected, rtol, name):
    scale = expected.abs().max().item()
    assert scale > 0, f"{name}: reference is all zeros, the comparison would prove nothing"
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol} × {scale:.3g}"


LAYOUTS = {
    "nchw": None,
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    # a strided view: every other column of a tensor twice as wide
    "strided": lambda t: torch.stack([t, torch.zeros_like(t)], dim=-1).flatten(-2)[..., ::2],
}


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_reference(backend, shape, residual, layout):
    if unavailable_reason(backend, "cpu"):
        pytest.skip(unavailable_reason(backend, "cpu"))
    x, weights, biases = make_inputs(*shape, bias=shape[1] != 7)
    y_ref, g_ref = grads(mixed_depthwise_conv2d_reference, x, weights, biases, residual, None,
                         LAYOUTS[layout])
    y, g = grads(mixed_depthwise_conv2d, x, weights, biases, residual, backend, LAYOUTS[layout])
    assert_close(y, y_ref, 1e-5, "output")
    names = ["x"] + [f"weights[{i}]" for i in range(len(weights))] + \
        [f"biases[{i}]" for i in range(len(biases or []))]
    for name, a, b in zip(names, g, g_ref):
        assert_close(a, b, 1e-5, "grad " + name)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert g[0].is_contiguous(memory_format=torch.channels_last)


# --- block and tile boundaries --------------------------------------------------------------
# Each kernel works in blocks; a shape must run past every one of them, with a partial last
# block, so that a kernel dropping a row, column or plane fails here. The cpu kernel computes a row
# in blocks of 256 bytes of columns (64 float32, 32 float64); the Triton kernels in tiles of
# launch_config's size (16 × 64 pixels at most) or the block sizes a test passes.

def reference_grads(x, weights, biases, residual, grad_y):
    leaves = [t.clone().requires_grad_() for t in [x, *weights, *biases]]
    y = mixed_depthwise_conv2d_reference(leaves[0], leaves[1:1 + len(weights)],
                                         leaves[1 + len(weights):], residual)
    return y.detach(), torch.autograd.grad(y, leaves, grad_y)


@pytest.mark.parametrize("dtype,width", [(torch.float32, 64 + 7), (torch.float64, 32 + 5)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpu_rows_wider_than_a_block(dtype, width, layout):
    if unavailable_reason("cpu", "cpu"):
        pytest.skip(unavailable_reason("cpu", "cpu"))
    x, weights, biases = make_inputs(2, 6, 5, 2 * width, [2, 2, 2], [3, 5, 9], dtype=dtype)
    x = x[..., ::2]  # width columns; the last block of each row is partial
    if LAYOUTS[layout]:
        x = LAYOUTS[layout](x)
    y_ref, g_ref = grads(mixed_depthwise_conv2d_reference, x, weights, biases, True, None)
    y, g = grads(mixed_depthwise_conv2d, x, weights, biases, True, "cpu")
    assert_close(y, y_ref, 1e-5 if dtype == torch.float32 else 1e-12, "output")
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert_close(a, b, 1e-5 if dtype == torch.float32 else 1e-12, f"grad {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("grad_layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("hw", [(6, 9), (3, 37)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_cpu_channels_last_blocks_of_channels(dtype, residual, grad_layout, hw):
    """Channels-last inputs are computed in blocks of 16 channels of a sample (kChannelBlock):
    37 channels are two whole blocks and a partial one, whose groups straddle the blocks; the
    output gradient arrives in either layout. float32 whole blocks move 16 pixels at a time
    (transposed in registers) with the rest one by one: 37 columns are two such runs and 5 left
    (the gather into planes, per row), 3 × 37 pixels six and 15 left (the write-back)."""
    if unavailable_reason("cpu", "cpu"):
        pytest.skip(unavailable_reason("cpu", "cpu"))
    x, weights, biases = make_inputs(2, 37, *hw, [10, 9, 9, 9], [3, 5, 7, 9], dtype=dtype)
    x = LAYOUTS["channels_last"](x)
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    if grad_layout == "channels_last":
        grad_y = LAYOUTS["channels_last"](grad_y)
    y_ref, g_ref = reference_grads(x, weights, biases, residual, grad_y)
    leaves = [t.clone().requires_grad_() for t in [x, *weights, *biases]]
    y = mixed_depthwise_conv2d(leaves[0], leaves[1:5], leaves[5:], residual, backend="cpu")
    g = torch.autograd.grad(y, leaves, grad_y)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert g[0].is_contiguous(memory_format=torch.channels_last)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_close(y, y_ref, tol, "output")
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert_close(a, b, tol, f"grad {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("blocks", [dict(block_h=4, block_w=8, num_warps=1), {}],
                         ids=["4x8-tiles", "launch_config"])
def test_triton_tiles_cover_every_pixel(dtype, layout, blocks):
    if unavailable_reason("triton", "cpu"):
        pytest.skip(unavailable_reason("triton", "cpu"))
    from fastseg.kernels import mixed_depthwise_conv as kernels

    # 4×8 tiles: 2 × 2 per 6 × 11 plane, partial in both directions. launch_config's 16 × 64
    # tiles: 2 × 2 per 18 × 66 plane.
    H, W = (6, 11) if blocks else (18, 66)
    x, weights, biases = make_inputs(2, 3, H, W, [1, 2], [3, 5], dtype=dtype)
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    y_ref, g_ref = reference_grads(x, weights, biases, True, grad_y)
    if LAYOUTS[layout]:
        x, grad_y = LAYOUTS[layout](x), LAYOUTS[layout](grad_y)
    y = kernels.forward(x, weights, torch.cat(biases), True, **blocks)
    grad_x, grad_w, grad_b = kernels.backward(grad_y, x, weights, True, **blocks)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_close(y, y_ref, rtol, "output")
    assert_close(grad_x, g_ref[0], rtol, "grad x")
    for g, (a, b) in enumerate(zip(grad_w, g_ref[1:3])):
        assert_close(a, b, rtol, f"grad weights[{g}]")
    assert_close(grad_b, torch.cat(g_ref[3:]), rtol, "grad bias")
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_triton_launch_config_bounds():
    """Tiles never exceed the plane, and warps follow the tile (the static GPU check's inputs)."""
    if unavailable_reason("triton", "cpu"):
        pytest.skip(unavailable_reason("triton", "cpu"))
    from fastseg.kernels.mixed_depthwise_conv import launch_config

    assert launch_config(256, 256, 3) == (16, 64, 4)
    assert launch_config(256, 256, 9) == (16, 64, 8)
    assert launch_config(5, 3, 3) == (8, 4, 1)
    with pytest.raises(ValueError, match="block_w must be a positive power of two"):
        from fastseg.kernels import mixed_depthwise_conv as kernels
        kernels.forward(*make_inputs(1, 2, 4, 4, [2], [3], bias=False)[:2], None, False, block_w=6)


@pytest.mark.parametrize("backend", FUSED)
def test_gradcheck_float64(backend):
    if unavailable_reason(backend, "cpu"):
        pytest.skip(unavailable_reason(backend, "cpu"))
    x, weights, biases = make_inputs(1, 5, 6, 7, [2, 3], [3, 5], dtype=torch.float64)
    leaves = [t.requires_grad_() for t in [x, *weights, *biases]]

    def fn(x, w0, w1, b0, b1):
        return mixed_depthwise_conv2d(x, [w0, w1], [b0, b1], residual=True, backend=backend)

    # The interpreter runs a Triton program in ~ms: the full Jacobian would take minutes, so the
    # triton case checks random directional derivatives (fast mode) instead.
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, fast_mode=backend == "triton")


def fused_op(backend):
    return {"cpu": torch.ops.fastseg.mixed_depthwise_conv2d.default,
            "triton": torch.ops.fastseg.mixed_depthwise_conv2d_triton.default}[backend]


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend):
    if unavailable_reason(backend, "cpu"):
        pytest.skip(unavailable_reason(backend, "cpu"))
    for layout in (None, LAYOUTS["channels_last"]):
        x, weights, biases = make_inputs(2, 7, 6, 5, [3, 4], [3, 5])
        x = (layout(x) if layout else x).requires_grad_()
        weights = [w.requires_grad_() for w in weights]
        torch.library.opcheck(fused_op(backend), (x, weights, torch.cat(biases), True))


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_compile_fullgraph(backend):
    if unavailable_reason(backend, "cpu"):
        pytest.skip(unavailable_reason(backend, "cpu"))
    torch._dynamo.reset()
    layer = MixedDepthwiseConv2d(8, kernel_sizes=(3, 5), backend=backend)
    x = torch.randn(2, 8, 9, 10, requires_grad=True)
    # Inductor for the C++ op (the full path users take); aot_eager elsewhere checks the same
    # capture (fake kernels, autograd, no graph break) without minutes of C++ code generation.
    compiled = torch.compile(layer, fullgraph=True,
                             backend="inductor" if backend == "cpu" else "aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    expected = mixed_depthwise_conv2d_reference(x, list(layer.weights), list(layer.biases))
    assert_close(y.detach(), expected.detach(), 1e-5, "compiled output")
    assert x.grad is not None and layer.weights[1].grad is not None


# --- the layer ---------------------------------------------------------------------------------

def test_layer_parameters_are_per_group_conv2d():
    layer = MixedDepthwiseConv2d(18, kernel_sizes=(3, 5, 7, 9))
    assert layer.splits == [6, 4, 4, 4]  # equal, remainder to the first group (timm)
    convs = [torch.nn.Conv2d(c, c, k, padding=k // 2, groups=c) for c, k in zip(layer.splits, (3, 5, 7, 9))]
    for g, conv in enumerate(convs):  # both ways: conv → layer, then outputs agree
        layer.weights[g].data.copy_(conv.weight)
        layer.biases[g].data.copy_(conv.bias)
        assert layer.weights[g].shape == conv.weight.shape and layer.biases[g].shape == conv.bias.shape
    x = torch.randn(2, 18, 12, 12)
    expected = torch.cat([conv(xg) for conv, xg in zip(convs, torch.split(x, layer.splits, 1))], 1)
    for backend in fastseg.available_backends("cpu"):
        layer.backend = backend
        assert_close(layer(x).detach(), expected.detach(), 1e-5, f"layer output ({backend})")


def test_layer_default_init_matches_conv2d_bounds():
    torch.manual_seed(0)
    layer = MixedDepthwiseConv2d(64, kernel_sizes=(3, 9))
    for g, k in enumerate((3, 9)):
        bound = 1.0 / k  # kaiming_uniform(a=√5) and the bias bound are both 1/√fan_in, fan_in = k²
        assert layer.weights[g].abs().max() <= bound
        assert layer.weights[g].abs().max() > 0.9 * bound
        assert layer.biases[g].abs().max() <= bound


def test_state_dicts_identical_across_backends():
    a = MixedDepthwiseConv2d(8, backend="reference")
    b = MixedDepthwiseConv2d(8, backend="cpu")
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())


# --- bad inputs --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference"] + FUSED)
@pytest.mark.parametrize("case,match", [
    (lambda x, w, b: (x[0], w, b), "x must have shape"),
    (lambda x, w, b: (x[:0], w, b), "x must be non-empty"),
    (lambda x, w, b: (x, [w[0][:, :, :2, :2], w[1]], b), r"weights\[0\] must have shape"),
    (lambda x, w, b: (x, [w[0]], None), "weights cover 3 channels"),
    (lambda x, w, b: (x, [w[0].double(), w[1]], b), r"weights\[0\] has dtype"),
    (lambda x, w, b: (x, w, b[:1]), "biases has 1 entries"),
    (lambda x, w, b: (x, w, [b[0], b[1][:1]]), r"biases\[1\] must have shape"),
    (lambda x, w, b: (x.to(torch.int64), w, b), "x must be a floating-point"),
    (lambda x, w, b: (x.masked_fill(x > 1, float("nan")), w, b), "x contains NaN"),
    (lambda x, w, b: (x, [w[0], w[1].masked_fill(w[1] > 1, float("inf"))], b), r"weights\[1\] contains"),
    (lambda x, w, b: (x, w[0], b), "weights must be a sequence"),
])
def test_bad_inputs_raise_clear_errors(backend, case, match):
    x, weights, biases = make_inputs(1, 7, 6, 6, [3, 4], [3, 5])
    args = case(x, weights, biases)
    with pytest.raises((ValueError, TypeError), match=match):
        mixed_depthwise_conv2d(*args, backend=backend)


# --- backend selection ------------------------------------------------------------------------

def test_backend_precedence(monkeypatch):
    calls = []
    import fastseg.ops.mixed_depthwise_conv as mod

    real = mod.resolve_backend
    monkeypatch.setattr(mod, "resolve_backend", lambda *a: calls.append(real(*a)) or calls[-1])
    x, w, b = make_inputs(1, 7, 5, 5, [3, 4], [3, 5])
    monkeypatch.setenv("FASTSEG_BACKEND", "reference")
    mixed_depthwise_conv2d(x, w, b)
    with fastseg.use_backend("cpu" if "cpu" in fastseg.available_backends("cpu") else "reference"):
        mixed_depthwise_conv2d(x, w, b)
        mixed_depthwise_conv2d(x, w, b, backend="reference")
    mixed_depthwise_conv2d(x, w, b)
    auto = "cpu" if "cpu" in fastseg.available_backends("cpu") else "reference"
    assert calls == ["reference", auto, "reference", "reference"]
    with pytest.raises(ValueError, match="FASTSEG_BACKEND"):
        monkeypatch.setenv("FASTSEG_BACKEND", "fast")
        mixed_depthwise_conv2d(x, w, b)
    with pytest.raises(ValueError, match="backend must be one of"):
        mixed_depthwise_conv2d(x, w, b, backend="gpu")


def test_global_setter_and_unavailable_backend_warns_once():
    x, w, b = make_inputs(1, 7, 5, 5, [3, 4], [3, 5])
    fastseg.use_backend("cuda")  # no CUDA tensors here: falls back to auto, with one warning
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y1 = mixed_depthwise_conv2d(x, w, b)
            y2 = mixed_depthwise_conv2d(x, w, b)
    finally:
        fastseg.use_backend(None)
    messages = [str(c.message) for c in caught if "unavailable" in str(c.message)]
    assert len(messages) == 1 and "'cuda'" in messages[0] and "CUDA tensors" in messages[0]
    torch.testing.assert_close(y1, y2)


def test_half_precision_on_cpu_runs_on_the_reference():
    x, w, b = make_inputs(1, 7, 6, 6, [3, 4], [3, 5])
    to = lambda ts: [t.bfloat16() for t in ts]  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y_auto = mixed_depthwise_conv2d(x.bfloat16(), to(w), to(b))  # auto: no warning
        y_cpu = mixed_depthwise_conv2d(x.bfloat16(), to(w), to(b), backend="cpu")
    assert y_auto.dtype == torch.bfloat16
    torch.testing.assert_close(y_auto, mixed_depthwise_conv2d_reference(x.bfloat16(), to(w), to(b)))
    torch.testing.assert_close(y_cpu, y_auto)
    if "cpu" in fastseg.available_backends("cpu"):
        assert [str(c.message) for c in caught if "float32 and float64" in str(c.message)]


def test_available_backends_on_cpu():
    names = fastseg.available_backends("cpu")
    assert names[0] == "reference" and "cuda" not in names
    assert ("triton" in names) == (os.environ.get("TRITON_INTERPRET") == "1")


# --- CUDA (runs only where a GPU is present) -------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float16, 1e-2),
                                        (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_matches_reference(backend, dtype, rtol, layout, residual):
    # Past the CUDA kernels' 32- and 64-row tiles and 64-column tiles, and past launch_config's
    # Triton tiles, with partial last tiles.
    x, weights, biases = make_inputs(2, 10, 70, 131, [4, 2, 2, 2], [3, 5, 7, 9])
    to = lambda t: t.cuda().to(dtype)  # noqa: E731
    y_ref, g_ref = grads(mixed_depthwise_conv2d_reference, x.cuda().double(),
                         [w.cuda().double() for w in weights], [b.cuda().double() for b in biases],
                         residual, None)
    cl = (lambda t: t.contiguous(memory_format=torch.channels_last)) if layout == "channels_last" \
        else None
    y, g = grads(mixed_depthwise_conv2d, to(x), [to(w) for w in weights], [to(b) for b in biases],
                 residual, backend, cl)
    assert_close(y.double(), y_ref, rtol, "output")
    for a, b_ in zip(g, g_ref):
        assert_close(a.double(), b_, rtol, "grad")


def test_cuda_kernels_registered_when_built_with_cuda():
    """CI builds with FASTSEG_CUDA=1: the CUDA sources must have compiled, linked and registered."""
    if os.environ.get("FASTSEG_CUDA") != "1":
        pytest.skip("FASTSEG_CUDA=1 not set: the CUDA build is not required in this run")
    assert fastseg.backend.extension() is not None, "fastseg._C failed to import"
    for op in ("fastseg::mixed_depthwise_conv2d", "fastseg::mixed_depthwise_conv2d_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


def test_runs_on_the_reference_without_the_extension():
    """Without fastseg._C (no compiler at install time) the package imports, says why, and runs."""
    import subprocess
    import sys

    code = (
        "import sys, warnings, torch\n"
        "sys.modules['fastseg._C'] = None\n"  # what an install without the extension sees
        "import fastseg\n"
        "from fastseg.layers import MixedDepthwiseConv2d\n"
        "assert 'cpu' not in fastseg.available_backends('cpu'), fastseg.available_backends('cpu')\n"
        "layer = MixedDepthwiseConv2d(8, backend='cpu')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    layer(torch.randn(2, 8, 9, 9)).sum().backward()\n"
        "assert any('not built' in str(c.message) for c in caught), [str(c.message) for c in caught]\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
