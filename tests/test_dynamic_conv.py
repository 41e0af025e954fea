"""dynamic_conv2d: every backend against the reference, forward and every gradient."""
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastseg
from fastseg.backend import unavailable_reason
from fastseg.layers import DynamicConv2d
from fastseg.ops import dynamic_conv2d, dynamic_conv2d_reference

# The cpu backend runs one of three plans (folded and gemm in csrc/cpu/dynamic_conv.cpp, stacked
# in fastseg/ops/dynamic_conv.py for groups 1), forced here through the environment so that each
# runs on every shape it applies to; "gemm-blocks" also shrinks its cache budget so that small
# shapes cross every sample/row/channel block boundary of the gemm plan.
VARIANTS = {
    "cpu-stacked": ("cpu", {"FASTSEG_DYNAMIC_CONV_CPU_PLAN": "stacked"}),
    "cpu-folded": ("cpu", {"FASTSEG_DYNAMIC_CONV_CPU_PLAN": "folded"}),
    # its 3×3 convolutions (stride 1, padding 1) by each algorithm, whichever the shape would pick
    "cpu-folded-direct": ("cpu", {"FASTSEG_DYNAMIC_CONV_CPU_PLAN": "folded",
                                  "FASTSEG_DYNAMIC_CONV_CPU_3X3": "direct"}),
    "cpu-folded-winograd": ("cpu", {"FASTSEG_DYNAMIC_CONV_CPU_PLAN": "folded",
                                    "FASTSEG_DYNAMIC_CONV_CPU_3X3": "winograd"}),
    # a budget below one padded row: the direct convolution's tasks hold one output row each,
    # the Winograd convolution's one row of 2×2 tiles
    "cpu-folded-rows": ("cpu", {"FASTSEG_DYNAMIC_CONV_CPU_PLAN": "folded",
                                "FASTSEG_DYNAMIC_CONV_CPU_3X3": "direct",
                                "FASTSEG_DYNAMIC_CONV_CPU_BLOCK_BYTES": "2500"}),
    "cpu-folded-winograd-rows": ("cpu", {"FASTSEG_DYNAMIC_CONV_CPU_PLAN": "folded",
                                         "FASTSEG_DYNAMIC_CONV_CPU_3X3": "winograd",
                                         "FASTSEG_DYNAMIC_CONV_CPU_BLOCK_BYTES": "2500"}),
    "cpu-gemm": ("cpu", {"FASTSEG_DYNAMIC_CONV_CPU_PLAN": "gemm"}),
    "cpu-gemm-blocks": ("cpu", {"FASTSEG_DYNAMIC_CONV_CPU_PLAN": "gemm",
                                "FASTSEG_DYNAMIC_CONV_CPU_BLOCK_BYTES": "2500"}),
    "triton": ("triton", {}),
}
FUSED = ["cpu", "triton"]


class Case:
    """One call: x [N, C_in, H, W], K experts of kh × kw, conv parameters, bias, routing kind."""

    def __init__(self, name, N, C_in, C_out, H, W, K, kernel, stride=1, padding=None, dilation=1,
                 groups=1, bias=True, routing="sigmoid"):
        self.name, self.N, self.C_in, self.C_out, self.H, self.W = name, N, C_in, C_out, H, W
        self.K, self.kernel, self.stride, self.padding = K, kernel, stride, padding
        self.dilation, self.groups, self.bias, self.routing = dilation, groups, bias, routing

    def __repr__(self):
        return self.name

    def inputs(self, dtype=torch.float32, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(self.N, self.C_in, self.H, self.W, generator=g, dtype=dtype)
        experts = torch.randn(self.K, self.C_out, self.C_in // self.groups, *self.kernel,
                              generator=g, dtype=dtype)
        logits = torch.randn(self.N, self.K, generator=g, dtype=dtype)
        # sigmoid: weights that do not sum to 1 (LightAWNet); softmax: weights that do.
        routing = torch.sigmoid(logits) if self.routing == "sigmoid" else logits.softmax(1)
        bias = torch.randn(self.K, self.C_out, generator=g, dtype=dtype) if self.bias else None
        return x, experts, routing, bias

    def conv(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups)


CASES = [
    Case("odd-sizes", 2, 5, 7, 9, 11, 3, (3, 3)),
    Case("groups3-stride2-dilation-nonsquare", 3, 6, 9, 13, 10, 2, (3, 2), stride=2,
         padding=(1, 0), dilation=(2, 1), groups=3, routing="softmax"),
    Case("batch1-K5-1x3-nobias", 1, 4, 6, 7, 8, 5, (1, 3), padding=(0, 1), groups=2, bias=False),
    Case("K9-groups4-stride2-dilation2", 2, 8, 4, 6, 7, 9, (3, 3), stride=2, padding=1,
         dilation=2, groups=4, bias=False, routing="softmax"),
]

LAYOUTS = {
    "nchw": None,
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    # a strided view: every other column of a tensor twice as wide
    "strided": lambda t: torch.stack([t, torch.zeros_like(t)], dim=-1).flatten(-2)[..., ::2],
}


def skip_unless(backend):
    why = unavailable_reason(backend, "cpu")
    if why is not None:
        pytest.skip(why)


@pytest.fixture
def variant(request, monkeypatch):
    """Select a backend variant: returns the backend name, with its environment set."""
    backend, env = VARIANTS[request.param]
    skip_unless(backend)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return backend


def grads(fn, case, inputs, layout=None, backend=None):
    """Output and gradients of every input (x, experts, routing[, bias]) for a fixed grad_out."""
    leaves = [t.clone().requires_grad_() for t in inputs if t is not None]
    x, experts, routing = leaves[:3]
    bias = leaves[3] if case.bias else None
    inp = layout(x) if layout is not None else x
    kwargs = {} if backend is None else {"backend": backend}
    y = fn(inp, experts, routing, bias, **case.conv(), **kwargs)
    g = torch.Generator().manual_seed(1)
    # Drawn in float64 and cast: the same values whatever the dtype and device of the call.
    grad_out = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device, y.dtype)
    return y, torch.autograd.grad(y, leaves, grad_out)


