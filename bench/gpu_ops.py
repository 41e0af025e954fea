"""The fused ops and the two models on a CUDA GPU: time per call of the references (eager and
``torch.compile``d), the usual cuDNN / SDPA formulations, and the ``triton`` and ``cuda``
backends, forward and forward + backward, at the models' shapes (the ``bench_*.py`` files' cases);
and how far each result is from the float64 reference.

    python bench/gpu_ops.py --kernel-time --json eager.json         # eager implementations
    python bench/gpu_ops.py --impls reference-compiled cuda-compiled --json compiled.json
    python bench/gpu_ops.py --render eager.json compiled.json      # one set of tables of both
    python bench/gpu_ops.py --compiled --warm-only --shard 0/4     # only compile, a quarter
    python bench/gpu_ops.py --device cpu --max-cases 1             # the cpu backend (a check)

``bench/gpu_session.sh`` runs the whole GPU session: build, GPU tests, these tables.

Timing: ``triton.testing.do_bench`` (CUDA events around each call, L2 flushed before each, the
median), float32 inputs on the GPU, torch's default math (cuDNN uses TF32 for the references'
float32 convolutions: their "reference's error" column; matrix products stay float32). With
``--kernel-time`` the profiler also sums the GPU time of the kernels each call launched: the rest
of a call's time is the host's. Every implementation is first checked against the float64
reference on the same inputs: ``error`` is the largest ``max|a − b| / max|b|`` over the output
and every gradient (with ``max|b|`` at least 1e-4 of the largest gradient's: see
:func:`relative_error`). ``--warm-only`` runs each
implementation once so that Triton's and inductor's on-disk caches hold every kernel: shards of
it can compile in parallel processes before one process times serially. ``--deadline`` (seconds
from the start) stops starting new cases, so a time-limited run still writes what it measured.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from compiled import compile_static, compiled_on_first_call  # noqa: E402
from fastseg.ops import (dilated_attention2d, dilated_attention2d_reference,  # noqa: E402
                         dynamic_conv2d, dynamic_conv2d_reference, mixed_depthwise_conv2d,
                         mixed_depthwise_conv2d_reference)

FUSED = ["triton", "cuda"]  # the fused backends timed: set by main() for the device
FAMILIES = ("dynamic_conv2d", "mixed_depthwise_conv2d", "dilated_attention2d", "attention_gates",
            "models")


class Case:
    """One shape of one op: ``args`` (CPU tensors and other values) and ``impls``, name → a
    function of ``*args``; ``reference`` is the semantics (run in float64 for the error)."""

    def __init__(self, family, label, args, impls, reference):
        self.family, self.label, self.args, self.impls = family, label, args, impls
        self.reference = reference


def _backend(op, **fixed):
    """The fused backends of ``op`` as functions of its positional arguments."""
    return {b: (lambda b: lambda *a: op(*a, backend=b, **fixed))(b) for b in FUSED}


def dynamic_conv_cases():
    import bench_dynamic_conv as b

    ref = b.reference
    impls = {"reference": ref, "reference-compiled": compiled_on_first_call(ref),
             "static-conv": b.static_conv, **_backend(dynamic_conv2d, padding=1)}
    for shape in b.SHAPES:
        x, experts, routing, _ = b.inputs(shape)
        yield Case("dynamic_conv2d", "x".join(map(str, shape)), [x, experts, routing], impls, ref)


def mixed_depthwise_cases():
    import bench_mixed_depthwise_conv as b

    n = len(b.KERNELS)

    def split(fn):
        return lambda x, *wb: fn(x, list(wb[:n]), list(wb[n:]))
    ref = split(mixed_depthwise_conv2d_reference)
    impls = {"reference": ref, "reference-compiled": compiled_on_first_call(ref),
             "padded-dwconv": split(b.padded_dwconv),
             **{k: split(f) for k, f in _backend(mixed_depthwise_conv2d).items()}}
    for shape, channels_last in b.CASES:
        g = torch.Generator().manual_seed(0)
        C = shape[1]
        x = torch.randn(shape, generator=g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weights = [torch.randn(C // n, 1, k, k, generator=g) * 0.1 for k in b.KERNELS]
        biases = [torch.randn(C // n, generator=g) for _ in b.KERNELS]
        yield Case("mixed_depthwise_conv2d", "x".join(map(str, shape)) + ("-cl" if channels_last
                                                                          else ""),
                   [x, *weights, *biases], impls, ref)


def dilated_attention_cases():
    import bench_dilated_attention as b

    for shape in b.SHAPES:
        q, k, v, _ = b.inputs(shape)
        s, scale = shape[6:]

        def fix(fn, s=s, scale=scale):
            return lambda q, k, v: fn(q, k, v, s, scale)
        ref = fix(dilated_attention2d_reference)
        impls = {"reference": ref, "reference-compiled": compiled_on_first_call(ref),
                 "sdpa": fix(b.sdpa),
                 **{name: fix(f) for name, f in _backend(dilated_attention2d).items()}}
        yield Case("dilated_attention2d", "x".join(map(str, shape[:6])) + f"-s{s}", [q, k, v],
                   impls, ref)


def attention_gate_cases():
    import bench_attention_gates as b

    for name, label, build in b.CASES:
        impls = {impl: b.implementation(name, impl) for impl in
                 ("reference", "reference-compiled", *FUSED)}
        yield Case("attention_gates", f"{name} {label}", build(), impls, impls["reference"])


def model_cases(batch=8, size=128):
    from fastseg.models import create_model

    for name, channels in (("lightawnet", 1), ("lgmsnet", 3)):
        torch.manual_seed(0)
        models = {b: create_model(name, in_channels=channels, num_classes=2, backend=b)
                  for b in ("reference", *FUSED)}
        for m in models.values():
            m.load_state_dict(models["reference"].state_dict())
        x = torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(0))
        impls = {b: _Model(m) for b, m in models.items()}
        # compiled: the reference, and each fused backend (its ops are custom ops that compile
        # without graph breaks: what torch.compile then removes is the host time between them)
        impls.update({f"{b}-compiled": _Model(m, compile_=True) for b, m in models.items()})
        yield Case("models", f"{name} {batch}x{channels}x{size}x{size} (train mode)", [x], impls,
                   impls["reference"])


class _Model:
    """A model as a function of its input, moved to the input's device and dtype on first use
    (:func:`prepare` takes the gradients of the input and of every parameter, as training does)."""

    def __init__(self, model, compile_=False):
        self.model, self.compile_, self.fn = model, compile_, None

    def __call__(self, x):
        p = next(self.model.parameters())
        if p.device != x.device or p.dtype != x.dtype:
            self.model.to(x.device, x.dtype)
            self.fn = None
        if self.fn is None:
            self.fn = compile_static(self.model) if self.compile_ else self.model
        return self.fn(x)


BUILDERS = {"dynamic_conv2d": dynamic_conv_cases, "mixed_depthwise_conv2d": mixed_depthwise_cases,
            "dilated_attention2d": dilated_attention_cases, "attention_gates": attention_gate_cases}


def to_device(args, device, dtype):
    """``args`` with every floating-point tensor on ``device`` in ``dtype`` (layout kept)."""
    return [a.to(device, dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args]


def prepare(fn, args, mode, grad_y=None):
    """A no-argument function running ``fn`` once in ``mode`` on fresh copies of ``args``."""
    if mode == "forward":
        def run():
            with torch.no_grad():
                return fn(*args)
        return run
    leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a
              for a in args]
    tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
    models = [getattr(fn, "model", None)]

    def run():
        y = fn(*leaves)
        if models[0] is not None:  # a model: the parameters' gradients too, as training does
            wrt = tensors + [p for p in models[0].parameters()]
            return torch.autograd.grad(y, wrt, grad_y)
        return torch.autograd.grad(y, tensors, grad_y, allow_unused=True)
    return run


def relative_error(outs, refs):
    """The largest ``max|a − b| / max(max|b|, 1e-4 · m)`` over the pairs, ``m`` the largest
    ``max|b|`` of all: a gradient that is zero in exact arithmetic (a conv bias before a
    train-mode BatchNorm) is rounding noise on both sides, measured against the others."""
    pairs = [(a.double(), b) for a, b in zip(outs, refs) if a is not None and b is not None]
    largest = max(b.abs().max().item() for _, b in pairs)
    worst = 0.0
    for a, b in pairs:
        err = (a - b).abs().max().item()
        if not math.isfinite(err):
            return float("inf")
        worst = max(worst, err / max(b.abs().max().item(), 1e-4 * largest, 1e-30))
    return worst


def median_ms(run, device):
    """Median time of ``run()`` in ms: CUDA events with the L2 flushed (``do_bench``) on a GPU,
    the wall clock of 5 calls after one on the CPU."""
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(run, warmup=10, rep=60, return_mode="median")
    run()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def kernel_ms(run, calls=3):
    """GPU time per call of ``run()``: the summed durations of the kernels and copies it
    launched, from the profiler. A call's time beyond it is the host's (Python, dispatch,
    launches, waits for the device) and gaps between kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    total = sum(e.duration_ns() for e in prof.profiler.kineto_results.events()
                if e.device_type() == DeviceType.CUDA)
    return total / calls / 1e6


