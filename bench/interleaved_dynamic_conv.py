"""dynamic_conv2d at LightAWNet's shapes, implementations interleaved in one process: per shape,
every round runs each implementation once, in an order that rotates from round to round, so a
slow phase of the (shared, 2-core) machine hits all of them alike (``bench_dynamic_conv.py`` runs
each implementation's rounds one after another, and its cells move by up to 2× between runs).
Prints, per shape, each implementation's median and the median over rounds of its per-round
ratio to the static conv (the cost floor of the idea: issue 8's "within 1.15×" target) and to
the cpu backend.

    .venv/bin/python bench/interleaved_dynamic_conv.py                      # forward+backward
    .venv/bin/python bench/interleaved_dynamic_conv.py --mode forward --rounds 21
    .venv/bin/python bench/interleaved_dynamic_conv.py --impls static-conv reference cpu
    .venv/bin/python bench/interleaved_dynamic_conv.py --shapes 1x16x256x256 1x64x64x64
    .venv/bin/python bench/interleaved_dynamic_conv.py --impls static-conv cpu cpu-direct3x3 cpu-winograd3x3
    .venv/bin/python bench/interleaved_dynamic_conv.py --mode forward --shapes 1x128x256x16x16 \
        --impls static-conv cpu cpu-gemm-plan cpu-direct3x3

``--calls N`` (N > 1) times each implementation's steady state: every round runs it once untimed
and then N times back to back, and records the mean of those N. With the default, one call a
round, each call starts on the caches the other implementations left (as it would between the
other layers of a network), which costs the implementations that read more memory more.
    .venv/bin/python bench/interleaved_dynamic_conv.py --calls 3 --rounds 9
``--retain-freed-memory`` calls ``fastseg.retain_freed_memory()`` first, so that no
implementation pays for fresh pages: by default the grouped reference's per-sample kernels and
their gradients are fresh mappings on most calls (thousands of page faults per call at 256
channels), and its time moves with them.
    .venv/bin/python bench/interleaved_dynamic_conv.py --retain-freed-memory
``--floor`` adds two timings that are not the op, to show how much of the gap to the static conv
the per-sample kernels bring by themselves here: ``products``, the per-sample products alone
(batched BLAS GEMMs on operands made beforehand: forward y_n = W_n · col_n; backward also
gW_n = gy_n · col_nᵀ and W_nᵀ · gy_n, with W_n [C_out, C_in·9] and col_n [C_in·9, H·W]: the
FLOPs of the static conv, at the BLAS's rate for one sample's shapes; no mixing, im2col, col2im or
reductions), and ``expert-traffic``, the memory traffic the experts themselves cause (forward:
reading them once; forward + backward: twice, and writing a tensor of their size, grad_experts),
each printed with its ratio to the static conv, and their sum's ("floor / static", per round):
what the op would take were that traffic not overlapped with the products. Neither is a bound
on a fused implementation: the products read per-sample kernels from memory, which the cpu
backend never writes there (it mixes them in cache-sized blocks).

    .venv/bin/python bench/interleaved_dynamic_conv.py --floor --impls static-conv cpu \
        --shapes 8x128x16x16 8x256x8x8 8x256x16x16

``--experts K`` sets the number of experts (default 4): with one, the cpu backend still mixes
(one routing weight) and keeps per-sample kernels, but moves no more kernel memory than the static
conv, so ``--experts 1`` against the default separates what the experts' number costs from what
the per-sample kernels cost by themselves.

    .venv/bin/python bench/interleaved_dynamic_conv.py --experts 1 --impls static-conv cpu

``cpu-direct3x3`` and ``cpu-winograd3x3`` are the cpu backend with its folded plan's 3×3
convolutions forced to one algorithm (``FASTSEG_DYNAMIC_CONV_CPU_3X3``), ``cpu-gemm-plan`` with
its gemm plan forced (``FASTSEG_DYNAMIC_CONV_CPU_PLAN``), each set for the whole call, backward
included; ``cpu`` picks by shape. A shape of five sizes, NxC_inxC_outxHxW, has different input
and output channel counts.

Shapes, inputs and implementations as in ``bench_dynamic_conv.py`` (batch 8, K = 4 experts of
3×3 unless ``--experts`` says otherwise); compiled implementations are compiled before the first
round.
"""
import argparse
import os
import statistics

import torch

from bench_dynamic_conv import EXPERTS, IMPLS, SHAPES, make_run
from fastseg.memory import retain_freed_memory
from interleave import interleaved_times, median_ratio


# the cpu backend with a plan or algorithm forced: impl → (variable, value)
FORCED = {"cpu-direct3x3": ("FASTSEG_DYNAMIC_CONV_CPU_3X3", "direct"),
          "cpu-winograd3x3": ("FASTSEG_DYNAMIC_CONV_CPU_3X3", "winograd"),
          "cpu-gemm-plan": ("FASTSEG_DYNAMIC_CONV_CPU_PLAN", "gemm")}


def make_forced_run(impl, shape, mode, c_out=None, experts=EXPERTS):
    """make_run's cpu run with the impl's environment variable set around every call."""
    run = make_run("cpu", shape, mode, c_out, experts)
    variable, value = FORCED[impl]

    def forced():
        os.environ[variable] = value
        try:
            run()
        finally:
            del os.environ[variable]
    return forced


