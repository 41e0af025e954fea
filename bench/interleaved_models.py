"""Training-step or inference time of the seed models, implementations interleaved in one
process: every round runs one step of each implementation, in an order that rotates from round to
round, so that a slow phase of the (shared, 2-core) machine hits all of them alike. Prints each
implementation's median and min, and the median over rounds of its per-round speedup against
the first implementation (the reference).

    .venv/bin/python bench/interleaved_models.py --model lgmsnet --size 128 --rounds 9
    .venv/bin/python bench/interleaved_models.py --model lgmsnet --mode inference --batch 1 --size 256 \\
        --impls reference cpu cpu-folded
    .venv/bin/python bench/interleaved_models.py --model lgmsnet --size 128 \\
        --impls reference reference-compiled cpu --against reference-compiled

``--against IMPL`` adds a column: each implementation's per-round speedup over IMPL, median over
rounds (issue 11's "≥ 1.3× the compiled reference" is that column with ``--against
reference-compiled``; the ratio of two medians of the first column only approximates it).

Implementations as in ``bench_models.py`` (the same weights, inputs and step), plus the layout
variants of its ``make_step``: ``reference-channels-last`` and ``cpu-nchw``. Compiled ones are
compiled before the first round. ``FASTSEG_RETAIN_FREED_MEMORY=1`` as in ``bench_models.py``.
"""
import argparse
import statistics

import torch

from bench_models import MODELS, RETAINED, make_step
from interleave import interleaved_times, median_ratio


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(MODELS), default="lgmsnet")
    parser.add_argument("--mode", choices=["train", "inference"], default="train")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--impls", nargs="+",
                        default=["reference", "reference-channels-last", "cpu-nchw", "cpu"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--against", metavar="IMPL",
                        help="one of --impls: add a column of speedups over it (median of rounds)")
    args = parser.parse_args(argv)
    if args.against is not None and args.against not in args.impls:
        parser.error(f"--against {args.against!r} must be one of --impls {args.impls}")
    steps = {impl: make_step(args.model, impl, args.mode, args.batch, args.size) for impl in args.impls}
    times = interleaved_times(steps, args.rounds)
    print(f"{args.model}, {args.mode} {args.batch}×{args.size}², {args.rounds} interleaved rounds, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'freed memory retained' if RETAINED else 'default allocator settings'}\n")
    bases = [args.impls[0]] + ([args.against] if args.against else [])
    print("| impl | median ms | min ms | "
          + " | ".join(f"speedup vs {b} (median of rounds)" for b in bases) + " |")
    print("|---|---:|---:|" + "---:|" * len(bases))
    for impl in args.impls:
        ratios = " | ".join(f"{median_ratio(times, b, impl):.2f}×" for b in bases)
        print(f"| {impl} | {statistics.median(times[impl]) * 1e3:.1f} | {min(times[impl]) * 1e3:.1f} "
              f"| {ratios} |")


if __name__ == "__main__":
    main()
