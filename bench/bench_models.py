"""The two models end to end: training step and inference latency, reference backend vs fused.

    .venv/bin/python -m pytest bench/bench_models.py --benchmark-json=models.json
    .venv/bin/python bench/bench_models.py --summary models.json

Cases (models.md §3 has the original code's times on this machine kind):

* ``train``: one training step, batch 8, at 128² and 256²: forward, BCE-with-logits loss against
  a random mask, backward, SGD step (momentum 0.9), training-mode BatchNorm;
* ``inference``: batch 1 at 256², eval mode, no autograd.

Implementations: ``reference`` (``backend="reference"``: computes as the authors' code does, so its
times stand for the originals'), ``cpu`` (the fused kernels), ``cpu-folded`` (inference only: the
fused kernels after ``fuse_for_inference()``), and each of them ``-compiled``
(``torch.compile`` of the model, default inductor backend, one graph per case: compiling LGMSNet
takes minutes per graph on this machine, models.md §3: ≈ 220 s, so the whole file runs for about
an hour).

Rounds: 3 for the 256² steps (a reference LGMSNet step takes seconds), 5 for the 128² steps, 10
for inference; single rounds on this shared 2-core machine vary by up to 2×, so only ratios of
one run count. Peak memory (eager implementations): one call in a fresh subprocess, its peak
resident set size above a child that only built the model and inputs (``bench/peak_memory.py``),
as ``extra_info["peak_mb"]``.

Allocator: by default the C library's settings, under which glibc maps every tensor above 32 MB
afresh and its pages fault in on each step; ``FASTSEG_RETAIN_FREED_MEMORY=1`` runs the file as
``fastseg train`` runs (freed memory kept for reuse, ``fastseg.memory``).
"""
import json
import sys
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from compiled import compile_static
import peak_memory
from fastseg.memory import retain_freed_memory_from_environment
from fastseg.models import LGMSNet, LightAWNet

# FASTSEG_RETAIN_FREED_MEMORY=1: glibc keeps freed memory for reuse, as in `fastseg train`
# (fastseg.memory); unset: the C library's defaults, as a plain PyTorch script runs. The
# peak-memory children inherit the variable, so they run with the same setting.
RETAINED = retain_freed_memory_from_environment(default=False)

MODELS = {"lgmsnet": (LGMSNet, 3), "lightawnet": (LightAWNet, 1)}
CASES = [("train", 8, 128), ("train", 8, 256), ("inference", 1, 256)]
ROUNDS = {("train", 128): 5, ("train", 256): 3, ("inference", 256): 10}


def implementations(mode, size):
    impls = ["reference", "cpu", "reference-compiled", "cpu-compiled"]
    if mode == "inference":
        impls += ["cpu-folded", "cpu-folded-compiled"]
    return impls


def build(name, impl, mode):
    """The model for ``impl`` (weights of seed 0 on every backend) with the BatchNorm statistics
    of a real batch (the initial 0/1 statistics grow LightAWNet's eval-mode activations, with its
    unscaled normal expert init, to ~1e10), in the case's mode."""
    cls, channels = MODELS[name]
    backend = impl.split("-")[0]
    torch.manual_seed(0)
    model = cls(backend=backend)
    with torch.no_grad():
        momenta = {}
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                momenta[module], module.momentum = module.momentum, None
        model(torch.randn(2, channels, 64, 64, generator=torch.Generator().manual_seed(1)))
        for module, momentum in momenta.items():
            module.momentum = momentum
    if mode == "inference":
        model.eval()
        if impl.startswith("cpu-folded"):
            model.fuse_for_inference()
    return model


