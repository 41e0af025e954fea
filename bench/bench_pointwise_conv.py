"""pointwise_conv2d (1×1 convolution, NCHW) at LightAWNet's 1×1 convs: reference eager
(``F.conv2d``: oneDNN), reference compiled, ``gemm`` (ATen's ``thnn_conv2d``: one BLAS product
per sample, what ``PointwiseConv2d`` ran before the kernel) and the cpu kernel.

    .venv/bin/python -m pytest bench/bench_pointwise_conv.py --benchmark-json=pw.json
    .venv/bin/python bench/summary.py pw.json
    .venv/bin/python bench/bench_pointwise_conv.py --mode forward+backward   # interleaved, below

Shapes ``N×C_in×H×W×C_out`` (C_out last): the blocks' expansions (C → 4C), the side branches and the
decoders' reductions at batch-1 inference (256² input) and the expansions at the batch-8
training step (128² input). Modes: forward, and forward + backward (gradients of x, weight and
bias for a fixed random upstream gradient).

Run as a script, it times implementations interleaved in one process instead (every round runs
each once, in a rotating order; ratios per round), the way the 1.1–1.6× differences between the
kernel and the GEMMs can be told apart on a shared machine whose phases move a cell by 2×.
"""
import pytest
import torch
import torch.nn.functional as F

from compiled import compiled_on_first_call
from fastseg.backend import unavailable_reason
from fastseg.ops import pointwise_conv2d, pointwise_conv2d_reference

# (N, C_in, H, W, C_out)
SHAPES = [(1, 16, 128, 128, 64), (1, 32, 64, 64, 128), (1, 64, 32, 32, 256),
          (1, 128, 16, 16, 512), (1, 64, 32, 32, 128), (1, 32, 128, 128, 16),
          (1, 64, 64, 64, 32), (8, 16, 64, 64, 64), (8, 32, 32, 32, 128), (8, 64, 16, 16, 256)]

reference_compiled = compiled_on_first_call(pointwise_conv2d_reference)


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


def make_run(shape, impl, mode, calls=1):
    """A function of no arguments running ``impl`` on ``shape`` (``calls`` times) in ``mode``,
    with its inputs bound, and the forward output of a first call (for the checks)."""
    n, c_in, h, w, c_out = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c_in, h, w, generator=g)
    weight = torch.randn(c_out, c_in, 1, 1, generator=g) / c_in ** 0.5
    bias = torch.randn(c_out, generator=g)
    fn = IMPLS[impl]
    if mode == "forward":
        def run():
            with torch.no_grad():
                for _ in range(calls):
                    out = fn(x, weight, bias)
            return out
    else:
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        grad_y = torch.randn(n, c_out, h, w, generator=g)

        def run():
            for _ in range(calls):
                out = torch.autograd.grad(fn(*leaves), leaves, grad_y)
            return out
    with torch.no_grad():
        first = fn(x, weight, bias)  # warm-up (and compilation for the compiled reference)
    # what is timed must compute the right thing
    torch.testing.assert_close(first, F.conv2d(x, weight, bias), rtol=1e-4, atol=1e-4)
    return run


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"to{s[4]}")
def test_pointwise_conv2d(benchmark, shape, impl, mode):
    run = make_run(shape, impl, mode)
    run()
    nbytes, flops = op_cost(shape, mode)
    benchmark.extra_info.update(op="pointwise_conv2d", impl=impl, mode=mode, shape=list(shape),
                                bytes=nbytes, flops=flops)
    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=1)


def main(argv=None):
    """Interleaved: per shape, every round runs each implementation ``--calls`` times, in an order
    that rotates from round to round; prints each one's median per call and the median over
    rounds of its per-round ratio to the cpu kernel (``bench_pointwise_conv.py --help``)."""
    import argparse
    import statistics

    from interleave import interleaved_times, median_ratio
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["forward", "forward+backward"], default="forward")
    parser.add_argument("--impls", nargs="+", choices=list(IMPLS), default=["gemm", "cpu"])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--calls", type=int, default=3, help="calls per implementation and round")
    parser.add_argument("--shapes", type=int, nargs=5, action="append", metavar="N C_in H W C_out")
    args = parser.parse_args(argv)
    base = "cpu" if "cpu" in args.impls else args.impls[-1]
    print(f"pointwise_conv2d, {args.mode}, {args.rounds} interleaved rounds of {args.calls} calls, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| shape N×C_in×H×W → C_out | " + " | ".join(f"{i} ms" for i in args.impls)
          + " | " + " | ".join(f"{i} / {base}" for i in args.impls if i != base) + " |")
    print("|---|" + "---:|" * (2 * len(args.impls) - 1))
    for shape in [tuple(s) for s in args.shapes] if args.shapes else SHAPES:
        runs = {impl: make_run(shape, impl, args.mode, args.calls) for impl in args.impls}
        times = interleaved_times(runs, args.rounds)
        ms = [f"{statistics.median(times[i]) / args.calls * 1e3:.3f}" for i in args.impls]
        ratios = [f"{median_ratio(times, i, base):.2f}×" for i in args.impls if i != base]
        print(f"| {'×'.join(map(str, shape[:4]))} → {shape[4]} | " + " | ".join(ms + ratios) + " |")


if __name__ == "__main__":
    main()
