"""Command line: ``fastseg info | bench | data inspect`` (also ``python -m fastseg ...``)."""
from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    import torch

    import fastseg
    from fastseg.backend import BACKENDS, unavailable_reason

    print(f"fastseg {fastseg.__version__}, torch {torch.__version__}")
    for device in ("cpu", "cuda"):
        for name in BACKENDS:
            why = unavailable_reason(name, device)
            print(f"  {device:4s} {name:9s} {'available' if why is None else 'unavailable: ' + why}")
    return 0


def _bench(args) -> int:
    import subprocess
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    if not (bench / "summary.py").exists():
        print(f"fastseg bench runs from a checkout: {bench} not found", file=sys.stderr)
        return 2
    out = Path(args.json).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           *[str(bench / f"bench_{op}.py") for op in args.ops], f"--benchmark-json={out}"]
    if args.k:
        cmd += ["-k", args.k]
    print("$ " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=bench.parent)
    if rc != 0:
        return rc
    sys.path.insert(0, str(bench))
    from summary import main as summary

    return summary([str(out)])


def _data(args) -> int:
    from fastseg.data.inspect import run_inspect

    return run_inspect(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions and which backends can run here")
    p.set_defaults(func=_info)
    p = sub.add_parser("bench", help="time the fused ops against the references; print ratios")
    p.add_argument("--ops", nargs="+", default=["mixed_depthwise_conv"],
                   help="op families to time (files bench/bench_<op>.py)")
    p.add_argument("-k", default=None, help="pytest -k expression selecting cases")
    p.add_argument("--json", default=".benchmarks/ops.json", help="where to write the raw results")
    p.set_defaults(func=_bench)
    p = sub.add_parser("data", help="inspect a dataset folder")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("inspect", help="detected layout, case counts, shapes, spacing, labels")
    from fastseg.data.inspect import add_inspect_arguments

    add_inspect_arguments(p)
    p.set_defaults(func=_data)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
