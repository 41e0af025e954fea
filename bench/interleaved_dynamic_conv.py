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

``cpu-direct3x3`` and ``cpu-winograd3x3`` are the cpu backend with its folded plan's 3×3
convolutions forced to one algorithm (``FASTSEG_DYNAMIC_CONV_CPU_3X3``), ``cpu-gemm-plan`` with
its gemm plan forced (``FASTSEG_DYNAMIC_CONV_CPU_PLAN``), each set for the whole call, backward
included; ``cpu`` picks by shape. A shape of five sizes, NxC_inxC_outxHxW, has different input
and output channel counts.

Shapes, inputs and implementations as in ``bench_dynamic_conv.py`` (batch 8, K = 4 experts of
3×3); compiled implementations are compiled before the first round.
"""
import argparse
import os
import statistics

import torch

from bench_dynamic_conv import IMPLS, SHAPES, make_run
from interleave import interleaved_times, median_ratio


# the cpu backend with a plan or algorithm forced: impl → (variable, value)
FORCED = {"cpu-direct3x3": ("FASTSEG_DYNAMIC_CONV_CPU_3X3", "direct"),
          "cpu-winograd3x3": ("FASTSEG_DYNAMIC_CONV_CPU_3X3", "winograd"),
          "cpu-gemm-plan": ("FASTSEG_DYNAMIC_CONV_CPU_PLAN", "gemm")}


def make_forced_run(impl, shape, mode, c_out=None):
    """make_run's cpu run with the impl's environment variable set around every call."""
    run = make_run("cpu", shape, mode, c_out)
    variable, value = FORCED[impl]

    def forced():
        os.environ[variable] = value
        try:
            run()
        finally:
            del os.environ[variable]
    return forced


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
    parser.add_argument("--shapes", nargs="+", metavar="NxCxHxW", type=parse_shape,
                        default=[with_c_out(s) for s in SHAPES],
                        help="default: LightAWNet's, as in bench_dynamic_conv.py")
    args = parser.parse_args(argv)
    if "static-conv" not in args.impls or "cpu" not in args.impls:
        parser.error("--impls must include static-conv and cpu (the ratios are to them)")
    print(f"dynamic_conv2d, {args.mode}, {args.rounds} interleaved rounds per shape, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; median ms, and in brackets the "
          f"median over rounds of the per-round ratio\n")
    others = [i for i in args.impls if i not in ("static-conv", "cpu")]
    header = ["C → C at H×W", "static conv ms", "cpu ms", "cpu / static"]
    print("| " + " | ".join(header + [f"{i} ms (/ cpu)" for i in others]) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(others))
    for shape in args.shapes:
        N, c_in, c_out, H, W = shape
        times = interleaved_times({impl: (make_forced_run if impl in FORCED else make_run)(
            impl, (N, c_in, H, W), args.mode, c_out) for impl in args.impls}, args.rounds)

        def ms(impl):
            return statistics.median(times[impl]) * 1e3

        channels = f"{c_in}" if c_in == c_out else f"{c_in} → {c_out}"
        cells = [f"{channels} at {H}×{W} (batch {N})",
                 f"{ms('static-conv'):.2f}", f"{ms('cpu'):.2f}",
                 f"{median_ratio(times, 'cpu', 'static-conv'):.2f}×"]
        cells += [f"{ms(i):.2f} ({median_ratio(times, i, 'cpu'):.2f}×)" for i in others]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
