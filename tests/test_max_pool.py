"""max_pool2x2: F.max_pool2d(x, 2) with a CPU kernel (NCHW), against F.max_pool2d itself."""
import pytest
import torch
import torch.nn.functional as F

import fastseg.ops.pool as ops_pool
from fastseg.backend import unavailable_reason
from fastseg.ops import max_pool2x2, max_pool2x2_reference
from op_helpers import count_calls

pytestmark = pytest.mark.skipif(unavailable_reason("cpu", "cpu") is not None,
                                reason=str(unavailable_reason("cpu", "cpu")))


@pytest.fixture
def calls(monkeypatch):
    """Counts the kernel's calls."""
    return count_calls(monkeypatch, ops_pool, "_cpp")


# odd H and W (the last row and column belong to no window), 2×2 (one window), one row of
# windows, widths around the vector length (16 and 8 outputs per row for float32 / float64).
# Rows of fewer than 32 outputs (csrc/cpu/max_pool.cpp's kShortRow) run in blocks of
# 1024 // OW rows: 444 rows of 5 (two blocks of 204 and a rest of 36, odd H) and 1000 of 31
# (30 blocks of 33 and a rest of 10, odd H and W), then 32 outputs, the first row length of the
# per-row loop.
SHAPES = [(2, 3, 7, 9), (1, 2, 2, 2), (3, 1, 3, 34), (2, 4, 6, 33), (1, 3, 10, 66),
          (3, 37, 9, 10), (1, 40, 51, 63), (2, 3, 5, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_max_pool2d(calls, shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=dtype, generator=g)
    x.view(-1)[::5] = 0.5  # ties: the first maximum of the window (row-major) takes the gradient
    grad = torch.randn((*shape[:2], shape[2] // 2, shape[3] // 2), dtype=dtype, generator=g)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = max_pool2x2(xa, backend="cpu"), F.max_pool2d(xb, 2)
    ya.backward(grad), yb.backward(grad)
    assert calls[0] == 1
    assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)


def test_ties_and_nan_pick_as_aten(calls):
    windows = torch.tensor([[1., 1., 1., 1.], [0., 2., 2., 0.], [0., 0., 3., 3.],
                            [float("nan"), 5., 1., 2.], [1., float("nan"), 9., float("nan")],
                            [-float("inf"), -float("inf"), -float("inf"), -1.]])
    x = windows.view(1, -1, 2, 2).clone().requires_grad_()   # one window per channel
    xb = x.detach().clone().requires_grad_()
    ya, yb = max_pool2x2(x, backend="cpu"), F.max_pool2d(xb, 2)
    torch.testing.assert_close(ya, yb, rtol=0, atol=0, equal_nan=True)
    ya.sum().backward(), yb.sum().backward()
    assert torch.equal(x.grad, xb.grad)


def test_size_and_layout_switches(monkeypatch):
    count = count_calls(monkeypatch, ops_pool, "_cpp")
    for shape, fmt, backend, expected in [
            ((1, 2, 4, 6), torch.contiguous_format, "cpu", 1),
            ((1, 2, 4, 64), torch.contiguous_format, "cpu", 2),
            ((1, 2, 4, 64), torch.channels_last, "cpu", 2),       # ATen's channels-last kernel
            ((1, 2, 4, 64), torch.contiguous_format, "reference", 2)]:
        x = torch.randn(shape).contiguous(memory_format=fmt)
        y = max_pool2x2(x, backend=backend)
        assert count[0] == expected and torch.equal(y, F.max_pool2d(x, 2))
        assert y.is_contiguous(memory_format=fmt)


def test_opcheck_compile_and_bad_inputs():
    x = torch.randn(2, 3, 6, 8)
    torch.library.opcheck(torch.ops.fastseg.max_pool2x2.default, (x.requires_grad_(),))
    compiled = torch.compile(lambda t: ops_pool._cpp(t)[0], fullgraph=True)
    torch.testing.assert_close(compiled(x.detach()), max_pool2x2_reference(x.detach()))
    with pytest.raises(ValueError, match=r"x must have shape \[N, C, H, W\]"):
        max_pool2x2(x[0], backend="cpu")
    with pytest.raises(ValueError, match="H and W of at least 2"):
        max_pool2x2(torch.randn(1, 1, 1, 8), backend="cpu")
