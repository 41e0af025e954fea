"""The attention gates at LightAWNet's shapes, implementations interleaved in one process: per
case, every round runs each implementation once, in an order that rotates from round to round, so
a slow phase of the (shared, 2-core) machine hits all of them alike (``bench_attention_gates.py``
runs each implementation's rounds one after another, and its cells move by up to 2× between
runs). Prints, per case, each implementation's median and, for the cpu backend, the median over
rounds of the per-round ratio of the eager and the compiled reference's time to its own: issue
10's targets (≥ 3× and ≥ 1.5×). ``floor ms`` is the case's time at the machine's rates (as in
``summary.py``: the bytes it must move at ``--bandwidth``, its 1×1 products at ``--flops``,
whichever is longer), and with both references run, ``targets ms`` is the longest time that meets
both targets, min(eager / 3, compiled / 1.5), with its ratio to the floor: below 1×, the targets
ask for more than the floor's rates. A second table sums each op's medians over the stages run:
with every case, the time that one pass of LightAWNet at batch 8 spends in that op, per
implementation.

    .venv/bin/python bench/interleaved_gates.py                         # every case, fwd+bwd
    .venv/bin/python bench/interleaved_gates.py --cases cross_gate spatial_gate-8x256 --rounds 21
    .venv/bin/python bench/interleaved_gates.py --mode forward --impls reference cpu

Cases, inputs and implementations as in ``bench_attention_gates.py``; ``--cases`` keeps those
whose ``op-shape`` label starts with one of the given prefixes. Compiled implementations are
compiled before the first round.
"""
import argparse
import statistics

import torch

from bench_attention_gates import CASES, IMPLS, make_run, op_bytes, op_flops
from interleave import interleaved_times, median_ratio
from summary import BANDWIDTH, FLOP_RATE, floor_seconds

LABELS = [f"{name}-{shape}" for name, shape, _ in CASES]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["forward", "forward+backward"],
                        default="forward+backward")
    parser.add_argument("--impls", nargs="+", choices=IMPLS,
                        default=["reference", "reference-compiled", "cpu"])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--cases", nargs="+", metavar="PREFIX",
                        help="label prefixes, e.g. cross_gate or spatial_gate-8x256 (default: all)")
    parser.add_argument("--bandwidth", type=float, default=BANDWIDTH,
                        help="memory copy rate, bytes/s")
    parser.add_argument("--flops", type=float, default=FLOP_RATE, help="float32 matmul rate, FLOP/s")
    args = parser.parse_args(argv)
    if "cpu" not in args.impls:
        parser.error("--impls must include cpu (the ratios are of its time)")
    chosen = [i for i, label in enumerate(LABELS)
              if not args.cases or label.startswith(tuple(args.cases))]
    if not chosen:
        parser.error(f"no case starts with {args.cases}; cases: {', '.join(LABELS)}")
    print(f"attention gates, {args.mode}, {args.rounds} interleaved rounds per case, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; median ms, and in brackets the "
          f"median over rounds of the per-round ratio of that implementation's time to cpu's\n")
    others = [i for i in args.impls if i != "cpu"]
    targets = "reference" in args.impls and "reference-compiled" in args.impls
    print("| op | shape | cpu ms | " + " | ".join(f"{i} ms (/ cpu)" for i in others)
          + " | floor ms |" + (" targets ms (/ floor) |" if targets else ""))
    print("|---|---|---:|" + "---:|" * (len(others) + 1 + targets))
    medians = {}  # op → [{impl: median ms} per stage]
    for index in chosen:
        name, shape, _ = CASES[index]
        runs = {impl: make_run(index, impl, args.mode) for impl in args.impls}
        _, expected, inputs = runs["cpu"]
        floor = floor_seconds(op_bytes(inputs, expected.numel(), args.mode),
                              op_flops(name, inputs, args.mode), args.bandwidth, args.flops) * 1e3
        times = interleaved_times({impl: run for impl, (run, _, _) in runs.items()}, args.rounds)

        def ms(impl):
            return statistics.median(times[impl]) * 1e3

        cells = [name, shape, f"{ms('cpu'):.2f}"]
        cells += [f"{ms(i):.2f} ({median_ratio(times, i, 'cpu'):.2f}×)" for i in others]
        cells.append(f"{floor:.2f}")
        if targets:
            allowed = min(ms("reference") / 3, ms("reference-compiled") / 1.5)
            cells.append(f"{allowed:.2f} ({allowed / floor:.2f}×)")
        print("| " + " | ".join(cells) + " |", flush=True)
        medians.setdefault(name, []).append({impl: ms(impl) for impl in args.impls})
    print(f"\nPer op, the medians above summed over its stages (ms), and in brackets that sum's "
          f"ratio to cpu's\n")
    print("| op | stages | cpu ms | " + " | ".join(f"{i} ms (/ cpu)" for i in others) + " |")
    print("|---|---:|---:|" + "---:|" * len(others))
    for name, stages in medians.items():
        total = op_total(stages)
        cells = [name, str(len(stages)), f"{total['cpu']:.2f}"]
        cells += [f"{total[i]:.2f} ({total[i] / total['cpu']:.2f}×)" for i in others]
        print("| " + " | ".join(cells) + " |")


def op_total(stages):
    """``[{impl: ms}, ...]`` (one dict per stage) → ``{impl: Σ ms over the stages}``."""
    return {impl: sum(stage[impl] for stage in stages) for impl in stages[0]}


if __name__ == "__main__":
    main()
