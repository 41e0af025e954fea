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
    from bench_summary import main as summary  # noqa: F401 - resolved below

    return summary(args.rest)


def _data(args) -> int:
    from fastseg.data.inspect import run_inspect

    return run_inspect(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions and which backends can run here")
    p.set_defaults(func=_info)
    p = sub.add_parser("bench", help="time the fused ops against the references; print ratios")
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
