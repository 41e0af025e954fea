"""The attention gates at LightAWNet's shapes: reference eager, reference compiled, fused kernels.

    .venv/bin/python -m pytest bench/bench_attention_gates.py --benchmark-json=gates.json
    .venv/bin/python bench/summary.py gates.json

Batch 8, 256² input; every stage where LightAWNet (or, for the two gates it does not use, the
equivalent place) has the gate:

* ``gated_pointwise``: the encoder blocks Block(C) at 1/1 … 1/16, on a = 4·C channels → C;
* ``spatial_gate``: the same encoder tensors a (the plain spatial gate);
* ``channel_gate``: the decoder stages, upsample ×2 → SE (C/8 hidden) → + skip;
* ``cross_gate``: the two branches at 1/8 and 1/16 gating each other (align_corners=True);
* ``attention_gate``: an Attention U-Net gate at each decoder skip (g of the same width, C_i = C/2).

Modes: forward, and forward + backward (the gradients of a fixed random upstream gradient with
respect to every tensor argument). Implementations: ``reference`` (the op's definition in eager
PyTorch), ``reference-compiled`` (the same under ``torch.compile``) and each fused backend that
runs here. ``extra_info["peak_bytes"]``: the most memory the call held at once beyond its inputs
(outputs, saved tensors and temporaries; from the profiler's allocation events, with the CPU
kernels' output cache off for that call).
"""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from compiled import compiled_on_first_call
import fastseg
from fastseg import memory
from fastseg.ops import attention_gates as ag

N = 8
ENCODER = [(4, 256), (64, 128), (128, 64), (256, 32), (512, 16)]  # (channels of a, size)
DECODER = [(128, 16), (64, 32), (32, 64), (16, 128)]               # (channels, input size)
CROSS = [(128, 16, 32), (128, 32, 32), (256, 16, 32), (256, 32, 16)]  # (C, a's size, b's size)


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen) * scale


def cases():
    """``(op name, shape label, builder)``; builder() gives the op's positional arguments."""
    for c, hw in ENCODER:
        yield "gated_pointwise", f"{N}x{c}x{hw}x{hw}→{c // 4}", lambda c=c, hw=hw, g=_g(0): [
            _randn(g, N, c, hw, hw), _randn(g, 1, c, scale=c ** -0.5), _randn(g, 1),
            _randn(g, c // 4, c, scale=c ** -0.5), _randn(g, c // 4, c, scale=c ** -0.5),
            _randn(g, c // 4)]
        yield "spatial_gate", f"{N}x{c}x{hw}x{hw}", lambda c=c, hw=hw, g=_g(1): [
            _randn(g, N, c, hw, hw), _randn(g, 1, c, scale=c ** -0.5), _randn(g, 1)]
    for c, hw in DECODER:
        yield "channel_gate", f"{N}x{c}x{hw}x{hw}→{2 * hw}+skip", lambda c=c, hw=hw, g=_g(2): [
            _randn(g, N, c, hw, hw), _randn(g, c // 8, c, scale=c ** -0.5),
            _randn(g, c, c // 8, scale=(c // 8) ** -0.5), _randn(g, N, c, 2 * hw, 2 * hw), True]
        yield "attention_gate", f"{N}x{c}x{2 * hw}x{2 * hw}", lambda c=c, hw=2 * hw, g=_g(3): [
            _randn(g, N, c, hw, hw), _randn(g, N, c, hw, hw), _randn(g, c // 2, c, scale=c ** -0.5),
            _randn(g, c // 2, c, scale=c ** -0.5), _randn(g, c // 2),
            _randn(g, 1, c // 2, scale=(c // 2) ** -0.5), _randn(g, 1)]
    for c, a_hw, b_hw in CROSS:
        yield "cross_gate", f"{N}x{c}x{a_hw}x{a_hw}←{b_hw}²", lambda c=c, a=a_hw, b=b_hw, g=_g(4): [
            _randn(g, N, c, a, a), _randn(g, N, c, b, b), True]


CASES = list(cases())
REFERENCES = {name: getattr(ag, name + "_reference") for name in
              ("gated_pointwise", "spatial_gate", "channel_gate", "attention_gate", "cross_gate")}
COMPILED = {name: compiled_on_first_call(fn) for name, fn in REFERENCES.items()}


def implementation(name, impl):
    if impl == "reference":
        return REFERENCES[name]
    if impl == "reference-compiled":
        return COMPILED[name]
    op = getattr(ag, name)
    return lambda *args: op(*args, backend=impl)


IMPLS = ["reference", "reference-compiled"] + [
    b for b in fastseg.available_backends("cpu") if b not in ("reference", "triton")]


def op_bytes(args, out_numel, mode):
    """Minimum bytes moved: every input read and the output written once; the backward reads the
    inputs and grad_y and writes one gradient per input (forward + backward: 3 × the inputs + 2 ×
    the output)."""
    tensors = sum(a.numel() for a in args if isinstance(a, torch.Tensor)) * 4
    out = out_numel * 4
    return tensors + out if mode == "forward" else 3 * tensors + 2 * out


def op_flops(name, args, mode):
    """Multiply-adds ×2 of the 1×1 projections (the backward: about twice the forward's)."""
    N, C, H, W = args[0].shape
    if name == "gated_pointwise":
        flops = 2 * (2 * args[3].shape[0] + 1) * C * N * H * W
    elif name == "attention_gate":
        flops = 2 * args[2].shape[0] * (C + args[1].shape[1]) * N * H * W
    else:
        return 0
    return flops if mode == "forward" else 3 * flops


def peak_bytes(run):
    """The most bytes allocated at once during run() beyond what was live before it. The CPU
    kernels' output cache (fastseg.memory) is off during the call: an output in a reused storage
    is memory the call holds, but no allocation the profiler sees."""
    previous = memory.set_output_cache_limit(0)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
    finally:
        memory.set_output_cache_limit(previous)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def make_run(index, impl, mode):
    """``(run, expected, args)`` for case ``index`` of CASES: run() calls ``impl`` in ``mode``
    (forward without autograd; forward+backward: the gradients of a fixed random upstream gradient
    with respect to every tensor argument), expected is the reference's forward output."""
    name, _, build = CASES[index]
    args = build()
    fn = implementation(name, impl)
    expected = REFERENCES[name](*args)
    if mode == "forward":
        def run():
            with torch.no_grad():
                return fn(*args)
    else:
        leaves = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
        tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
        grad_y = torch.randn(expected.shape, generator=_g(5))

        def run():
            return torch.autograd.grad(fn(*leaves), tensors, grad_y)
    return run, expected, args


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{n}-{s}" for n, s, _ in CASES])
def test_attention_gates(benchmark, index, impl, mode):
    name, label, _ = CASES[index]
    run, expected, args = make_run(index, impl, mode)
    out = run()  # warm-up (and compilation for the compiled reference)
    if mode == "forward":  # what is timed must compute the right thing
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    benchmark.extra_info.update(op=name, impl=impl, mode=mode, shape=[label],
                                bytes=op_bytes(args, expected.numel(), mode),
                                flops=op_flops(name, args, mode),
                                peak_bytes=peak_bytes(run))
    # 11 rounds: medians of 5 moved by 2× between runs on this shared 2-core machine.
    benchmark.pedantic(run, rounds=11, iterations=1, warmup_rounds=1)