def run_case(case, device, impls, warm_only, record, kernel_time=False):
    """Check and time the implementations ``impls`` of ``case`` (all if None) in both modes
    (with ``kernel_time``, also the GPU time of their kernels); ``record`` each row."""
    x32 = to_device(case.args, device, torch.float32)
    x64 = to_device(case.args, device, torch.float64)
    ref_y = case.reference(*x64)
    g = torch.Generator().manual_seed(5)
    grad64 = torch.randn(ref_y.shape, generator=g, dtype=torch.float64).to(device)
    ref_fb = prepare(case.reference, x64, "forward+backward", grad64)()
    for impl, fn in case.impls.items():
        if impls is not None and impl not in impls:
            continue
        for mode in ("forward", "forward+backward"):
            row = dict(family=case.family, case=case.label, impl=impl, mode=mode)
            try:
                run = prepare(fn, x32, mode, grad64.float())
                out = run()  # compiles (Triton, inductor) on first use
                if device == "cuda":
                    torch.cuda.synchronize()
                if impl != "static-conv":  # another function: only its time counts
                    outs = [out] if mode == "forward" else list(out)
                    refs = [ref_y] if mode == "forward" else ref_fb
                    row["error"] = relative_error(outs, refs)
                if not warm_only:
                    row["ms"] = median_ms(run, device)
                if kernel_time and not warm_only:
                    row["kernel_ms"] = kernel_ms(run)
            except Exception as e:  # noqa: BLE001 - recorded, and the run goes on
                row["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            record(row)


def markdown(rows):
    """One table per family: a row per case and mode, a column per implementation."""
    out = []
    families = [f for f in FAMILIES if any(r["family"] == f for r in rows)]
    for family in families:
        fam = [r for r in rows if r["family"] == family]
        impls = list(dict.fromkeys(r["impl"] for r in fam))
        fused_names = [i for i in impls if i in ("cpu", "triton", "cuda")]
        out += [f"\n### `{family}`\n",
                "| case | mode | " + " | ".join(f"{i} ms" for i in impls)
                + " | reference / best fused | compiled / best fused | worst error (fused) |"
                " reference's error |",
                "|---|---|" + "---:|" * len(impls) + "---:|---:|---:|---:|"]
        for key in dict.fromkeys((r["case"], r["mode"]) for r in fam):
            cells = {r["impl"]: r for r in fam if (r["case"], r["mode"]) == key}
            line = f"| {key[0]} | {key[1]} |"
            for i in impls:
                r = cells.get(i, {})
                line += (" failed |" if "failed" in r else
                         f" {r['ms']:.3f} |" if "ms" in r else " – |")
            fused = [cells[i]["ms"] for i in fused_names if "ms" in cells.get(i, {})]
            best = min(fused) if fused else None
            for base in ("reference", "reference-compiled"):
                r = cells.get(base, {})
                line += f" {r['ms'] / best:.2f}× |" if best and "ms" in r else " – |"
            errors = [cells[i]["error"] for i in fused_names if "error" in cells.get(i, {})]
            line += f" {max(errors):.1e} |" if errors else " – |"
            r = cells.get("reference", {})
            line += f" {r['error']:.1e} |" if "error" in r else " – |"
            out.append(line)
        if any("kernel_ms" in r for r in fam):
            out += [f"\nGPU time of the kernels per call, ms (and its share of the call's time):\n",
                    "| case | mode | " + " | ".join(impls) + " |",
                    "|---|---|" + "---:|" * len(impls)]
            for key in dict.fromkeys((r["case"], r["mode"]) for r in fam):
                cells = {r["impl"]: r for r in fam if (r["case"], r["mode"]) == key}
                line = f"| {key[0]} | {key[1]} |"
                for i in impls:
                    r = cells.get(i, {})
                    line += (f" {r['kernel_ms']:.3f} ({100 * r['kernel_ms'] / r['ms']:.0f} %) |"
                             if "kernel_ms" in r else " – |")
                out.append(line)
        failures = [r for r in fam if "failed" in r]
        for r in failures:
            out.append(f"\n- failed: {r['case']} {r['mode']} {r['impl']}: {r['failed']}")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: the cpu backend against the references (a check of this script)")
    p.add_argument("--max-cases", type=int, default=None, help="at most this many per family")
    p.add_argument("--model-batch", type=int, default=8)
    p.add_argument("--model-size", type=int, default=128)
    p.add_argument("--impls", nargs="+", default=None,
                   help="only these implementations (default: all but the compiled ones)")
    p.add_argument("--compiled", action="store_true", help="include the compiled references")
    p.add_argument("--kernel-time", action="store_true",
                   help="also the GPU time of the kernels per call (profiler; --device cuda)")
    p.add_argument("--render", nargs="+", type=Path, default=None,
                   help="only print the tables of these --json files")
    p.add_argument("--warm-only", action="store_true", help="run each once, time nothing")
    p.add_argument("--shard", default="0/1", help="i/n: only every n-th case, from the i-th")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds from the start after which no new case starts")
    p.add_argument("--out", type=Path, default=None, help="markdown tables (else stdout)")
    p.add_argument("--json", type=Path, default=None, help="one JSON row per line, as measured")
    args = p.parse_args(argv)
    if args.render:
        rows = [json.loads(line) for f in args.render if f.exists()
                for line in f.read_text().splitlines() if line.strip()]
        text = markdown(rows)
        args.out.write_text(text) if args.out else print(text)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA device")
    if args.kernel_time and args.device != "cuda":
        p.error("--kernel-time needs --device cuda")
    FUSED[:] = ["triton", "cuda"] if args.device == "cuda" else ["cpu"]
    start = time.monotonic()
    shard, shards = map(int, args.shard.split("/"))
    rows = []
    log = open(args.json, "a") if args.json else None

    def record(row):
        rows.append(row)
        if log:
            log.write(json.dumps(row) + "\n")
            log.flush()
        status = row.get("failed") or (f"{row['ms']:.3f} ms" if "ms" in row else "ran")
        err = f" err {row['error']:.1e}" if "error" in row else ""
        print(f"{row['family']:24} {row['case']:42} {row['mode']:17} {row['impl']:19} "
              f"{status}{err}", flush=True)

    impls = args.impls
    if impls is None and not args.compiled:
        impls = ["reference", "static-conv", "padded-dwconv", "sdpa", *FUSED]
    index = 0
    stopped = None
    for family in args.families:
        cases = (model_cases(args.model_batch, args.model_size) if family == "models"
                 else BUILDERS[family]())
        for number, case in enumerate(cases):
            if args.max_cases is not None and number >= args.max_cases:
                break
            index += 1
            if (index - 1) % shards != shard:
                continue
            if args.deadline is not None and time.monotonic() - start > args.deadline:
                stopped = f"{family} {case.label}"
                break
            run_case(case, args.device, impls, args.warm_only, record, args.kernel_time)
        if stopped:
            break
    if args.warm_only:
        return 0
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name}, {props.multi_processor_count} SMs, CUDA {torch.version.cuda}"
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    head = (f"Device: {device}; torch {torch.__version__}, triton "
            f"{__import__('triton').__version__}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")
    if stopped:
        head += f" Stopped at the deadline before {stopped}."
    text = head + "\n" + markdown(rows)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
