"""attention gates: every backend against the reference, forward and every gradient."""
import os

import pytest
import torch
import torch.nn.functional as F

from fastseg.backend import unavailable_reason
from fastseg.ops import attention_gates as ag

FUSED = ["cpu", "triton"]


def randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g, dtype=dtype)


# Each case: (public op, reference, builder(dtype, generator) -> positional arguments).
def spatial(N, C, H, W):
    return ag.spatial_gate, ag.spatial_gate_reference, lambda dt, g: [
        randn(g, N, C, H, W, dtype=dt), randn(g, 1, C, dtype=dt), randn(g, 1, dtype=dt)]


def gated(N, C_in, C_out, H, W):
    return ag.gated_pointwise, ag.gated_pointwise_reference, lambda dt, g: [
        randn(g, N, C_in, H, W, dtype=dt), randn(g, 1, C_in, dtype=dt), randn(g, 1, dtype=dt),
        randn(g, C_out, C_in, dtype=dt) * 0.3, randn(g, C_out, C_in, dtype=dt) * 0.3,
        randn(g, C_out, dtype=dt)]


def channel(N, C, C_r, h, w, skip, upsample):
    H, W = (2 * h, 2 * w) if upsample else (h, w)
    return ag.channel_gate, ag.channel_gate_reference, lambda dt, g: [
        # Positive means and a non-negative first row of W1: a hidden unit is active, so the
        # gradient of W1 is not zero.
        randn(g, N, C, h, w, dtype=dt) + 1.5,
        torch.cat([randn(g, 1, C, dtype=dt).abs(), randn(g, C_r - 1, C, dtype=dt)]),
        randn(g, C, C_r, dtype=dt),
        randn(g, N, C, H, W, dtype=dt) if skip else None, upsample]


def cross(N, C, H, W, h, w, align):
    return ag.cross_gate, ag.cross_gate_reference, lambda dt, g: [
        randn(g, N, C, H, W, dtype=dt), randn(g, N, C, h, w, dtype=dt), align]


def attention(N, C_x, C_g, C_i, H, W):
    return ag.attention_gate, ag.attention_gate_reference, lambda dt, g: [
        randn(g, N, C_x, H, W, dtype=dt), randn(g, N, C_g, H, W, dtype=dt),
        randn(g, C_i, C_x, dtype=dt) * 0.5, randn(g, C_i, C_g, dtype=dt) * 0.5,
        randn(g, C_i, dtype=dt) * 0.5, randn(g, 1, C_i, dtype=dt), randn(g, 1, dtype=dt)]


# Batch 1, 1×1 planes, odd sizes; upsample of odd input sizes; resizes up, down, to and from 1×1.
CASES = {
    "spatial-2x5x7x9": spatial(2, 5, 7, 9),
    "spatial-1x3x1x1": spatial(1, 3, 1, 1),
    "gated-2x6to3x5x7": gated(2, 6, 3, 5, 7),
    "gated-1x4to1x1x1": gated(1, 4, 1, 1, 1),
    "channel-2x3x5x7-skip-up": channel(2, 3, 2, 5, 7, True, True),
    "channel-1x4x1x1-up": channel(1, 4, 1, 1, 1, False, True),
    "channel-2x5x3x6-skip": channel(2, 5, 3, 3, 6, True, False),
    # ×2 upsample: rows that do not double (3 < 4 rows: the taps row by row), and rows that do
    # with several interior rows (9: the four-row sums of the plane adjoint) and a plane wider
    # than tall
    "channel-1x2x3x9-skip-up": channel(1, 2, 1, 3, 9, True, True),
    "channel-2x3x9x4-up": channel(2, 3, 2, 9, 4, False, True),
    "cross-2x3x7x9-from-4x5-ac": cross(2, 3, 7, 9, 4, 5, True),
    "cross-1x2x5x4-from-11x9": cross(1, 2, 5, 4, 11, 9, False),
    "cross-2x2x6x5-same": cross(2, 2, 6, 5, 6, 5, True),
    "cross-1x2x1x1-from-3x2-ac": cross(1, 2, 1, 1, 3, 2, True),
    "cross-1x2x4x3-from-1x1": cross(1, 2, 4, 3, 1, 1, False),
    "attention-2x5+3x4x7x6": attention(2, 5, 3, 4, 7, 6),
    "attention-1x2+2x3x1x1": attention(1, 2, 2, 3, 1, 1),
}

