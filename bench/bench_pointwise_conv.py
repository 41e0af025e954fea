"""pointwise_conv2d (1×1 convolution, NCHW) at LightAWNet's 1×1 convs: reference eager
(``F.conv2d``: oneDNN), reference compiled, ``gemm`` (ATen's ``thnn_conv2d``: one BLAS product
per sample, what ``PointwiseConv2d`` ran before the kernel) and the cpu kernel.

    .venv/bin/python -m pytest bench/bench_pointwise_conv.py --benchmark-json=pw.json
    .venv/bin/python bench/summary.py pw.json

Shapes ``N×C_in×H×W×C_out`` (C_out last): the blocks' expansions (C → 4C), the side branches and the
decoders' reductions at batch-1 inference (256² input) and the expansions at the batch-8
training step (128² input). Modes: forward, and forward + backward (gradients of x, weight and
bias for a fixed random upstream gradient).
"""
import pytest
import torch
import torch.nn.functional as F

from fastseg.backend import unavailable_reason
from fastseg.ops import pointwise_conv2d, pointwise_conv2d_reference

# (N, C_in, H, W, C_out)
SHAPES = [(1, 16, 128, 128, 64), (1, 32, 64, 64, 128), (1, 64, 32, 32, 256),
          (1, 128, 16, 16, 512), (1, 64, 32, 32, 128), (1, 32, 128, 128, 16),
          (1, 64, 64, 64, 32), (8, 16, 64, 64, 64), (8, 32, 32, 32, 128), (8, 64, 16, 16, 256)]

_compiled = {}


def reference_compiled(x, w, b):
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(pointwise_conv2d_reference, dynamic=False)
    return _compiled["fn"](x, w, b)


IMPLS = {"reference": pointwise_conv2d_reference, "reference-compiled": reference_compiled,
         "gemm": lambda x, w, b: torch._C._nn.thnn_conv2d(x, w, (1, 1), b, (1, 1), (0, 0))}
if unavailable_reason("cpu", "cpu") is None:
    IMPLS["cpu"] = lambda x, w, b: pointwise_conv2d(x, w, b, backend="cpu")


def op_cost(shape, mode):
    """(bytes, flops) the op must at least move and compute: the floor's inputs."""
    n, c_in, h, w, c_out = shape
    x, y = n * c_in * h * w * 4, n * c_out * h * w * 4
    flops = 2 * n * c_in * c_out * h * w
    if mode == "forward":
        return x + y, flops  # read x, write y
    return 2 * x + 2 * y, 3 * flops  # + read grad_y, write grad_x; grad_x and grad_w products


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"to{s[4]}")
def test_pointwise_conv2d(benchmark, shape, impl, mode):
    n, c_in, h, w, c_out = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c_in, h, w, generator=g)
    weight = torch.randn(c_out, c_in, 1, 1, generator=g) / c_in ** 0.5
    bias = torch.randn(c_out, generator=g)
    fn = IMPLS[impl]
    if mode == "forward":
        def run():
            with torch.no_grad():
                return fn(x, weight, bias)
    else:
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        grad_y = torch.randn(n, c_out, h, w, generator=g)

        def run():
            return torch.autograd.grad(fn(*leaves), leaves, grad_y)
    out = run()  # warm-up (and compilation for the compiled reference)
    if mode == "forward":  # what is timed must compute the right thing
        torch.testing.assert_close(out, F.conv2d(x, weight, bias), rtol=1e-4, atol=1e-4)
    nbytes, flops = op_cost(shape, mode)
    benchmark.extra_info.update(op="pointwise_conv2d", impl=impl, mode=mode,
                                shape=list(shape), bytes=nbytes,
                                flops=flops)
    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=1)
