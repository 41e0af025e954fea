"""Summary of a pytest-benchmark JSON file: per op, shape and mode, each implementation's time,
its speedup over the eager and compiled references, and the fraction of the op's floor reached.

    python bench/summary.py results.json [--bandwidth 22e9] [--flops 200e9]

The floor of an op is max(bytes / bandwidth, flops / flop_rate): each input read once and each
output written once at the machine's copy rate, or its arithmetic at the float32 matmul rate.
Peak memory, where a benchmark recorded it, in the column of its kind: ``peak_bytes`` (the most
memory the call held at once beyond its inputs, from the profiler's allocation events: the
attention gates) as "peak MiB held", ``peak_mb`` (peak resident set size of a fresh process
running one call, minus that of one that only builds the inputs: bench/peak_memory.py) as
"peak MB RSS".
"""
import argparse
import json
import sys
from collections import defaultdict


def load(path):
    with open(path) as f:
        data = json.load(f)
    rows = defaultdict(dict)
    for b in data["benchmarks"]:
        info = b["extra_info"]
        if "impl" not in info:
            continue
        key = (info["op"], tuple(info["shape"]), info["mode"])
        held = info.get("peak_bytes")
        rows[key][info["impl"]] = (b["stats"]["median"], info["bytes"], info["flops"],
                                   (held / 2**20 if held is not None else None, info.get("peak_mb")))
    return data.get("machine_info", {}), rows


# This machine's rates (the defaults of --bandwidth and --flops; interleaved_gates.py uses them too)
BANDWIDTH = 22e9  # memory copy rate, bytes/s
FLOP_RATE = 200e9  # float32 matmul rate, FLOP/s


def floor_seconds(nbytes, flops, bandwidth=BANDWIDTH, flop_rate=FLOP_RATE):
    """The floor of an op: max(bytes / bandwidth, flops / flop_rate), in seconds."""
    return max(nbytes / bandwidth, flops / flop_rate)


# The peak-memory columns: (header, index into a row's peaks)
PEAK_COLUMNS = (("peak MiB held", 0), ("peak MB RSS", 1))


def table(rows, bandwidth, flop_rate):
    shown = [(head, i) for head, i in PEAK_COLUMNS
             if any(v[3][i] is not None for impls in rows.values() for v in impls.values())]
    lines = ["| op | shape | mode | impl | median ms | vs reference | vs compiled | % of floor |"
             + "".join(f" {head} |" for head, _ in shown),
             "|---|---|---|---|---:|---:|---:|---:|" + "---:|" * len(shown)]
    for (op, shape, mode), impls in sorted(rows.items()):
        ref = impls.get("reference", (None,))[0]
        comp = impls.get("reference-compiled", (None,))[0]
        for impl, (t, nbytes, flops, peaks) in sorted(impls.items(), key=lambda kv: -kv[1][0]):
            floor = floor_seconds(nbytes, flops, bandwidth, flop_rate)
            vs = lambda base: f"{base / t:.2f}×" if base else "–"  # noqa: E731
            lines.append(f"| {op} | {'×'.join(map(str, shape))} | {mode} | {impl} | {t * 1e3:.2f} | "
                         f"{vs(ref)} | {vs(comp)} | {100 * floor / t:.0f}% |"
                         + "".join(f" {peaks[i]:.1f} |" if peaks[i] is not None else " – |"
                                   for _, i in shown))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", help="output of pytest --benchmark-json")
    p.add_argument("--bandwidth", type=float, default=BANDWIDTH, help="memory copy rate, bytes/s")
    p.add_argument("--flops", type=float, default=FLOP_RATE, help="float32 matmul rate, FLOP/s")
    args = p.parse_args(argv)
    machine, rows = load(args.json)
    if not rows:
        print(f"{args.json}: no op benchmarks found", file=sys.stderr)
        return 1
    cpu = machine.get("cpu", {}).get("brand_raw", "unknown CPU")
    print(f"machine: {cpu}, {machine.get('cpu', {}).get('count', '?')} logical cores; "
          f"floor at {args.bandwidth / 1e9:.0f} GB/s, {args.flops / 1e9:.0f} GFLOP/s\n")
    print(table(rows, args.bandwidth, args.flops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