LAYOUTS = {
    "nchw": None,
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    # a strided view: every other column of a tensor twice as wide
    "strided": lambda t: torch.stack([t, torch.zeros_like(t)], dim=-1).flatten(-2)[..., ::2],
}


def skip_unless(backend):
    why = unavailable_reason(backend, "cpu")
    if why:
        pytest.skip(why)


def run(fn, args, backend=None, layout=None, grad_y=None):
    """Output and the gradients of every tensor argument, for ``grad_y`` (seeded random)."""
    leaves = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    inputs = [layout(a) if layout and isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in leaves]
    y = fn(*inputs) if backend is None else fn(*inputs, backend=backend)
    if grad_y is None:
        grad_y = randn(torch.Generator().manual_seed(1), *y.shape, dtype=y.dtype).to(y.device)
    tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
    return y, torch.autograd.grad(y, tensors, grad_y), grad_y


def assert_close(actual, expected, rtol, name):
    scale = expected.abs().max().item()
    assert scale > 0, f"{name}: reference is all zeros, the comparison would prove nothing"
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol} × {scale:.3g}"


def check_against_reference(case, args, backend, layout=None, rtol=1e-5):
    op, ref, _ = case
    y_ref, g_ref, grad_y = run(ref, args)
    y, g, _ = run(op, args, backend, layout, grad_y)
    assert_close(y, y_ref, rtol, "output")
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert_close(a, b, rtol, f"grad of tensor argument {i}")
    return y, g


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_reference(backend, name, layout):
    skip_unless(backend)
    case = CASES[name]
    args = case[2](torch.float32, torch.Generator().manual_seed(0))
    y, g = check_against_reference(case, args, backend, LAYOUTS[layout])
    if layout == "channels_last" and args[0].shape[2] * args[0].shape[3] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert g[0].is_contiguous(memory_format=torch.channels_last)


