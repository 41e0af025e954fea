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

``cpu-direct3x3`` and ``cpu-winograd3x3`` are the cpu backend with its folded plan's 3×3
convolutions forced to one algorithm (``FASTSEG_DYNAMIC_CONV_CPU_3X3``, set for the whole call,
backward included); ``cpu`` picks by shape.

Shapes, inputs and implementations as in ``bench_dynamic_conv.py`` (batch 8, K = 4 experts of
3×3); compiled implementations are compiled before the first round.
"""
import argparse
import os
import statistics

import torch

from bench_dynamic_conv import IMPLS, SHAPES, make_run
from interleave import interleaved_times, median_ratio


ALGORITHMS = {"cpu-direct3x3": "direct", "cpu-winograd3x3": "winograd"}


def make_run_3x3(impl, shape, mode):
    """make_run's cpu run with FASTSEG_DYNAMIC_CONV_CPU_3X3 set to the impl's algorithm."""
    run = make_run("cpu", shape, mode)

    def forced():
        os.environ["FASTSEG_DYNAMIC_CONV_CPU_3X3"] = ALGORITHMS[impl]
        try:
            run()
        finally:
            del os.environ["FASTSEG_DYNAMIC_CONV_CPU_3X3"]
    return forced


def parse_shape(text):
    """``"8x16x128x128"`` → ``(8, 16, 128, 128)``."""
    try:
        shape = tuple(int(v) for v in text.split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"a shape is NxCxHxW with positive sizes, got {text!r}")
    return shape


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["forward", "forward+backward"],
                        default="forward+backward")
    parser.add_argument("--impls", nargs="+", choices=list(IMPLS) + list(ALGORITHMS),
                        default=["static-conv", "reference", "reference-compiled", "cpu"])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--shapes", nargs="+", metavar="NxCxHxW", type=parse_shape,
                        default=SHAPES, help="default: LightAWNet's, as in bench_dynamic_conv.py")
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
        times = interleaved_times({impl: (make_run_3x3 if impl in ALGORITHMS else make_run)(
            impl, shape, args.mode) for impl in args.impls}, args.rounds)

        def ms(impl):
            return statistics.median(times[impl]) * 1e3

        cells = [f"{shape[1]} at {shape[2]}×{shape[3]} (batch {shape[0]})",
                 f"{ms('static-conv'):.2f}", f"{ms('cpu'):.2f}",
                 f"{median_ratio(times, 'cpu', 'static-conv'):.2f}×"]
        cells += [f"{ms(i):.2f} ({median_ratio(times, i, 'cpu'):.2f}×)" for i in others]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