def make_floor_run(name, shape, mode, c_out, experts=EXPERTS):
    """A run of one of the ``--floor`` timings (see the module's docstring) at `shape`: the
    per-sample ``products`` or the ``expert-traffic``."""
    N, C, H, W = shape
    R, P = C * 9, H * W
    g = torch.Generator().manual_seed(0)
    if name == "products":
        w, col, gy = (torch.randn(size, generator=g) for size in
                      [(N, c_out, R), (N, R, P), (N, c_out, P)])
        y, gw, gcol = torch.empty(N, c_out, P), torch.empty(N, c_out, R), torch.empty(N, R, P)

        def run():
            torch.bmm(w, col, out=y)
            if mode != "forward":
                torch.bmm(gy, col.transpose(1, 2), out=gw)
                torch.bmm(w.transpose(1, 2), gy, out=gcol)
        return run
    kernels = torch.randn(experts, c_out, R, generator=g)
    grad = torch.empty_like(kernels)

    def run():
        kernels.sum()  # the forward's read
        if mode != "forward":
            kernels.sum()  # the backward's read
            grad.fill_(1.0)  # and its write of grad_experts
    return run


FLOOR = ["products", "expert-traffic"]


def with_c_out(shape):
    """(N, C, H, W) → (N, C, C, H, W): C_out = C_in."""
    return shape[:2] + shape[1:]


def parse_shape(text):
    """``"8x16x128x128"`` → ``(8, 16, 16, 128, 128)`` (N, C_in, C_out, H, W); five sizes give
    C_out."""
    try:
        shape = tuple(int(v) for v in text.split("x"))
    except ValueError:
        shape = ()
    if len(shape) not in (4, 5) or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"a shape is NxCxHxW or NxC_inxC_outxHxW with positive sizes, got {text!r}")
    return shape if len(shape) == 5 else with_c_out(shape)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["forward", "forward+backward"],
                        default="forward+backward")
    parser.add_argument("--impls", nargs="+", choices=list(IMPLS) + list(FORCED),
                        default=["static-conv", "reference", "reference-compiled", "cpu"])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--calls", type=int, default=1,
                        help="timed calls per implementation and round, after one untimed call "
                             "when more than 1: steady state on caches the implementation filled "
                             "itself (default 1: each call starts on what the others left)")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="call fastseg.retain_freed_memory() first: no implementation pays "
                             "for fresh pages (the grouped reference's per-sample kernels)")
    parser.add_argument("--floor", action="store_true",
                        help="also time the per-sample products and the experts' memory traffic "
                             "alone (see the module's docstring)")
    parser.add_argument("--experts", type=int, default=EXPERTS,
                        help=f"K, the number of experts (default {EXPERTS}, LightAWNet's); the "
                             f"static conv is the first one's")
    parser.add_argument("--shapes", nargs="+", metavar="NxCxHxW", type=parse_shape,
                        default=[with_c_out(s) for s in SHAPES],
                        help="default: LightAWNet's, as in bench_dynamic_conv.py")
    args = parser.parse_args(argv)
    if "static-conv" not in args.impls or "cpu" not in args.impls:
        parser.error("--impls must include static-conv and cpu (the ratios are to them)")
    if args.experts < 1:
        parser.error(f"--experts must be at least 1, got {args.experts}")
    if args.calls < 1:
        parser.error(f"--calls must be at least 1, got {args.calls}")
    retained = args.retain_freed_memory and retain_freed_memory()
    if args.retain_freed_memory and not retained:
        parser.error("--retain-freed-memory needs Linux with glibc")
    calls = ("one call" if args.calls == 1 else
             f"one untimed call and the mean of {args.calls} timed ones")
    print(f"dynamic_conv2d, K = {args.experts} experts, {args.mode}, {args.rounds} interleaved "
          f"rounds per shape ({calls} per "
          f"implementation and round{', freed memory retained' if retained else ''}), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; median ms, and in brackets the "
          f"median over rounds of the per-round ratio\n")
    others = [i for i in args.impls if i not in ("static-conv", "cpu")]
    header = ["C → C at H×W", "static conv ms", "cpu ms", "cpu / static"]
    header += [f"{i} ms (/ cpu)" for i in others]
    if args.floor:
        header += [f"{i} ms (/ static)" for i in FLOOR] + ["floor / static"]
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for shape in args.shapes:
        N, c_in, c_out, H, W = shape
        runs = {impl: (make_forced_run if impl in FORCED else make_run)(
            impl, (N, c_in, H, W), args.mode, c_out, args.experts) for impl in args.impls}
        if args.floor:
            runs.update({f: make_floor_run(f, (N, c_in, H, W), args.mode, c_out, args.experts)
                         for f in FLOOR})
        times = interleaved_times(runs, args.rounds, args.calls)

        def ms(impl):
            return statistics.median(times[impl]) * 1e3

        channels = f"{c_in}" if c_in == c_out else f"{c_in} → {c_out}"
        cells = [f"{channels} at {H}×{W} (batch {N})",
                 f"{ms('static-conv'):.2f}", f"{ms('cpu'):.2f}",
                 f"{median_ratio(times, 'cpu', 'static-conv'):.2f}×"]
        cells += [f"{ms(i):.2f} ({median_ratio(times, i, 'cpu'):.2f}×)" for i in others]
        if args.floor:
            cells += [f"{ms(i):.2f} ({median_ratio(times, i, 'static-conv'):.2f}×)" for i in FLOOR]
            floor = statistics.median((a + b) / s for a, b, s in zip(
                times["products"], times["expert-traffic"], times["static-conv"]))
            cells.append(f"{floor:.2f}×")
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