# --- block and tile boundaries --------------------------------------------------------------
# The cpu kernels of spatial_gate, and the gating passes around the GEMM of gated_pointwise and
# attention_gate (≥ 8 channels on both sides of the 1×1 product), work on blocks of pixels of
# about 512 KB over all channels (csrc/cpu/attention_gates.cpp, pixel_block), at least 256 pixels
# (attention_gate's GEMM path at least 1024, gemm_block):
# with ~1000 channels a block is 256 pixels in both dtypes. With fewer channels, the 1×1 products
# run on blocks of 128 bytes (32 float32 / 16 float64) in tasks of 1024 pixels. The Triton kernels work on
# BLOCK_C × BLOCK_P slices (32 × 128 at most) and BLOCK_H × BLOCK_W tiles (16 × 64 at most), or
# the sizes a test passes. Each shape below spans several blocks with a partial last one.
CPU_BLOCKS = {
    "spatial": lambda dt: spatial(2, 1024, 17, 19),                                # 323 px
    "gated-blocks": lambda dt: gated(2, 5, 6, 30, 31),                             # 930 px
    "channel": lambda dt: channel(2, 3, 2, 5, 37, True, True),                     # 74-wide rows
    "cross": lambda dt: cross(2, 2, 9, 70, 5, 33, True),
    # cross_gate's bands of output rows (4096 values: cross_band_rows), several per plane with a
    # partial last one, for each side the horizontal resize and its adjoint can run on: rows and
    # columns upsampled (3 bands), rows down and columns up (2), rows up and columns down (2).
    "cross-bands-up": lambda dt: cross(1, 2, 70, 130, 33, 65, True),
    "cross-bands-rows-down": lambda dt: cross(1, 2, 300, 20, 450, 9, False),
    "cross-bands-cols-down": lambda dt: cross(1, 2, 300, 20, 100, 45, True),
    # rows of at most two vectors resized by permutes (PermuteTaps: 16 float32 / 8 float64 lanes
    # with AVX-512), with a partly filled second vector on both sides: float32 19 → 27 columns,
    # float64 11 → 13 (float32's 27 → 19 and 11 → 13 in one vector, float64's 19, 27 by gathers)
    "cross-permute-rows": lambda dt: cross(2, 3, 7, 27, 5, 19, True),
    "cross-permute-rows-short": lambda dt: cross(2, 3, 6, 13, 9, 11, False),
    "attention-blocks": lambda dt: attention(1, 3, 2, 20, 23, 29),                 # 667 px
    # ≥ 8 channels on both sides of the 1×1 product: the GEMM path.
    "gated-gemm": lambda dt: gated(2, 40, 16, 9, 13),
    "attention-gemm": lambda dt: attention(1, 33, 34, 32, 7, 9),
    "gated-gemm-blocks": lambda dt: gated(2, 8, 700, 17, 19),                      # 323 px
    # gated_pointwise's products (csrc/cpu/pointwise.h) on blocks of whole tiles of 48 float32 /
    # 24 float64 pixels whose panel fits 64 KB: one tile per block at 300 channels; 2 blocks of 8
    # output channels + 7 single ones
    "gated-gemm-panels": lambda dt: gated(2, 300, 11, 13, 17),                     # 221 px
    # attention_gate's GEMM path: tasks of ≥ 1024 pixels (≈ 512 KB of a block's rows; float32
    # 2688 pixels with 8 channels everywhere), each sample split with a partial last block.
    "attention-gemm-blocks": lambda dt: attention(2, 64, 40, 32, 37, 41),         # 1517 px
    "attention-gemm-wide-blocks": lambda dt: attention(2, 8, 8, 8, 53, 61),        # 3233 px
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("name", list(CPU_BLOCKS))
def test_cpu_blocks_cover_every_pixel(dtype, layout, name):
    skip_unless("cpu")
    case = CPU_BLOCKS[name](dtype)
    args = case[2](dtype, torch.Generator().manual_seed(2))
    # float32: the bias gradients sum ~2000 terms that largely cancel, so 5e-5 of their result.
    check_against_reference(case, args, "cpu", LAYOUTS[layout],
                            rtol=5e-5 if dtype == torch.float32 else 1e-12)


def test_cpu_sigmoid_over_the_whole_float_range():
    """The cpu kernels' float32 sigmoid (a polynomial e^x, csrc/common/attention_gates.h) against
    torch.sigmoid from -100 to 100, through the ends where e^x leaves the normal floats and
    overflows; value and gradient of a same-size cross_gate, y = a·σ(b)."""
    skip_unless("cpu")
    b = torch.linspace(-100, 100, 2 * 100_003).view(2, 1, 100_003, 1)
    b = torch.cat([b, torch.tensor([-88.8, -88.6, -88.4, -87.1, -86.9, 86.9, 87.1, 88.4, 88.8]
                                   ).view(1, 1, 9, 1).expand(2, 1, 9, 1)], 2)
    a = torch.ones_like(b)
    y, (grad_a, grad_b), _ = run(ag.cross_gate, [a, b, True], "cpu", grad_y=torch.ones_like(b))
    expected = torch.sigmoid(b.double())
    # relative to the value down to 1e-30, absolutely (1e-37) below that
    error = (y.double() - expected).abs() / expected.clamp_min(1e-30)
    assert error.max().item() < 3e-7
    torch.testing.assert_close(grad_a, y)
    # σ' = σ·(1 - σ) in float32, as ATen's sigmoid_backward computes it: 1 - σ is 0 from b ≈ 17 on,
    # so compared absolutely, within a few units in the last place of σ near 1.
    s = torch.sigmoid(b)
    assert (grad_b - s * (1 - s)).abs().max().item() < 2e-7


TRITON_BLOCKS = [
    # (case, small blocks): small slices/tiles, then launch_config's own at a shape crossing them.
    ("spatial", spatial(1, 37, 3, 45), dict(block_c=4, block_p=16, num_warps=1)),   # 135 px
    ("spatial", spatial(1, 37, 3, 45), {}),
    ("gated", gated(1, 3, 37, 3, 45), dict(block_c=8, block_p=32, num_warps=1)),
    ("gated", gated(1, 3, 37, 3, 45), {}),
    ("channel", channel(1, 1, 2, 5, 9, True, True), dict(block_h=4, block_w=8, num_warps=1)),
    ("channel", channel(1, 1, 2, 17, 65, True, False), {}),
    ("cross", cross(1, 2, 7, 11, 4, 6, True), dict(block_h=4, block_w=8, num_warps=1)),
    ("cross", cross(1, 1, 18, 66, 9, 33, False), {}),
    ("attention", attention(1, 37, 2, 35, 3, 45), dict(block_c=8, block_p=32, num_warps=1)),
    ("attention", attention(1, 37, 2, 3, 3, 45), {}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("index", range(len(TRITON_BLOCKS)),
                         ids=[f"{n}-{'small' if b else 'default'}" for n, _, b in TRITON_BLOCKS])
def test_triton_tiles_cover_every_pixel(dtype, layout, index):
    skip_unless("triton")
    from fastseg.kernels import attention_gates as kernels

    name, case, blocks = TRITON_BLOCKS[index]
    op_name = {"spatial": "spatial_gate", "gated": "gated_pointwise", "channel": "channel_gate",
               "cross": "cross_gate", "attention": "attention_gate"}[name]
    args = case[2](dtype, torch.Generator().manual_seed(3))
    y_ref, g_ref, grad_y = run(case[1], args)
    inputs = [LAYOUTS[layout](a) if isinstance(a, torch.Tensor) and a.dim() == 4 and LAYOUTS[layout]
              else a for a in args]
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    forward = getattr(kernels, op_name + "_forward")
    backward = getattr(kernels, op_name + "_backward")
    assert_close(forward(*inputs, **blocks), y_ref, rtol, "output")
    if name == "channel":  # the backward takes no skip
        grads = backward(grad_y, inputs[0], inputs[1], inputs[2], inputs[4], **blocks)
        g_ref = g_ref[:3]
    elif name == "gated":  # nor the bias
        grads = backward(grad_y, *inputs[:5], **blocks)
    else:
        tensors = [a for a in inputs if isinstance(a, torch.Tensor)]
        flags = [a for a in inputs if not isinstance(a, torch.Tensor)]
        grads = backward(grad_y, *tensors, *flags, **blocks)
    for i, (a, b) in enumerate(zip(grads, g_ref)):
        assert_close(a, b, rtol, f"grad {i}")


def test_triton_launch_configs():
    """Slices and tiles never exceed the data, and warps follow them (gpu-report's inputs)."""
    skip_unless("triton")
    from fastseg.kernels import attention_gates as kernels

    assert kernels.pixel_config(256, 64 * 64) == (32, 128, 4)
    assert kernels.pixel_config(4, 1) == (4, 1, 1)
    assert kernels.plane_config(256, 256) == (16, 64, 4)
    assert kernels.plane_config(5, 3) == (8, 4, 1)
    x, w, b = spatial(1, 2, 4, 4)[2](torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="num_warps must be a positive power of two"):
        kernels.spatial_gate_forward(x, w, b, num_warps=3)


def small(args):
    """One sample of 3 × 4 pixels (other feature maps cut in proportion: an upsampled skip to
    6 × 8), which keeps Jacobians small and the Triton interpreter quick."""
    H, W = args[0].shape[2:]
    return [a[:1, :, :3 * a.shape[2] // H, :4 * a.shape[3] // W].contiguous()
            if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", ["spatial-2x5x7x9", "gated-2x6to3x5x7", "channel-2x3x5x7-skip-up",
                                  "cross-2x3x7x9-from-4x5-ac", "attention-2x5+3x4x7x6"])
def test_gradcheck_float64(backend, name):
    skip_unless(backend)
    op, _, make = CASES[name]
    args = small(make(torch.float64, torch.Generator().manual_seed(4)))
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    leaves = [args[i].requires_grad_() for i in positions]

    def fn(*tensors):
        full = list(args)
        for i, t in zip(positions, tensors):
            full[i] = t
        return op(*full, backend=backend)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, fast_mode=backend == "triton")


def fused_ops(backend, name):
    suffix = "_triton" if backend == "triton" else ""
    return getattr(torch.ops.fastseg, name + suffix).default


OPCHECK = {"spatial_gate": "spatial-2x5x7x9", "gated_pointwise": "gated-2x6to3x5x7",
           "channel_gate": "channel-2x3x5x7-skip-up", "cross_gate": "cross-2x3x7x9-from-4x5-ac",
           "attention_gate": "attention-2x5+3x4x7x6"}


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("op_name", list(OPCHECK))
def test_opcheck(backend, op_name):
    skip_unless(backend)
    args = small(CASES[OPCHECK[op_name]][2](torch.float32, torch.Generator().manual_seed(5)))
    for layout in (None, LAYOUTS["channels_last"]):
        inputs = [(layout(a) if layout and a.dim() == 4 else a).requires_grad_()
                  if isinstance(a, torch.Tensor) else a for a in args]
        torch.library.opcheck(fused_ops(backend, op_name), tuple(inputs))


def chain(x, g, params, backend):
    """All five gates in one graph, as a decoder stage would use them."""
    w, b, w_s, b_s, w_a, w_b, bias, w1, w2, w_x, w_g, b_i, psi_w, psi_b = params
    s = ag.spatial_gate(x, w, b, backend=backend)
    h = ag.gated_pointwise(s, w_s, b_s, w_a, w_b, bias, backend=backend)
    u = ag.channel_gate(h, w1, w2, skip=None, upsample=True, backend=backend)
    c = ag.cross_gate(u, g, backend=backend)
    return ag.attention_gate(c, F.interpolate(g, size=c.shape[-2:]), w_x, w_g, b_i, psi_w, psi_b,
                             backend=backend)


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_compile_fullgraph(backend):
    skip_unless(backend)
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(6)
    x, g = randn(gen, 2, 4, 5, 6), randn(gen, 2, 3, 4, 5)
    params = [randn(gen, *s) * 0.5 for s in [(1, 4), (1,), (1, 4), (1,), (3, 4), (3, 4), (3,),
                                             (2, 3), (3, 2), (5, 3), (5, 3), (5,), (1, 5), (1,)]]
    params = [p.requires_grad_() for p in params]
    x.requires_grad_()
    # Inductor for the C++ ops (the full path users take); aot_eager elsewhere checks the same
    # capture (fakes, autograd, no graph break) without minutes of code generation.
    compiled = torch.compile(chain, fullgraph=True,
                             backend="inductor" if backend == "cpu" else "aot_eager")
    y = compiled(x, g, params, backend)
    y.square().sum().backward()
    expected = chain(x, g, params, "reference")
    assert_close(y.detach(), expected.detach(), 1e-5, "compiled output")
    assert x.grad is not None and all(p.grad is not None for p in params)


# --- CUDA (runs only where a GPU is present) -------------------------------------------------

# Past the CUDA kernels' 256-thread blocks and launch_config's Triton slices and tiles.
GPU_CASES = ["spatial", "gated", "channel", "cross-up", "cross-down", "attention"]


def _gpu_case(name):
    return {"spatial": spatial(2, 37, 19, 23), "gated": gated(2, 40, 35, 19, 23),
            "channel": channel(2, 16, 2, 19, 37, True, True),
            "cross-up": cross(2, 3, 37, 70, 9, 17, True),
            "cross-down": cross(2, 3, 9, 17, 37, 70, False),
            "attention": attention(2, 37, 20, 35, 19, 23)}[name]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.float16, 1e-2),
                                        (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("name", GPU_CASES)
def test_gpu_matches_reference(backend, dtype, rtol, name):
    """Output and gradients against the float64 reference on the same (rounded) inputs: within
    rtol of the largest value, or within twice the error of the reference itself run in dtype.
    The attention gate's ReLU makes its gradients jump where rounding moves a pre-activation
    across zero: in bfloat16, PyTorch's own result is that far off, the inputs being exact."""
    op, ref, make = _gpu_case(name)
    args = make(torch.float64, torch.Generator().manual_seed(9))
    on_gpu = [a.cuda().to(dtype) if isinstance(a, torch.Tensor) else a for a in args]
    grad_y = randn(torch.Generator().manual_seed(1), *ref(*args).shape,
                   dtype=torch.float64).cuda().to(dtype)
    y_ref, g_ref, _ = run(ref, [a.double() if isinstance(a, torch.Tensor) else a for a in on_gpu],
                          grad_y=grad_y.double())
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # no TF32 in float32
        y_eager, g_eager, _ = run(ref, on_gpu, grad_y=grad_y)
    y, g, _ = run(op, on_gpu, backend, grad_y=grad_y)
    for label, a, b, eager in [("output", y, y_ref, y_eager),
                               *[(f"grad {i}", *t) for i, t in enumerate(zip(g, g_ref, g_eager))]]:
        eager_err = (eager.double() - b).abs().max().item()
        assert_close(a.double(), b, max(rtol, 2 * eager_err / b.abs().max().item()), label)


def test_cuda_kernels_registered_when_built_with_cuda():
    """CI builds with FASTSEG_CUDA=1: the CUDA sources must have compiled, linked and registered."""
    if os.environ.get("FASTSEG_CUDA") != "1":
        pytest.skip("FASTSEG_CUDA=1 not set: the CUDA build is not required in this run")
    for name in ag.SCHEMAS:
        for op in (f"fastseg::{name}", f"fastseg::{name}_backward"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


def test_layers_run_on_the_reference_without_the_extension():
    """Without fastseg._C the gates import and their layers train on the reference backend."""
    import subprocess
    import sys

    code = (
        "import sys, warnings, torch\n"
        "sys.modules['fastseg._C'] = None\n"
        "from fastseg.layers import SqueezeExcite\n"
        "layer = SqueezeExcite(16, upsample=True, backend='cpu')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    layer(torch.randn(2, 16, 5, 5), torch.randn(2, 16, 10, 10)).sum().backward()\n"
        "assert any('not built' in str(c.message) for c in caught), [str(c.message) for c in caught]\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# --- bad inputs --------------------------------------------------------------------------------

def _spatial_args():
    return spatial(2, 3, 4, 5)[2](torch.float32, torch.Generator().manual_seed(0))


def _nan(t):
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


BAD = [
    (ag.spatial_gate, lambda a: (a[0][0], a[1], a[2]), "x must have shape"),
    (ag.spatial_gate, lambda a: (a[0][:0], a[1], a[2]), "x must be non-empty"),
    (ag.spatial_gate, lambda a: (a[0], a[1][:, :2], a[2]), r"w must have shape \[1, 3\]"),
    (ag.spatial_gate, lambda a: (a[0], a[1].double(), a[2]), "w has dtype"),
    (ag.spatial_gate, lambda a: (_nan(a[0]), a[1], a[2]), "x contains NaN or inf"),
    (ag.spatial_gate, lambda a: (a[0], a[1], a[2] * float("inf")), "b contains NaN or inf"),
    (ag.gated_pointwise, lambda a: (a[0], a[1], a[2], a[1][:, :2], a[1], a[2]), r"w_a must have shape"),
    (ag.gated_pointwise, lambda a: (a[0], a[1], a[2], a[1], a[1][:, :2], a[2]), r"w_b must have shape"),
    (ag.gated_pointwise, lambda a: (a[0], a[1], a[2], a[1], a[1], a[1]), r"bias must have shape \[1\]"),
    (ag.gated_pointwise, lambda a: (_nan(a[0]), a[1], a[2], a[1], a[1], a[2]), "a contains NaN"),
    (ag.channel_gate, lambda a: (a[0], a[1].t(), a[1]), r"w1 must have shape \[C_r, 3\]"),
    (ag.channel_gate, lambda a: (a[0], a[1], a[1]), r"w2 must have shape \[3, 1\]"),
    (ag.channel_gate, lambda a: (a[0], a[1], a[1].t(), a[0], True), "skip must have shape"),
    (ag.channel_gate, lambda a: (a[0], a[1], a[1].t(), _nan(a[0])), "skip contains NaN"),
    (ag.channel_gate, lambda a: (_nan(a[0]), a[1], a[1].t()), "x contains NaN"),
    (ag.cross_gate, lambda a: (a[0], a[0][:, :2]), "b must have a's batch and channels"),
    (ag.cross_gate, lambda a: (a[0], a[0].double()), "b has dtype"),
    (ag.cross_gate, lambda a: (a[0], _nan(a[0])), "b contains NaN"),
    (ag.cross_gate, lambda a: (_nan(a[0]), a[0]), "a contains NaN"),
    (ag.cross_gate, lambda a: (a[0], a[0][..., :0]), "b must be non-empty"),
    (ag.attention_gate, lambda a: (a[0], a[0][..., :3], a[1], a[1], a[2], a[1], a[2]),
     "g must have x's batch and H, W"),
    (ag.attention_gate, lambda a: (a[0], a[0], a[1], a[1][:, :2], a[2], a[1], a[2]),
     r"w_g must have shape \[1, 3\]"),
    (ag.attention_gate, lambda a: (a[0], a[0], a[1], a[1], a[1], a[1], a[2]), r"b must have shape \[1\]"),
    (ag.attention_gate, lambda a: (a[0], a[0], a[1], a[1], a[2], a[1][:, :2], a[2]),
     r"psi_w must have shape \[1, 1\]"),
    (ag.attention_gate, lambda a: (a[0], _nan(a[0]), a[1], a[1], a[2], a[2][None], a[2]),
     "g contains NaN"),
]


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
@pytest.mark.parametrize("index", range(len(BAD)), ids=[m for _, _, m in BAD])
def test_bad_inputs_name_the_argument(backend, index):
    skip_unless(backend)
    op, make, match = BAD[index]
    with pytest.raises(ValueError, match=match):
        op(*make(_spatial_args()), backend=backend)


# --- the layers: parameters load from the plain PyTorch modules ---------------------------------

class PlainGatedPointwise(torch.nn.Module):
    """LightAWNet's original formulation."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.attention = torch.nn.Conv2d(c_in, 1, 1)
        self.proj = torch.nn.Conv2d(2 * c_in, c_out, 1)

    def forward(self, a):
        return self.proj(torch.cat([a, a * torch.sigmoid(self.attention(a))], 1))


class PlainSqueezeExcite(torch.nn.Module):
    """LightAWNet's decoder gate: upsample → SE with two bias-free Linears → + skip."""

    def __init__(self, c, reduction):
        super().__init__()
        self.fc1 = torch.nn.Linear(c, c // reduction, bias=False)
        self.fc2 = torch.nn.Linear(c // reduction, c, bias=False)

    def forward(self, x, skip):
        z = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(z.mean((2, 3))))))
        return z * w[:, :, None, None] + skip


class PlainAttentionGate(torch.nn.Module):
    """MONAI's AttentionBlock (2-D): conv + BN projections, ReLU, conv + BN + sigmoid."""

    def __init__(self, c_x, c_g, c_i):
        super().__init__()
        self.W_x = torch.nn.Sequential(torch.nn.Conv2d(c_x, c_i, 1), torch.nn.BatchNorm2d(c_i))
        self.W_g = torch.nn.Sequential(torch.nn.Conv2d(c_g, c_i, 1), torch.nn.BatchNorm2d(c_i))
        self.psi = torch.nn.Sequential(torch.nn.Conv2d(c_i, 1, 1), torch.nn.BatchNorm2d(1))

    def forward(self, x, g):
        return x * torch.sigmoid(self.psi(F.relu(self.W_x(x) + self.W_g(g))))


def _randomise(module):
    """Non-trivial parameters and BatchNorm statistics, so that folding them is tested."""
    gen = torch.Generator().manual_seed(7)
    for name, t in module.state_dict().items():
        if t.is_floating_point():
            t.copy_(torch.rand(t.shape, generator=gen) + 0.5 if "var" in name
                    else torch.randn(t.shape, generator=gen) * 0.5)


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_layers_load_plain_module_weights(backend):
    skip_unless(backend)
    from fastseg.layers import AttentionGate, CrossGate, GatedPointwise, SpatialGate, SqueezeExcite

    gen = torch.Generator().manual_seed(8)
    x, skip, g = randn(gen, 2, 16, 5, 6), randn(gen, 2, 16, 10, 12), randn(gen, 2, 8, 3, 3)

    plain_conv = torch.nn.Conv2d(16, 1, 1)
    layer = SpatialGate(16, backend=backend)
    layer.conv.load_state_dict(plain_conv.state_dict())
    assert_close(layer(x), x * torch.sigmoid(plain_conv(x)), 1e-5, "SpatialGate")

    plain = PlainGatedPointwise(16, 4)
    layer = GatedPointwise(16, 4, backend=backend)
    layer.load_state_dict(plain.state_dict())
    assert_close(layer(x), plain(x), 1e-5, "GatedPointwise")

    plain = PlainSqueezeExcite(16, 8)
    layer = SqueezeExcite(16, reduction=8, upsample=True, backend=backend)
    layer.load_state_dict(plain.state_dict())
    assert_close(layer(x, skip), plain(x, skip), 1e-5, "SqueezeExcite")

    b = randn(gen, 2, 16, 3, 3)
    assert_close(CrossGate(backend=backend)(x, b), x * torch.sigmoid(
        F.interpolate(b, size=(5, 6), mode="bilinear", align_corners=True)), 1e-5, "CrossGate")

    plain = PlainAttentionGate(16, 8, 4)
    _randomise(plain)
    layer = AttentionGate(16, 8, 4, batch_norm=True, backend=backend)
    layer.load_state_dict(plain.state_dict())
    g_up = F.interpolate(g, size=(5, 6), mode="bilinear", align_corners=False)
    plain.eval(), layer.eval()  # eval: BatchNorm folded into the fused op's weights
    assert_close(layer(x, g), plain(x, g_up), 1e-5, "AttentionGate (eval, folded)")
    plain.train(), layer.train()  # training: the plain modules, batch statistics
    assert_close(layer(x, g), plain(x, g_up), 1e-5, "AttentionGate (train)")
    plain_nobn = AttentionGate(16, 8, 4, backend="reference")
    layer = AttentionGate(16, 8, 4, backend=backend)
    layer.load_state_dict(plain_nobn.state_dict())
    assert_close(layer(x, g_up), plain_nobn(x, g_up), 1e-5, "AttentionGate (no norm)")