def assert_close(actual, expected, rtol, name):
    scale = expected.abs().max().item()
    assert scale > 0, f"{name}: reference is all zeros, the comparison would prove nothing"
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol} × {scale:.3g}"


NAMES = ["x", "experts", "routing", "bias"]


def check_against_reference(case, backend, dtype=torch.float32, layout=None, rtol=None):
    inputs = case.inputs(dtype)
    rtol = rtol if rtol is not None else (1e-5 if dtype == torch.float32 else 1e-12)
    y_ref, g_ref = grads(dynamic_conv2d_reference, case, inputs, layout)
    y, g = grads(dynamic_conv2d, case, inputs, layout, backend)
    assert_close(y, y_ref, rtol, "output")
    for name, a, b in zip(NAMES, g, g_ref):
        assert_close(a, b, rtol, "grad " + name)
    return y, g


def one_conv_per_sample(x, experts, routing, bias=None, stride=1, padding=None, dilation=1, groups=1):
    """The semantics written out: mix sample n's kernel and bias, convolve sample n with them."""
    if padding is None:
        padding = tuple(d * (k - 1) // 2 for d, k in zip(_pair(dilation), experts.shape[-2:]))
    outputs = []
    for n in range(x.shape[0]):
        weight = torch.einsum("k,k...->...", routing[n], experts)
        b = routing[n] @ bias if bias is not None else None
        outputs.append(F.conv2d(x[n:n + 1], weight, b, stride, padding, dilation, groups))
    return torch.cat(outputs)


def _pair(v):
    return (v, v) if isinstance(v, int) else v


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_reference_is_one_conv_per_sample(case, layout):
    """The reference (the authors' batch-folded grouped conv) computes the semantics: forward
    and every gradient, float64."""
    inputs = case.inputs(torch.float64)
    y, g = grads(one_conv_per_sample, case, inputs, LAYOUTS[layout])
    y_ref, g_ref = grads(dynamic_conv2d_reference, case, inputs, LAYOUTS[layout])
    assert_close(y_ref, y, 1e-12, "output")
    for name, a, b in zip(NAMES, g_ref, g):
        assert_close(a, b, 1e-12, "grad " + name)


# The interpreter is slow: Triton runs the other layouts on the first case only.
MATRIX = [(v, c, l) for v in VARIANTS for c in CASES for l in LAYOUTS
          if v != "triton" or l == "nchw" or c is CASES[0]]


@pytest.mark.parametrize("variant,case,layout", MATRIX, indirect=["variant"],
                         ids=[f"{v}-{c!r}-{l}" for v, c, l in MATRIX])
def test_matches_reference(variant, case, layout):
    y, g = check_against_reference(case, variant, layout=LAYOUTS[layout])
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert g[0].is_contiguous(memory_format=torch.channels_last)


# Shapes for the gemm plan's blocks (csrc/cpu/dynamic_conv.cpp: blocking). At the tiny budget of
# "cpu-gemm-blocks" (2500 bytes), float32, 2 threads: blocks of 1 sample; 19 output channels in
# row tasks of 5+5+5+4 (10+9 with 1 thread); 21 input channels in forward blocks of 13+8 and
# backward tasks of 6+6+6+3; weight-gradient row blocks of 10+9; kernel rows of 54 values (vector
# blocks of 16 or 8 plus single values). On a 2×2 image the backward's blocks hold 2 samples and
# its mixed blocks 1. At the default budget 64 input channels make kernel rows of 576 values: two
# mixing column blocks of 512; the folded plan reduces its 37·576 kernel values in 6 segments.
#
# These kernels are 3×3 at stride 1 and padding 1, so the gemm plan's expert and routing gradients
# come from csrc/cpu/expert_grad3x3.h: kernel columns in blocks of 4 vectors (64 float32 or 32
# float64 with AVX-512, 32 or 16 with AVX2) with a partial last one (21·9 = 189 = 2·64 + 61;
# 10·9 = 90) or none (64·9 = 576), output channels in tiles of 6 (AVX-512) or 2 (AVX2) with a
# partial last one (19, 37, 3) or none (24), rows split into two tasks per column block where
# the blocks alone give a thread fewer than two (19 at 2 threads: 12 + 7), samples in blocks whose
# panels fit half the budget (one at the tiny budget, all at the default one), their tiles folded
# in groups of up to 8 samples (11 = 8 + 3).
#
# The gemm plan's forward (groups 1) is csrc/cpu/mixed_gemm.h's: output channels in tiles of 6 or
# 2 as above, pixels in tiles of 4 vectors and a rest of 1–4 vectors whose last may be partial
# (float32 with 16 lanes: 143 = 2·64 + 15, 64 whole, 60 = 4 vectors, 45 = 3, 30 = 2, 12 and 4 =
# 1; float64's 8 lanes: 64 = 2·32, 60 = 32 + 4 vectors, ...), each tile's mixed rows for a block
# of samples (one at the tiny budget, all at the default one), on im2col rows built per chunk
# (im2col_rows): at stride 1 and outputs as wide as the input, a row is the plane shifted, in
# masked vectors (the cases above; dilation 2 at 37 wide: 333 pixels, 20 vectors of 16 lanes + 13,
# 41 of 8 + 5); otherwise rows of output pixels in masked vectors, one or several a row (37 wide:
# 3 of 16 lanes, 5 of 8), rows above and below the plane, H stride and W dilation; W stride 2 value
# by value.
BLOCK_CASES = [
    Case("tiny-budget-blocks", 3, 21, 19, 11, 13, 4, (3, 3)),
    Case("tiny-budget-small-image", 3, 21, 19, 2, 2, 4, (3, 3), routing="softmax"),
    Case("default-budget-64ch", 2, 64, 37, 5, 6, 3, (3, 3), bias=False),
    Case("whole-column-row-and-pixel-tiles", 3, 64, 24, 8, 8, 2, (3, 3)),
    Case("fewer-outputs-than-a-tile", 2, 10, 3, 6, 10, 2, (3, 3), routing="softmax"),
    Case("three-pixel-vectors", 2, 8, 7, 5, 9, 2, (3, 3)),
    Case("one-pixel-vector", 2, 5, 13, 3, 4, 3, (3, 3)),
    Case("two-fold-groups", 11, 6, 13, 4, 5, 3, (3, 3)),
    Case("dilation-2-same-37wide", 2, 5, 7, 9, 37, 3, (3, 3), padding=2, dilation=2),
    Case("stride-2x1-dilation-1x2-37wide", 2, 5, 7, 9, 37, 3, (3, 3), stride=(2, 1),
         padding=(1, 2), dilation=(1, 2)),
    Case("stride-2-dilation-2x1-3x2", 3, 6, 9, 13, 10, 2, (3, 2), stride=2, padding=(1, 0),
         dilation=(2, 1), routing="softmax"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", BLOCK_CASES, ids=repr)
@pytest.mark.parametrize("variant", ["cpu-gemm-blocks", "cpu-gemm", "cpu-folded"], indirect=True)
def test_block_boundaries(variant, case, threads, dtype):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_reference(case, variant, dtype)
    finally:
        torch.set_num_threads(previous)


# Shapes for the folded plan's direct 3×3 convolution (csrc/cpu/direct_conv.h): output channels
# in blocks of 8 (AVX-512) or 4 (AVX2) plus single ones (19 = 2·8 + 3 = 4·4 + 3; 3 < any block);
# rows cut into vectors of 16 or 8 float32 (AVX-512, AVX2) and 8 or 4 float64 pixels with a
# partial last one (37 = 2·16 + 5 = 4·8 + 5 = 9·4 + 1), or none (32, LightAWNet's widths are
# multiples of 16: the right padding column is read); tiles of 2 vectors (4 for single channels)
# with a partial last tile, spanning rows (3 vectors a row at 37 wide; rows narrower than a
# vector, 5). "cpu-folded-rows" gives every task one output row (a budget below one padded row);
# at the default budget the 70 rows of 21 channels × 37 (float32, AVX-512) come in 2 tasks of 35.
# The kernels are mixed in parallel segments of 4096 values: 32·17·9 = 4896 is one and a part.
#
# The Winograd convolution (csrc/cpu/winograd.h) runs on the same shapes and on its own: 2×2
# output tiles (odd H and W: a last tile row and column of one pixel), rows of tiles padded to
# whole vectors (37 wide: 19 tiles, 32 with 16 lanes, 24 with 8; 200 wide: 100 tiles, 112 or
# 104), register tiles of 3 vectors of tiles with a last one of 1 or 2 vectors (a task's 112
# tiles at 16 lanes: 2 × 48 + 16; its 32: one of 2 vectors; at 8 lanes 104 = 4 × 24 + 8), the
# products' output channels in blocks (19) and single (3, 1), tasks of one row of tiles
# ("-rows") or several, a batch of one split into tasks, rows of tiles narrower than a vector
# (packed: 14 wide, 7 tiles; and the narrow cases above), and transformed kernels too large for
# the buffer a thread keeps between calls (8 MiB).
#
# The backward's weight gradients up to 16 output channels (direct_conv.h's weight_grad3x3; more
# channels: oneDNN) run on the same shapes: output channels in pairs (AVX-512) or singly, with a
# single one left (3, 1; 8 and 16 even), rows in vectors with a partial last one (37, 5; 48 and
# 1 wide), a sample's rows in one task or in several whose partial sums are added afterwards
# ("-rows": one row each; the batch of one with 70 rows: 4 blocks at 2 threads).
DIRECT_CASES = [
    Case("direct-19ch-37wide", 2, 21, 19, 13, 37, 3, (3, 3)),
    Case("direct-32ch-32wide", 2, 17, 32, 6, 32, 3, (3, 3)),
    Case("direct-3ch-narrow", 3, 6, 3, 11, 5, 2, (3, 3), bias=False),
    Case("direct-1ch-70rows", 1, 21, 1, 70, 37, 4, (3, 3)),
    Case("direct-8ch-single-pixel", 2, 2, 8, 1, 1, 2, (3, 3)),
    # 16 output channels: the most whose weight gradients the folded plan computes itself
    Case("direct-16ch-48wide", 2, 5, 16, 9, 48, 2, (3, 3)),
    Case("winograd-batch1-200wide", 1, 16, 19, 9, 200, 2, (3, 3)),
    Case("winograd-40ch-odd", 2, 40, 24, 7, 33, 3, (3, 3), routing="softmax"),
    # rows of 7 tiles, narrower than a vector: packed across rows, gathered and scattered
    Case("winograd-narrow-14wide", 2, 24, 19, 41, 14, 2, (3, 3)),
    # 6 samples' transformed 160 × 160 kernels: 9.8 MB in float32, over what a thread keeps
    Case("winograd-kernels-over-8MiB", 6, 160, 160, 3, 2, 2, (3, 3), bias=False),
]
THREE_BY_THREE = ["cpu-folded-direct", "cpu-folded-rows", "cpu-folded-winograd",
                  "cpu-folded-winograd-rows"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", DIRECT_CASES, ids=repr)
@pytest.mark.parametrize("variant", THREE_BY_THREE, indirect=True)
def test_direct_conv_boundaries(variant, case, threads, dtype):
    """Forward without autograd (as inference runs it), then with every gradient."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, experts, routing, bias = case.inputs(dtype)
        expected = one_conv_per_sample(x, experts, routing, bias, **case.conv())
        with torch.no_grad():
            y = dynamic_conv2d(x, experts, routing, bias, **case.conv(), backend=variant)
        assert_close(y, expected, 1e-5 if dtype == torch.float32 else 1e-12, "no-grad output")
        check_against_reference(case, variant, dtype)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("where", [0, 36, -1])  # first value, a middle row's first, last value
@pytest.mark.parametrize("variant", THREE_BY_THREE + ["cpu-gemm", "cpu-gemm-blocks"], indirect=True)
def test_direct_conv_checks_every_row_of_x(variant, where):
    """The direct convolution checks x for NaN while it copies x's rows, the gemm plan before
    its products (groups 1) or while it writes im2col: every row, every task."""
    x, experts, routing, bias = DIRECT_CASES[0].inputs()
    x.view(-1)[where] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        dynamic_conv2d(x, experts, routing, bias, backend=variant)


@pytest.mark.parametrize("where", ["first", "middle", "last"])  # of all the experts' values
@pytest.mark.parametrize("variant", THREE_BY_THREE + ["cpu-gemm", "cpu-gemm-blocks"], indirect=True)
def test_direct_conv_checks_the_experts(variant, where):
    """The direct convolution checks the mixed kernels while it packs them, the gemm plan each
    tile's expert rows before it mixes them: a NaN in any expert is an error. A mix that overflows
    from finite experts is not."""
    x, experts, routing, bias = DIRECT_CASES[0].inputs()
    bad = experts.clone()
    bad.view(-1)[{"first": 0, "middle": experts.numel() // 2 + 3, "last": -1}[where]] = float("nan")
    with pytest.raises(ValueError, match="experts contains NaN"):
        dynamic_conv2d(x, bad, routing, bias, backend=variant)
    huge = experts.clone()
    huge[:, 0, 0, 1, 1] = 3e38  # every expert: their mix overflows to inf, the experts are finite
    y = dynamic_conv2d(x, huge, routing.clamp(min=0.5), bias, backend=variant)
    assert not torch.isfinite(y[:, 0]).all() and torch.isfinite(y[:, 1:]).all()


@pytest.mark.parametrize("variant", ["cpu-folded", "cpu-gemm", "triton"], indirect=True)
def test_single_expert_is_a_plain_conv2d(variant):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 9, 8, generator=g)
    weight = torch.randn(4, 3, 3, 3, generator=g)
    bias = torch.randn(4, generator=g)
    y = dynamic_conv2d(x, weight[None], torch.ones(2, 1), bias[None], stride=2, padding=1,
                       groups=2, backend=variant)
    assert_close(y, F.conv2d(x, weight, bias, stride=2, padding=1, groups=2), 1e-5, "K=1")


@pytest.mark.parametrize("variant", ["cpu-folded", "cpu-gemm", "triton"], indirect=True)
def test_gradcheck_float64(variant):
    case = Case("gradcheck", 2, 4, 3, 4, 5, 3, (3, 2), padding=(1, 0), groups=1)
    leaves = [t.requires_grad_() for t in case.inputs(torch.float64)]

    def fn(x, experts, routing, bias):
        return dynamic_conv2d(x, experts, routing, bias, padding=(1, 0), backend=variant)

    # The interpreter runs a Triton program in ~ms: the full Jacobian would take minutes, so the
    # triton case checks random directional derivatives (fast mode) instead.
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, fast_mode=variant == "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", [Case("gemm-conv-input-side", 3, 9, 11, 16, 17, 3, (3, 3)),
                                  Case("gemm-blas-input-side", 3, 9, 11, 15, 17, 3, (3, 3))],
                         ids=repr)
def test_gemm_plan_input_side_on_each_side_of_16x16(monkeypatch, case, layout, dtype):
    """The gemm plan's backward computes a 3×3 kernel's input gradient by the folded plan's
    convolution from 256 output pixels on (16×17 here) and by per-sample products below (15×17)."""
    skip_unless("cpu")
    monkeypatch.setenv("FASTSEG_DYNAMIC_CONV_CPU_PLAN", "gemm")
    check_against_reference(case, "cpu", dtype, LAYOUTS[layout])


def test_auto_plans_differ_between_forward_and_backward(monkeypatch):
    """At 16² with more output channels than pixels the cpu backend's forward takes the folded
    plan (its 3×3 convolution) and the backward the gemm plan: each recomputes from the inputs."""
    monkeypatch.delenv("FASTSEG_DYNAMIC_CONV_CPU_PLAN", raising=False)
    monkeypatch.delenv("FASTSEG_DYNAMIC_CONV_CPU_3X3", raising=False)
    check_against_reference(Case("forward-folded-backward-gemm", 2, 8, 260, 16, 16, 2, (3, 3)),
                            "cpu")


@pytest.mark.parametrize("name,value", [("FASTSEG_DYNAMIC_CONV_CPU_PLAN", "fast"),
                                        ("FASTSEG_DYNAMIC_CONV_CPU_3X3", "fft"),
                                        ("FASTSEG_DYNAMIC_CONV_CPU_BLOCK_BYTES", "-1")])
def test_cpu_switches_reject_bad_values(monkeypatch, name, value):
    monkeypatch.setenv("FASTSEG_DYNAMIC_CONV_CPU_PLAN", "folded")  # reaches every switch
    monkeypatch.setenv(name, value)
    x, experts, routing, bias = DIRECT_CASES[0].inputs()
    with pytest.raises(ValueError, match=name):
        dynamic_conv2d(x, experts, routing, bias, backend="cpu")


@pytest.mark.parametrize("variant", ["cpu-folded-direct", "cpu-folded-winograd"], indirect=True)
def test_gradcheck_float64_3x3(variant):
    """The folded plan's 3×3 convolutions (forward and input gradient) by either algorithm."""
    case = Case("gradcheck-3x3", 2, 3, 4, 5, 6, 2, (3, 3))
    leaves = [t.requires_grad_() for t in case.inputs(torch.float64)]

    def fn(x, experts, routing, bias):
        return dynamic_conv2d(x, experts, routing, bias, backend=variant)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


def fused_op(backend):
    return {"cpu": torch.ops.fastseg.dynamic_conv2d.default,
            "triton": torch.ops.fastseg.dynamic_conv2d_triton.default}[backend]


@pytest.mark.parametrize("variant,layout", [
    ("cpu-folded", "nchw"), ("cpu-folded", "channels_last"), ("cpu-gemm", "nchw"),
    ("cpu-gemm", "channels_last"), ("triton", "nchw"),
    pytest.param("triton", "channels_last", marks=pytest.mark.slow),
], indirect=["variant"])
def test_opcheck(variant, layout):
    x, experts, routing, bias = CASES[1].inputs()
    x = (LAYOUTS[layout](x) if LAYOUTS[layout] else x).requires_grad_()
    args = (x, experts.requires_grad_(), routing.requires_grad_(), bias.requires_grad_(),
            [2, 2], [1, 0], [2, 1], 3)
    torch.library.opcheck(fused_op(variant), args)


# aot_eager checks the capture (fake kernels, autograd, no graph break) in seconds; inductor, the
# full path users take, spends ~25 s generating C++ here.
@pytest.mark.parametrize("backend,compiler", [
    ("reference", "aot_eager"), ("cpu", "aot_eager"), ("triton", "aot_eager"),
    pytest.param("cpu", "inductor", marks=pytest.mark.slow),
])
def test_compile_fullgraph(backend, compiler):
    skip_unless(backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = DynamicConv2d(6, 5, 3, num_experts=3, bias=True, backend=backend)
    x = torch.randn(2, 6, 7, 6, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend=compiler)
    y = compiled(x)
    y.square().sum().backward()
    expected = dynamic_conv2d_reference(x, layer.weight, layer.routing_weights(x), layer.bias)
    assert_close(y.detach(), expected.detach(), 1e-5, "compiled output")
    assert x.grad is not None and layer.weight.grad is not None
    assert layer.routing.weight.grad is not None and layer.bias.grad is not None


@pytest.mark.parametrize("variant", ["cpu-folded", "cpu-gemm", "triton"], indirect=True)
def test_backward_keeps_no_per_sample_kernels(variant):
    """Between forward and backward only x, experts, routing and bias are kept."""
    case = CASES[0]
    x, experts, routing, bias = [t.requires_grad_() for t in case.inputs()]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = dynamic_conv2d(x, experts, routing, bias, backend=variant)
    kept = [x, experts, routing, bias]
    assert saved and all(any(t.data_ptr() == k.data_ptr() and t.shape == k.shape for k in kept)
                         for t in saved), [tuple(t.shape) for t in saved]
    y.sum().backward()


@pytest.mark.parametrize("variant", ["cpu-folded-direct", "cpu-folded-winograd", "cpu-gemm"],
                         indirect=True)
def test_cpu_kernels_are_deterministic(variant):
    case = BLOCK_CASES[0]
    first = grads(dynamic_conv2d, case, case.inputs(), backend=variant)
    second = grads(dynamic_conv2d, case, case.inputs(), backend=variant)
    for a, b in zip([first[0], *first[1]], [second[0], *second[1]]):
        assert torch.equal(a, b)


# --- bad inputs --------------------------------------------------------------------------------

def _bad(**changes):
    def make(x, e, r, b):
        args = dict(x=x, experts=e, routing=r, bias=b, padding=1, groups=1)
        args.update({k: v(args) if callable(v) else v for k, v in changes.items()})
        return args
    return make


BAD = [
    (_bad(x=lambda a: a["x"][0]), ValueError, r"x must have shape \[N, C_in, H, W\]"),
    (_bad(x=lambda a: a["x"][:0], routing=lambda a: a["routing"][:0]), ValueError,
     "x must be non-empty"),
    (_bad(x=lambda a: a["x"].to(torch.int64)), ValueError, "x must be a floating-point"),
    (_bad(experts=lambda a: a["experts"][0]), ValueError, "experts must have shape"),
    (_bad(experts=lambda a: a["experts"][:, :, :3]), ValueError,
     r"experts must have C_in/groups=4 input channels"),
    (_bad(groups=3), ValueError, "not divisible by groups=3"),
    (_bad(groups=2, experts=lambda a: a["experts"][:, :5, :2]), ValueError,
     r"experts has C_out=5 \(dim 1\), not divisible by groups=2"),
    (_bad(routing=lambda a: a["routing"][:1]), ValueError, r"routing must have shape \[N, K\]"),
    (_bad(routing=lambda a: a["routing"][:, :2]), ValueError, r"routing must have shape \[N, K\]"),
    (_bad(bias=lambda a: a["bias"][:, :3]), ValueError, r"bias must have shape \[K, C_out\]"),
    (_bad(experts=lambda a: a["experts"].double()), ValueError, "experts has dtype"),
    (_bad(routing=lambda a: a["routing"].to("meta")), ValueError, "routing is on meta"),
    (_bad(bias=lambda a: a["bias"].double()), ValueError, "bias has dtype"),
    (_bad(x=lambda a: a["x"].masked_fill(a["x"] > 1, float("nan"))), ValueError, "x contains NaN"),
    (_bad(experts=lambda a: a["experts"].masked_fill(a["experts"] > 1, float("inf"))), ValueError,
     "experts contains NaN or inf"),
    (_bad(routing=lambda a: a["routing"].masked_fill(a["routing"] > 0.5, float("nan"))),
     ValueError, "routing contains NaN"),
    (_bad(bias=lambda a: a["bias"].masked_fill(a["bias"] > 0, float("-inf"))), ValueError,
     "bias contains NaN or inf"),
    (_bad(padding=None, experts=lambda a: a["experts"][..., :2, :2]), ValueError,
     r"padding=None means 'same' padding"),
    (_bad(padding=-1), ValueError, "padding must be non-negative"),
    (_bad(padding=0, x=lambda a: a["x"][..., :2, :2]), ValueError,
     "smaller than the dilated kernel"),
    (_bad(x=lambda a: a["x"].tolist()), TypeError, "x must be a torch.Tensor"),
]


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_inputs_raise_clear_errors(backend, case):
    make, error, match = BAD[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 6, generator=g)
    args = make(x, torch.randn(3, 6, 4, 3, 3, generator=g), torch.rand(2, 3, generator=g),
                torch.randn(3, 6, generator=g))
    with pytest.raises(error, match=match):
        dynamic_conv2d(**args, backend=backend)


@pytest.mark.skipif(unavailable_reason("cpu", "cpu") is not None, reason="extension not built")
@pytest.mark.parametrize("name", ["x", "experts", "routing", "bias"])
def test_stacked_plan_rejects_non_finite_inputs(name):
    """The cpu backend's stacked plan (few output channels, kernels other than 3×3 at stride 1)
    is ATen's convolution, not a kernel that checks its inputs while reading them: it must check
    first."""
    g = torch.Generator().manual_seed(0)
    args = dict(x=torch.randn(2, 4, 6, 6, generator=g),
                experts=torch.randn(3, 1, 4, 5, 5, generator=g),
                routing=torch.rand(2, 3, generator=g), bias=torch.randn(3, 1, generator=g))
    assert fastseg.ops.dynamic_conv._cpu_plan_is_stacked(args["experts"], 1, needs_grad=True)
    args[name].view(-1)[1] = float("nan")
    args = {key: value.requires_grad_() for key, value in args.items()}  # the plan of a training step
    with pytest.raises(ValueError, match=f"{name} contains NaN"):
        dynamic_conv2d(**args, backend="cpu")


@pytest.mark.skipif(unavailable_reason("cpu", "cpu") is not None, reason="extension not built")
def test_few_output_channels_without_grad_take_the_folded_plan():
    """Inference (no gradient asked for) skips the stacked plan, and so does a 3×3 kernel at
    stride 1 with one: LightAWNet's head, 16 → 1 channel with 4 experts, runs the folded plan's
    direct convolution and weight gradients. Other kernels with a gradient take the stacked plan."""
    experts = torch.randn(4, 1, 16, 3, 3, generator=torch.Generator().manual_seed(0))
    is_stacked = fastseg.ops.dynamic_conv._cpu_plan_is_stacked
    assert not is_stacked(experts, 1, needs_grad=False)
    assert not is_stacked(experts, 1, needs_grad=True)
    assert is_stacked(experts, 1, True, stride=(2, 2))
    assert is_stacked(experts, 1, True, dilation=(2, 2), padding=(2, 2))
    assert is_stacked(experts[..., :1, :1], 1, True, padding=(0, 0))
    x, _, routing, bias = Case("head", 2, 16, 1, 12, 21, 4, (3, 3)).inputs()
    expected = dynamic_conv2d_reference(x, experts, routing, bias)
    with torch.no_grad():
        assert_close(dynamic_conv2d(x, experts, routing, bias, backend="cpu"), expected, 1e-5,
                     "no-grad output")
    y, = torch.autograd.grad(dynamic_conv2d(x, experts.requires_grad_(), routing, bias,
                                            backend="cpu").sum(), experts)
    assert y.shape == experts.shape


def test_padding_none_needs_stride_1():
    x, experts, routing, _ = CASES[0].inputs()
    with pytest.raises(ValueError, match="stride 1"):
        dynamic_conv2d(x, experts, routing, stride=2)


@pytest.mark.skipif(unavailable_reason("cpu", "cpu") is not None, reason="extension not built")
@pytest.mark.parametrize("change,match", [
    (lambda a: {**a, "routing": a["routing"][:1]}, r"routing must be \[N, K\] = \[2, 3\]"),
    (lambda a: {**a, "experts": a["experts"][:, :, :2]}, "experts must have C_in/groups=4"),
    (lambda a: {**a, "bias": a["bias"][:2]}, r"bias must be \[K, C_out\]"),
    (lambda a: {**a, "x": a["x"][:0]}, "x must be non-empty"),
    (lambda a: {**a, "groups": 3}, "not divisible by groups=3"),
    (lambda a: {**a, "routing": a["routing"].double()}, "routing has dtype"),
])
def test_cpp_op_checks_name_the_argument(change, match):
    """The C++ ops check their arguments themselves (csrc/dynamic_conv.h): direct calls too."""
    g = torch.Generator().manual_seed(0)
    args = dict(x=torch.randn(2, 4, 6, 6, generator=g), experts=torch.randn(3, 6, 4, 3, 3, generator=g),
                routing=torch.rand(2, 3, generator=g), bias=torch.randn(3, 6, generator=g),
                stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1)
    with pytest.raises(ValueError, match=match):
        torch.ops.fastseg.dynamic_conv2d(*change(args).values())


def test_half_precision_on_cpu_runs_on_the_reference(monkeypatch):
    # The warning is issued once per process: a private record keeps it for other tests.
    monkeypatch.setattr(fastseg.backend, "_warned", set())
    x, experts, routing, bias = [t.bfloat16() for t in CASES[0].inputs()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = dynamic_conv2d(x, experts, routing, bias, backend="cpu")
    assert y.dtype == torch.bfloat16
    if "cpu" in fastseg.available_backends("cpu"):
        assert [str(c.message) for c in caught if "float32 and float64" in str(c.message)]
    torch.testing.assert_close(y, dynamic_conv2d_reference(x, experts, routing, bias))


# --- the layer ---------------------------------------------------------------------------------

def manual_routing(layer, x, activation, temperature):
    logits = F.conv2d(x.mean((2, 3), keepdim=True), layer.routing.weight, layer.routing.bias)
    logits = logits.flatten(1) / temperature
    return torch.sigmoid(logits) if activation == "sigmoid" else logits.softmax(1)


@pytest.mark.parametrize("activation,temperature", [("sigmoid", 1.0), ("softmax", 1.0),
                                                    ("softmax", 0.3), ("sigmoid", 4.0)])
def test_layer_routing(activation, temperature):
    torch.manual_seed(0)
    layer = DynamicConv2d(6, 8, 3, num_experts=4, routing=activation, temperature=temperature,
                          bias=True)
    x = torch.randn(3, 6, 10, 9)
    routing = layer.routing_weights(x)
    assert_close(routing, manual_routing(layer, x, activation, temperature), 1e-6, "routing")
    if activation == "softmax":
        torch.testing.assert_close(routing.sum(1), torch.ones(3))
    expected = dynamic_conv2d_reference(x, layer.weight, routing, layer.bias, padding=1)
    for backend in fastseg.available_backends("cpu"):
        layer.backend = backend
        assert_close(layer(x).detach(), expected.detach(), 1e-5, f"layer output ({backend})")


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_layer_output_shift_is_added_and_differentiable(backend):
    """``output_shift`` (a folded BatchNorm's shift) is added to the output in place; gradients
    still flow to x and the experts."""
    skip_unless(backend)
    torch.manual_seed(0)
    layer = DynamicConv2d(4, 5, 3, bias=True, backend=backend)
    x = torch.randn(2, 4, 6, 7, requires_grad=True)
    plain = layer(x)
    expected_grads = torch.autograd.grad((plain * plain).sum(), [x, layer.weight])
    shift = torch.randn(5)
    layer.output_shift = shift
    shifted = layer(x)
    torch.testing.assert_close(shifted, plain + shift.view(1, -1, 1, 1))
    grads = torch.autograd.grad(((shifted - shift.view(1, -1, 1, 1)) ** 2).sum(), [x, layer.weight])
    for actual, expected in zip(grads, expected_grads):
        torch.testing.assert_close(actual, expected)
    assert "output_shift" in layer.state_dict()


def test_layer_inits():
    torch.manual_seed(0)
    kaiming = DynamicConv2d(64, 32, 3, num_experts=4, bias=True, init="kaiming")
    bound = 1.0 / math.sqrt(64 * 9)  # kaiming_uniform(a=√5) and the bias bound: 1/√fan_in
    for k in range(4):
        assert kaiming.weight[k].abs().max() <= bound
        assert kaiming.weight[k].abs().max() > 0.9 * bound
        assert kaiming.bias[k].abs().max() <= bound
    normal = DynamicConv2d(64, 32, 3, num_experts=4, init="normal")
    assert 0.95 < normal.weight.std().item() < 1.05 and abs(normal.weight.mean().item()) < 0.02


def test_layer_parameter_count_matches_lightawnet():
    # K·C_out·C_in·9 + (C_in·K + K): spec/models.md §1.1 (64→128 with its BatchNorm: 295,428).
    layer = DynamicConv2d(64, 128, 3)
    assert sum(p.numel() for p in layer.parameters()) + 2 * 128 == 295_428


def test_layer_state_dicts_identical_across_backends():
    torch.manual_seed(0)
    a = DynamicConv2d(6, 8, (3, 1), bias=True, backend="reference")
    b = DynamicConv2d(6, 8, (3, 1), bias=True, backend="cpu")
    assert {k: v.shape for k, v in a.state_dict().items()} == \
        {k: v.shape for k, v in b.state_dict().items()}
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 6, 7, 7)
    assert_close(b(x).detach(), a(x).detach(), 1e-5, "outputs after loading")


class PlainDynamicConv(torch.nn.Module):
    """The original LightAWNet layer in plain PyTorch (its key names): experts ``weight.weight``,
    routing conv ``weight.attention.net``, a sigmoid, and the batch folded into a grouped conv."""

    def __init__(self, c_in, c_out, k=4):
        super().__init__()
        self.weight = torch.nn.Module()
        self.weight.weight = torch.nn.Parameter(torch.randn(k, c_out, c_in, 3, 3))
        self.weight.attention = torch.nn.Module()
        self.weight.attention.net = torch.nn.Conv2d(c_in, k, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        alpha = torch.sigmoid(self.weight.attention.net(F.adaptive_avg_pool2d(x, 1))).flatten(1)
        kernels = torch.einsum("nk,koihw->noihw", alpha, self.weight.weight)
        y = F.conv2d(x.reshape(1, n * c, h, w), kernels.flatten(0, 1), padding=1, groups=n)
        return y.view(n, -1, h, w)


def test_layer_loads_from_plain_pytorch_equivalent():
    torch.manual_seed(0)
    plain = PlainDynamicConv(5, 7)
    keys = {"weight.weight": "weight", "weight.attention.net.weight": "routing.weight",
            "weight.attention.net.bias": "routing.bias"}
    layer = DynamicConv2d(5, 7, 3, init="normal")
    layer.load_state_dict({keys[k]: v for k, v in plain.state_dict().items()})
    x = torch.randn(3, 5, 8, 9)
    expected = plain(x)
    for backend in fastseg.available_backends("cpu"):
        layer.backend = backend
        assert_close(layer(x).detach(), expected.detach(), 1e-5, f"layer output ({backend})")


@pytest.mark.parametrize("kwargs,match", [
    (dict(routing="relu"), "routing must be one of"),
    (dict(temperature=0.0), "temperature must be a positive finite number"),
    (dict(temperature=float("inf")), "temperature must be a positive finite number"),
    (dict(init="xavier"), "init must be one of"),
    (dict(groups=4), "divisible by groups"),
    (dict(num_experts=0), "num_experts must be a positive int"),
    (dict(kernel_size=2), r"padding=None means 'same' padding"),
    (dict(stride=2), r"padding=None means 'same' padding"),
    (dict(backend="gpu"), "backend must be one of"),
])
def test_layer_bad_arguments(kwargs, match):
    args = dict(in_channels=6, out_channels=8, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        DynamicConv2d(**args)


def test_layer_rejects_wrong_input_channels():
    with pytest.raises(ValueError, match=r"x must have shape \[N, 6, H, W\]"):
        DynamicConv2d(6, 8, 3)(torch.randn(2, 5, 8, 8))


# --- CUDA (runs only where a GPU is present) -------------------------------------------------

# Every case of the CPU tests, and LightAWNet-like shapes past the CUDA kernels' 64 × 64 output
# tiles and 16-entry reduction steps (and the Triton launchers' model-size tiles), with partial
# last tiles in every dimension.
GPU_CASES = CASES + BLOCK_CASES + [
    Case("gpu-tiles-70-67", 2, 70, 67, 19, 23, 4, (3, 3)),
    Case("gpu-tiles-stride2", 3, 33, 130, 17, 21, 4, (3, 3), stride=2, padding=1,
         routing="softmax"),
    Case("gpu-lightawnet-256-8x8", 2, 256, 256, 8, 8, 4, (3, 3), bias=False),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float16, 1e-2),
                                        (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", GPU_CASES, ids=repr)
def test_gpu_matches_reference(backend, dtype, rtol, case, layout):
    if backend == "triton" and dtype == torch.float32:
        # its float32 products are three TF32 products (kernels/_dot.py), ≈ 2⁻²¹ each: 2e-5 of
        # the largest output at 256 channels × 9 taps, measured on an H200
        rtol = 5e-5
    inputs = case.inputs(torch.float64)
    y_ref, g_ref = grads(dynamic_conv2d_reference, case, [t.cuda() if t is not None else None
                                                          for t in inputs])
    y, g = grads(dynamic_conv2d, case, [t.cuda().to(dtype) if t is not None else None
                                        for t in inputs], LAYOUTS[layout], backend=backend)
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                           else torch.contiguous_format)
    assert_close(y.double(), y_ref, rtol, "output")
    for name, a, b in zip(NAMES, g, g_ref):
        assert_close(a.double(), b, rtol, "grad " + name)


def test_cuda_kernels_registered_when_built_with_cuda():
    """CI builds with FASTSEG_CUDA=1: the CUDA sources must have compiled, linked and registered."""
    if os.environ.get("FASTSEG_CUDA") != "1":
        pytest.skip("FASTSEG_CUDA=1 not set: the CUDA build is not required in this run")
    assert fastseg.backend.extension() is not None, "fastseg._C failed to import"
    for op in ("fastseg::dynamic_conv2d", "fastseg::dynamic_conv2d_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
