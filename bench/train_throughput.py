"""Training throughput (images/s) of the seed models through fastseg.engine.Trainer: each model
on the fused and the reference backend, in one process and in DDP processes (torchrun, gloo on
CPU / NCCL on CUDA), batch 8 at 128², float32, the paper recipes' optimiser and loss.

    python bench/train_throughput.py                 # the table (markdown) on stdout
    python bench/train_throughput.py --steps 8 --nproc 2 --models lightawnet

Each configuration runs in a fresh process (or a fresh torchrun group); images/s counts the
global batch over the steps after ``--warmup`` ones, timed by a step hook, so data loading,
forward, backward, gradient all-reduce and the optimiser step are all inside. One process uses
every core as torch's threads; each of N DDP processes gets cores / N threads.
``FASTSEG_RETAIN_FREED_MEMORY=1`` keeps freed memory for reuse in each worker, as ``fastseg
train`` does (``fastseg.memory``); unset, the C library's defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(args) -> int:
    import torch

    sys.path.insert(0, str(REPO))
    from fastseg.engine import Trainer, recipe_for
    from fastseg.memory import retain_freed_memory_from_environment

    retain_freed_memory_from_environment(default=False)  # =1: as `fastseg train` runs

    channels = 3 if args.model == "lgmsnet" else 1
    size = args.size
    generator = torch.Generator().manual_seed(0)
    n = args.batch_size * (args.warmup + args.steps)
    images = torch.rand(n, channels, size, size, generator=generator)
    masks = (torch.rand(n, 1, size, size, generator=generator) > 0.7).float()
    data = list(zip(images, masks))
    stamps = []
    recipe = recipe_for(args.model, epochs=1, batch_size=args.batch_size, size=size,
                        channels=channels, backend=args.backend, augment=False, shuffle=False)
    trainer = Trainer(args.model, data, None, recipe, tempfile.mkdtemp(), progress=False,
                      hooks=[lambda *_: stamps.append(time.perf_counter())])
    trainer.save = lambda *a, **k: None  # measure training, not checkpoint writing
    trainer.fit()
    if trainer.context.is_main:
        timed = stamps[args.warmup - 1:]
        rate = args.batch_size * (len(timed) - 1) / (timed[-1] - timed[0])
        print("RESULT " + json.dumps({"images_per_s": rate, "threads": torch.get_num_threads(),
                                      "world_size": trainer.context.world_size}), flush=True)
    return 0


def run_config(args, model: str, backend: str, nproc: int) -> dict:
    cores = os.cpu_count() or 1
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(max(1, cores // nproc))}
    me = [str(Path(__file__).resolve()), "--worker", "--model", model, "--backend", backend,
          "--steps", str(args.steps), "--warmup", str(args.warmup),
          "--batch-size", str(args.batch_size), "--size", str(args.size)]
    if nproc == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", *me]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def machine() -> str:
    import torch

    model = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=["lgmsnet", "lightawnet"])
    parser.add_argument("--backends", nargs="+", default=None,
                        help="default: the fused backend of this device, then reference")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2],
                        help="process counts (1: plain, >1: torchrun DDP)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--timeout", type=int, default=900)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    import torch

    backends = args.backends or (["cuda" if torch.cuda.is_available() else "cpu", "reference"])
    print(f"machine: {machine()}; batch {args.batch_size} at {args.size}², float32, "
          f"{args.steps} timed steps after {args.warmup}")
    print("| model | backend | processes | threads each | images/s | fused / reference |")
    print("|---|---|---:|---:|---:|---:|")
    for model in args.models:
        for nproc in args.nproc:
            results = {b: run_config(args, model, b, nproc) for b in backends}
            for backend, result in results.items():
                ratio = ""
                if backend != "reference" and "reference" in results:
                    ratio = f"{result['images_per_s'] / results['reference']['images_per_s']:.2f}×"
                print(f"| {model} | {backend} | {nproc} | {result['threads']} | "
                      f"{result['images_per_s']:.2f} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
