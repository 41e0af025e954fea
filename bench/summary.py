"""Summary of a pytest-benchmark JSON file: per op, shape and mode, each implementation's time,
its speedup over the eager and compiled references, and the fraction of the op's floor reached.

    python bench/summary.py results.json [--bandwidth 22e9] [--flops 200e9]

The floor of an op is max(bytes / bandwidth, flops / flop_rate): each input read once and each
output written once at the machine's copy rate, or its arithmetic at the float32 matmul rate.
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
        rows[key][info["impl"]] = (b["stats"]["median"], info["bytes"], info["flops"],
                                   info.get("peak_bytes"))
    return data.get("machine_info", {}), rows


def table(rows, bandwidth, flop_rate):
    peaks = any(v[3] is not None for impls in rows.values() for v in impls.values())
    lines = ["| op | shape | mode | impl | median ms | vs reference | vs compiled | % of floor |"
             + (" peak MiB |" if peaks else ""),
             "|---|---|---|---|---:|---:|---:|---:|" + ("---:|" if peaks else "")]
    for (op, shape, mode), impls in sorted(rows.items()):
        ref = impls.get("reference", (None,))[0]
        comp = impls.get("reference-compiled", (None,))[0]
        for impl, (t, nbytes, flops, peak) in sorted(impls.items(), key=lambda kv: -kv[1][0]):
            floor = max(nbytes / bandwidth, flops / flop_rate)
            vs = lambda base: f"{base / t:.2f}×" if base else "–"  # noqa: E731
            lines.append(f"| {op} | {'×'.join(map(str, shape))} | {mode} | {impl} | {t * 1e3:.2f} | "
                         f"{vs(ref)} | {vs(comp)} | {100 * floor / t:.0f}% |"
                         + (f" {peak / 2**20:.1f} |" if peak is not None else (" – |" if peaks else "")))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", help="output of pytest --benchmark-json")
    p.add_argument("--bandwidth", type=float, default=22e9, help="memory copy rate, bytes/s")
    p.add_argument("--flops", type=float, default=200e9, help="float32 matmul rate, FLOP/s")
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
