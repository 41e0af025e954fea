"""Page faults and wall time of a training step with the C library's default allocator settings
and with freed memory retained (``fastseg.memory``), each in a fresh process.

    .venv/bin/python bench/page_faults.py                       # both models, 128² and 256²
    .venv/bin/python bench/page_faults.py --models lgmsnet --sizes 256 --repeats 2

The step is ``bench_models.py``'s (batch 8, forward, BCE-with-logits, backward, SGD step). Each
row runs one warm-up step and three measured ones in its own process; ``faults / step`` is the
fewest minor page faults (``getrusage``'s ``ru_minflt``) of the three, ``ms`` the fastest
step. The two settings of a row run back to back, so their ratio carries less of the machine's
drift than rows far apart do.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(model: str, size: int, impl: str) -> None:
    sys.path.insert(0, str(HERE))
    from bench_models import make_step  # applies FASTSEG_RETAIN_FREED_MEMORY on import

    step = make_step(model, impl, "train", 8, size)
    step()
    times, faults = [], []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(min(faults), min(times))


def measure(model: str, size: int, impl: str, retain: bool) -> tuple[int, float]:
    env = dict(os.environ, FASTSEG_RETAIN_FREED_MEMORY="1" if retain else "0")
    out = subprocess.run([sys.executable, __file__, "--child", model, str(size), impl], env=env,
                         check=True, capture_output=True, text=True, timeout=1800).stdout.split()
    return int(out[-2]), float(out[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["lgmsnet", "lightawnet"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 256])
    parser.add_argument("--impls", nargs="+", default=["reference", "cpu"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        model, size, impl = args.child
        return child(model, int(size), impl)
    print("| model | step | impl | repeat | faults / step, default | faults / step, retained | "
          "ms, default | ms, retained | default / retained |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for repeat in range(1, args.repeats + 1):
        for model in args.models:
            for size in args.sizes:
                for impl in args.impls:
                    f0, t0 = measure(model, size, impl, False)
                    f1, t1 = measure(model, size, impl, True)
                    print(f"| {model} | train 8×{size}² | {impl} | {repeat} | {f0} | {f1} | "
                          f"{t0 * 1e3:.0f} | {t1 * 1e3:.0f} | {t0 / t1:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
