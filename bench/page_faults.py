"""Page faults and wall time of a training step under two memory settings, each in a fresh process:
``--compare retain`` (the default), the C library's default allocator settings against freed
memory retained (``fastseg.retain_freed_memory``); ``--compare output-cache``, the fused CPU
kernels' output cache switched off (``FASTSEG_OUTPUT_CACHE_MB=0``) against its default
(``fastseg.memory.set_output_cache_limit``), both with the C library's defaults.

    .venv/bin/python bench/page_faults.py                       # both models, 128² and 256²
    .venv/bin/python bench/page_faults.py --models lgmsnet --sizes 256 --repeats 2
    .venv/bin/python bench/page_faults.py --compare output-cache --impls cpu --steps 7

The step is ``bench_models.py``'s (batch 8, forward, BCE-with-logits, backward, SGD step). Each
row runs one warm-up step and ``--steps`` (3) measured ones in its own process; ``faults / step``
is the fewest minor page faults (``getrusage``'s ``ru_minflt``) of them, ``ms`` the fastest
step, ``peak MB`` the peak resident memory of all its steps above the resident memory before the
first (``VmHWM`` reset, as ``peak_memory.py`` does), which counts what a setting keeps between
steps. The two settings of a row run back to back, so their ratio carries less of the machine's
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


#: per comparison: the column names and the environment of its two settings
SETTINGS = {
    "retain": (("default", {"FASTSEG_RETAIN_FREED_MEMORY": "0"}),
               ("retained", {"FASTSEG_RETAIN_FREED_MEMORY": "1"})),
    "output-cache": (("no output cache", {"FASTSEG_RETAIN_FREED_MEMORY": "0", "FASTSEG_OUTPUT_CACHE_MB": "0"}),
                     ("output cache", {"FASTSEG_RETAIN_FREED_MEMORY": "0", "FASTSEG_OUTPUT_CACHE_MB": ""})),
}


def child(model: str, size: int, impl: str, steps: int) -> None:
    sys.path.insert(0, str(HERE))
    import peak_memory
    from bench_models import make_step  # applies FASTSEG_RETAIN_FREED_MEMORY on import

    step = make_step(model, impl, "train", 8, size)
    start_kib = _resident_kib()
    peak_memory.reset_high_water()
    step()
    times, faults = [], []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(min(faults), min(times), (peak_memory.high_water_kib() - start_kib) / 1024)


def _resident_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def measure(model: str, size: int, impl: str, env: dict, steps: int) -> tuple[int, float, float]:
    """In a fresh process: the fewest page faults of a measured step, the fastest step's seconds,
    and the peak resident memory (MB) of all its steps above the resident memory before them."""
    env = {**os.environ, **env}
    out = subprocess.run([sys.executable, __file__, "--child", model, str(size), impl, str(steps)], env=env,
                         check=True, capture_output=True, text=True, timeout=1800).stdout.split()
    return int(out[-3]), float(out[-2]), float(out[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["lgmsnet", "lightawnet"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 256])
    parser.add_argument("--impls", nargs="+", default=["reference", "cpu"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per process")
    parser.add_argument("--compare", choices=sorted(SETTINGS), default="retain")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        model, size, impl, steps = args.child
        return child(model, int(size), impl, int(steps))
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    (a, env_a), (b, env_b) = SETTINGS[args.compare]
    print(f"| model | step | impl | repeat | faults / step, {a} | faults / step, {b} | "
          f"ms, {a} | ms, {b} | {a} / {b} | peak MB, {a} | peak MB, {b} |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for repeat in range(1, args.repeats + 1):
        for model in args.models:
            for size in args.sizes:
                for impl in args.impls:
                    f0, t0, m0 = measure(model, size, impl, env_a, args.steps)
                    f1, t1, m1 = measure(model, size, impl, env_b, args.steps)
                    print(f"| {model} | train 8×{size}² | {impl} | {repeat} | {f0} | {f1} | "
                          f"{t0 * 1e3:.0f} | {t1 * 1e3:.0f} | {t0 / t1:.2f}× | {m0:.0f} | {m1:.0f} |",
                          flush=True)


if __name__ == "__main__":
    main()
