"""max_pool2x2 (2×2 max pooling, stride 2) at the models' NCHW shapes: reference eager
(``F.max_pool2d``), reference compiled, the cpu kernel.

    .venv/bin/python -m pytest bench/bench_max_pool.py --benchmark-json=pool.json
    .venv/bin/python bench/summary.py pool.json

Shapes: LightAWNet's pooled tensors at batch 8 and 128² input (16 channels at 128², 32 at 64²)
and at batch 1 and 256² input (16 at 256², 32 at 128², 64 at 64²), plus 64 at 32² (rows of 16
outputs: the kernel's short-row path). Modes: forward, and forward +
backward (the gradient of x for a fixed random upstream gradient).
"""
import pytest
import torch
import torch.nn.functional as F

from compiled import compiled_on_first_call
from fastseg.backend import unavailable_reason
from fastseg.ops import max_pool2x2, max_pool2x2_reference

SHAPES = [(8, 16, 128, 128), (8, 32, 64, 64), (8, 64, 32, 32), (1, 16, 256, 256),
          (1, 32, 128, 128), (1, 64, 64, 64)]

reference_compiled = compiled_on_first_call(max_pool2x2_reference)


IMPLS = {"reference": max_pool2x2_reference, "reference-compiled": reference_compiled}
if unavailable_reason("cpu", "cpu") is None:
    IMPLS["cpu"] = lambda x: max_pool2x2(x, backend="cpu")


def op_cost(shape, mode):
    """(bytes, flops) the op must at least move and compute: the floor's inputs."""
    tensor = shape[0] * shape[1] * shape[2] * shape[3] * 4
    if mode == "forward":
        return tensor + tensor // 4, 0  # read x, write y
    return 2 * tensor + tensor // 2, 0  # + read grad_y, write grad_x (and the forward's index)


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_max_pool2x2(benchmark, shape, impl, mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    fn = IMPLS[impl]
    if mode == "forward":
        def run():
            with torch.no_grad():
                return fn(x)
    else:
        leaf = x.clone().requires_grad_()
        grad_y = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, generator=g)

        def run():
            return torch.autograd.grad(fn(leaf), leaf, grad_y)[0]
    out = run()  # warm-up (and compilation for the compiled reference)
    if mode == "forward":  # what is timed must compute the right thing
        assert torch.equal(out, F.max_pool2d(x, 2))
    nbytes, flops = op_cost(shape, mode)
    benchmark.extra_info.update(op="max_pool2x2", impl=impl, mode=mode, shape=list(shape),
                                bytes=nbytes, flops=flops)
    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=1)