def make_step(name, impl, mode, batch, size):
    """A zero-argument function running one step of the case, with its inputs bound.

    Besides :func:`implementations`, two layout variants (``interleaved_models.py``):
    ``reference-channels-last`` (input and, where PyTorch can convert it, the model in
    channels-last; LightAWNet's 5-D expert weights cannot be) and ``cpu-nchw`` (LGMSNet's fused
    model computing in the input's NCHW layout, ``cpu_channels_last = False``)."""
    model = build(name, impl, mode)
    channels = MODELS[name][1]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, channels, size, size, generator=g)
    if impl == "reference-channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
        if name != "lightawnet":
            model = model.to(memory_format=torch.channels_last)
    if impl == "cpu-nchw":
        model.cpu_channels_last = False
    # dynamic=False: one static graph per case (with automatic dynamic shapes, the recompile
    # for a second input size fails in inductor: "Cannot convert expression to float")
    run = compile_static(model) if impl.endswith("-compiled") else model
    if mode == "inference":
        def step():
            with torch.no_grad():
                return run(x)
        return step
    target = (torch.rand(batch, 1, size, size, generator=g) > 0.5).float()
    # A small learning rate: the timed rounds must not drive the weights to inf (the fused ops
    # reject non-finite inputs).
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(run(x), target)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def run_once(impl, case):
    """Peak-memory child: one step of ``case`` = [model, mode, batch, size] with ``impl`` (None:
    build only), after every eager implementation ran a tiny step (libraries and thread pools
    loaded alike in every child)."""
    name, mode, batch, size = case
    for warm in implementations(mode, 128 if mode == "train" else size):
        if not warm.endswith("-compiled"):
            make_step(name, warm, mode, 1, 32)()
    step = make_step(name, impl or "reference", mode, batch, size)
    peak_memory.reset_high_water()
    if impl is not None:
        step()


PARAMS = [(name, mode, batch, size, impl) for name in MODELS for mode, batch, size in CASES
          for impl in implementations(mode, size)]


@pytest.mark.parametrize("name,mode,batch,size,impl", PARAMS,
                         ids=[f"{n}-{m}-{b}x{s}-{i}" for n, m, b, s, i in PARAMS])
def test_model(benchmark, name, mode, batch, size, impl):
    step = make_step(name, impl, mode, batch, size)
    out = step()  # warm-up (compilation for the compiled ones)
    assert torch.isfinite(out).all()
    case = [name, mode, batch, size]
    benchmark.extra_info.update(model=name, mode=mode, batch=batch, size=size, impl=impl,
                                retain_freed_memory=RETAINED)
    if not impl.endswith("-compiled"):
        benchmark.extra_info["peak_mb"] = round(peak_memory.peak_mb(__file__, impl, case), 1)
    benchmark.pedantic(step, rounds=ROUNDS[(mode, size)], iterations=1, warmup_rounds=1)


def summary(path):
    """Markdown table of a --benchmark-json file of this script: each implementation's median and
    fastest round, the median's speedup over the reference eager and the reference compiled, peak
    memory."""
    with open(path) as f:
        data = json.load(f)
    rows = defaultdict(dict)
    retained = set()
    for b in data["benchmarks"]:
        info = b["extra_info"]
        if "model" in info:
            retained.add(info.get("retain_freed_memory", False))
            key = (info["model"], info["mode"], f"{info['batch']}×{info['size']}²")
            rows[key][info["impl"]] = (b["stats"]["median"], b["stats"]["min"], info.get("peak_mb"))
    setting = {frozenset([True]): "freed memory retained (FASTSEG_RETAIN_FREED_MEMORY=1)",
               frozenset([False]): "the C library's default allocator settings"}.get(
                   frozenset(retained), "mixed allocator settings")
    lines = [f"Allocator: {setting}.", "",
             "| model | case | impl | median ms | min ms | vs reference | vs reference-compiled | "
             "peak MB |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for (model, mode, shape), impls in sorted(rows.items()):
        ref = impls.get("reference", (None,))[0]
        comp = impls.get("reference-compiled", (None,))[0]
        for impl, (t, fastest, peak) in sorted(impls.items(), key=lambda kv: -kv[1][0]):
            vs = lambda base: f"{base / t:.2f}×" if base else "–"  # noqa: E731
            lines.append(f"| {model} | {mode} {shape} | {impl} | {t * 1e3:.1f} | {fastest * 1e3:.1f} | "
                         f"{vs(ref)} | {vs(comp)} | {peak if peak is not None else '–'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--summary"]:
        print(summary(sys.argv[2]))
    else:
        peak_memory.child_main(run_once)
