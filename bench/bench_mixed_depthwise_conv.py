"""mixed_depthwise_conv2d at LGMSNet's shapes: reference eager, reference compiled, fused kernels.

    .venv/bin/python -m pytest bench/bench_mixed_depthwise_conv.py --benchmark-json=mdc.json
    .venv/bin/python bench/summary.py mdc.json

Shapes: batch 8; C=16 at 128² and 256² (encoder stages 1–2), C=32 at 64² and 128² (stage 3),
kernels (3, 5, 7, 9) on four equal channel groups; NCHW, and channels-last (op
``mixed_depthwise_conv2d[cl]``, the layout LGMSNet's fused model computes in on CPUs) for the
first three. Modes: forward, and forward + backward (the
gradient of a fixed random upstream gradient with respect to x, weights and biases).
Implementations: ``reference`` (split → 4 convs → concat), ``reference-compiled`` (the same under
``torch.compile``), ``padded-dwconv`` (one depthwise conv with every kernel zero-padded to 9×9,
the other common formulation) and each fused backend that runs here.
"""
import pytest
import torch
import torch.nn.functional as F

from compiled import compiled_on_first_call
import fastseg
from fastseg.ops import mixed_depthwise_conv2d, mixed_depthwise_conv2d_reference

KERNELS = (3, 5, 7, 9)
SHAPES = [(8, 16, 128, 128), (8, 16, 256, 256), (8, 32, 64, 64), (8, 32, 128, 128)]
# (shape, channels-last)
CASES = [(s, False) for s in SHAPES] + [(s, True) for s in SHAPES[:3]]


def padded_dwconv(x, weights, biases, residual=False):
    kmax = max(w.shape[-1] for w in weights)
    weight = torch.cat([F.pad(w, [(kmax - w.shape[-1]) // 2] * 4) for w in weights])
    y = F.conv2d(x, weight, torch.cat(biases), padding=kmax // 2, groups=x.shape[1])
    return y + x if residual else y


reference_compiled = compiled_on_first_call(mixed_depthwise_conv2d_reference)


IMPLS = {
    "reference": mixed_depthwise_conv2d_reference,
    "reference-compiled": reference_compiled,
    "padded-dwconv": padded_dwconv,
}
for _name in fastseg.available_backends("cpu"):
    if _name not in ("reference", "triton"):  # triton runs on CPU only in its (slow) interpreter
        IMPLS[_name] = (lambda b: lambda x, w, bi, r=False: mixed_depthwise_conv2d(x, w, bi, r, backend=b))(_name)


def op_cost(shape, mode):
    """(bytes, flops) that the op must at least move and compute: the floor's inputs."""
    N, C, H, W = shape
    tensor = N * C * H * W * 4
    taps = sum(k * k for k in KERNELS) * (C // len(KERNELS))  # Σ_g C_g k_g²
    flops = 2 * taps * N * H * W
    if mode == "forward":
        return 2 * tensor, flops  # read x, write y
    return 5 * tensor, 3 * flops  # + read x and grad_y, write grad_x; grad_x and grad_w cost a forward each


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: "x".join(map(str, c[0])) + ("-cl" if c[1] else ""))
def test_mixed_depthwise_conv2d(benchmark, case, impl, mode):
    shape, channels_last = case
    g = torch.Generator().manual_seed(0)
    C = shape[1]
    x = torch.randn(shape, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weights = [torch.randn(C // 4, 1, k, k, generator=g) * 0.1 for k in KERNELS]
    biases = [torch.randn(C // 4, generator=g) for _ in KERNELS]
    fn = IMPLS[impl]
    if mode == "forward":
        def run():
            with torch.no_grad():
                return fn(x, weights, biases)
    else:
        leaves = [t.clone().requires_grad_() for t in [x, *weights, *biases]]
        grad_y = torch.randn(shape, generator=g)
        if channels_last:
            grad_y = grad_y.contiguous(memory_format=torch.channels_last)

        def run():
            y = fn(leaves[0], leaves[1:5], leaves[5:])
            return torch.autograd.grad(y, leaves, grad_y)
    out = run()  # warm-up (and compilation for the compiled reference)
    expected = mixed_depthwise_conv2d_reference(x, weights, biases)
    if mode == "forward":  # what is timed must compute the right thing
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    nbytes, flops = op_cost(shape, mode)
    if mode != "forward" and impl not in ("reference", "reference-compiled", "padded-dwconv"):
        # the fused op computes in x's layout and returns grad_x in it
        assert out[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    benchmark.extra_info.update(op="mixed_depthwise_conv2d" + ("[cl]" if channels_last else ""),
                                impl=impl, mode=mode,
                                shape=list(shape), bytes=nbytes, flops=flops)
    benchmark.pedantic(run, rounds=7, iterations=1, warmup_rounds=1)
