"""pointwise_conv2d: the 1×1 convolution's CPU kernel against F.conv2d (its reference)."""
import pytest
import torch
import torch.nn.functional as F

import fastseg.ops.pointwise as ops_pw
from fastseg.ops import pointwise_conv2d, pointwise_conv2d_reference
from op_helpers import count_calls

pytestmark = pytest.mark.skipif(ops_pw._cpp is None, reason="the C++ extension is not built")


@pytest.fixture
def calls(monkeypatch):
    """How often the C++ kernel ran."""
    return count_calls(monkeypatch, ops_pw, "_cpp")


def run(fn, x, w, b, grad_y):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    y = fn(x, w, b)
    params = [x, w] + ([b] if b is not None else [])
    return [y] + list(torch.autograd.grad(y, params, grad_y))


# The kernel (csrc/cpu/pointwise.h, pointwise_conv.cpp) computes tiles of 8 output channels (4
# on AVX2-only machines) × 3 vectors of pixels (48 float32 / 24 float64 with AVX-512), the
# remaining C_out mod 8 channels one at a time, on blocks of whole tiles whose panel of input
# pixels fits 64 KB (C_in = 8: 2016 float32 pixels; C_in = 300: one tile), in tasks that also
# split the output channels into groups where a call has fewer than 8 blocks of pixels. Each
# shape crosses several of these with a partial last one; the backward's input gradient is the
# same product with C_in and C_out swapped.
SHAPES = {
    "9to17-77px": (2, 9, 17, 7, 11),       # 2 channel blocks + 1 channel, tiles 48 + 29, 3 groups
    "300to21-221px": (1, 300, 21, 13, 17),  # blocks of one tile: 5 (float32) / 10 (float64)
    "8to40-2500px": (1, 8, 40, 50, 50),     # 2 / 3 blocks of pixels, groups of 16 channels
    "10to3-1px": (3, 10, 3, 1, 1),          # one pixel per sample, channels only one at a time
    "1to4-odd": (2, 1, 4, 5, 3),            # one input channel
    "64to33-batch1": (1, 64, 33, 16, 24),   # LightAWNet's gate product shape, smaller
}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_reference(calls, shape, bias, dtype, tol):
    N, C_in, C_out, H, W = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C_in, H, W, generator=g, dtype=dtype)
    w = torch.randn(C_out, C_in, 1, 1, generator=g, dtype=dtype)
    b = torch.randn(C_out, generator=g, dtype=dtype) if bias else None
    grad_y = torch.randn(N, C_out, H, W, generator=g, dtype=dtype)
    got = run(lambda *a: pointwise_conv2d(*a, backend="cpu"), x, w, b, grad_y)
    want = run(pointwise_conv2d_reference, x, w, b, grad_y)
    assert calls[0] == 1
    for name, a, e in zip(["y", "grad_x", "grad_weight", "grad_bias"], got, want):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        assert (a - e).abs().max() <= tol * e.abs().max(), name


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 9, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: pointwise_conv2d(*a, backend="cpu"), (x, w, b))


def test_opcheck_and_compile():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 9, 4, 6, generator=g, requires_grad=True)
    w = torch.randn(5, 9, 1, 1, generator=g, requires_grad=True)
    b = torch.randn(5, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.fastseg.pointwise_conv2d.default, (x, w, b))
    torch.library.opcheck(torch.ops.fastseg.pointwise_conv2d.default, (x, w, None))
    compiled = torch.compile(lambda *a: pointwise_conv2d(*a, backend="cpu"), fullgraph=True)
    torch.testing.assert_close(compiled(x, w, b), F.conv2d(x, w, b), rtol=1e-5, atol=1e-5)


def test_other_layouts_and_backends_take_the_reference(calls):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 4, 6, generator=g)
    w, b = torch.randn(5, 9, 1, 1, generator=g), torch.randn(5, generator=g)
    y = pointwise_conv2d(x.contiguous(memory_format=torch.channels_last), w, b, backend="cpu")
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, F.conv2d(x, w, b))
    torch.testing.assert_close(pointwise_conv2d(x, w, b, backend="reference"), F.conv2d(x, w, b))
    assert calls[0] == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # promoted to float32, the kernel's type
        y = pointwise_conv2d(x.bfloat16(), w, b, backend="cpu")
    assert y.dtype == torch.float32 and calls[0] == 1


@pytest.mark.parametrize("args,message", [
    (lambda x, w, b: (x[0], w, b), r"x must have shape \[N, C_in, H, W\]"),
    (lambda x, w, b: (x, w[:, :3], b), r"weight must have shape \[C_out, 9, 1, 1\]"),
    (lambda x, w, b: (x, w.view(5, 9), b), r"weight must have shape"),
    (lambda x, w, b: (x, w, b[:2]), r"bias must have shape \[5\]"),
])
def test_bad_inputs(args, message):
    x, w, b = torch.randn(2, 9, 4, 6), torch.randn(5, 9, 1, 1), torch.randn(5)
    with pytest.raises(ValueError, match=message):
        pointwise_conv2d(*args(x, w, b), backend="cpu")


def test_kernel_checks_its_arguments():
    x, w = torch.randn(2, 9, 4, 6), torch.randn(5, 9, 1, 1)
    with pytest.raises(ValueError, match="weight must be"):
        torch.ops.fastseg.pointwise_conv2d(x, w.double(), None)
    with pytest.raises(ValueError, match="grad_out must be"):
        torch.ops.fastseg.pointwise_conv2d_backward(torch.randn(2, 4, 4, 6), x, w)
