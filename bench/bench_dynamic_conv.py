"""dynamic_conv2d at LightAWNet's shapes: the reference (the batch-folded grouped conv, eager and
compiled), one conv per sample, a static conv of the same shape, and the fused kernels.

    .venv/bin/python -m pytest bench/bench_dynamic_conv.py --benchmark-json=dc.json
    .venv/bin/python bench/summary.py dc.json

Shapes: batch 8, K = 4 experts of 3×3, padding 1, no bias, C → C at LightAWNet's resolutions for
128² and 256² inputs: 16 at 128²/256², 32 at 64²/128², 64 at 32²/64², 128 at 16²/32², 256 at
8²/16². Modes: forward, and forward + backward (gradients of a fixed random upstream gradient
with respect to x, the experts and the routing). Implementations:

* ``reference``: :func:`fastseg.ops.dynamic_conv2d_reference`, the batch folded into the groups
  of one conv as LightAWNet's code (and timm's CondConv2d) computes it: mix every sample's
  kernel, ``conv2d(x.view(1, N·C, H, W), W.view(N·C, ...), groups=N)``;
* ``reference-compiled``: the same under ``torch.compile``;
* ``static-conv``: ``F.conv2d`` with one kernel for the whole batch: the cost of the same
  convolution without the per-sample kernels, the floor of the idea;
* ``per-sample``: one ``conv2d`` per sample with its own mixed kernel;
* each fused backend that runs here (``cpu``), through the public API with its checks.

Each case runs 15 rounds (twice the other op benchmarks): on this shared 2-core machine single
rounds of the same case differ by up to 2×, and medians of 7 still moved by 30 % between runs.

Peak memory (forward + backward only): each implementation runs once in a fresh subprocess
whose peak resident set size (``VmHWM``, reset after the imports and the input construction:
importing torch and triton peaks higher than many of these ops) minus that of a subprocess that
only builds the inputs is recorded as ``extra_info["peak_mb"]``. Both first run every
implementation at a tiny shape, so loading libraries and JIT kernels counts in neither. Not for
``reference-compiled``: a fresh process would measure the compiler.
"""
import pytest
import torch
import torch.nn.functional as F

from compiled import compiled_on_first_call
import fastseg
import peak_memory
from fastseg.ops import dynamic_conv2d, dynamic_conv2d_reference

EXPERTS = 4
SHAPES = [(8, 16, 128, 128), (8, 16, 256, 256), (8, 32, 64, 64), (8, 32, 128, 128),
          (8, 64, 32, 32), (8, 64, 64, 64), (8, 128, 16, 16), (8, 128, 32, 32),
          (8, 256, 8, 8), (8, 256, 16, 16)]


def per_sample(x, experts, routing):
    """One conv per sample, each with its own mixed kernel: the semantics written out."""
    return torch.cat([F.conv2d(x[n:n + 1], torch.einsum("k,k...->...", routing[n], experts), padding=1)
                      for n in range(x.shape[0])])


def reference(x, experts, routing):
    return dynamic_conv2d_reference(x, experts, routing, padding=1)


reference_compiled = compiled_on_first_call(reference)


def static_conv(x, experts, routing):
    """One kernel for the whole batch (the first expert): no routing, no per-sample kernels."""
    return F.conv2d(x, experts[0], padding=1)


IMPLS = {
    "reference": reference,
    "reference-compiled": reference_compiled,
    "static-conv": static_conv,
    "per-sample": per_sample,
}
for _name in fastseg.available_backends("cpu"):
    if _name not in ("reference", "triton"):  # triton runs on CPU only in its (slow) interpreter
        IMPLS[_name] = (lambda b: lambda x, e, r: dynamic_conv2d(x, e, r, padding=1, backend=b))(_name)


def inputs(shape, seed=0, c_out=None, experts=EXPERTS):
    """x [N, C, H, W] (`shape`), experts [K, c_out, C, 3, 3] (K = `experts`; c_out: C unless
    given; scaled like LightAWNet's normal init over the fan-in), routing [N, K] (sigmoid),
    grad_y [N, c_out, H, W]."""
    g = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    c_out = C if c_out is None else c_out
    x = torch.randn(shape, generator=g)
    kernels = torch.randn(experts, c_out, C, 3, 3, generator=g) / (3 * C ** 0.5)
    routing = torch.sigmoid(torch.randn(N, experts, generator=g))
    grad_y = torch.randn(N, c_out, H, W, generator=g)
    return x, kernels, routing, grad_y


def op_cost(shape, mode):
    """(bytes, flops) that the op must at least move and compute: the floor's inputs."""
    N, C, H, W = shape
    image, kernels = N * C * H * W * 4, EXPERTS * C * C * 9 * 4
    flops = 2 * N * C * C * 9 * H * W  # the convolution; mixing kernels adds 2·N·K·C·C·9
    if mode == "forward":
        return 2 * image + kernels, flops  # read x and the experts, write y
    # + read grad_y, write grad_x and grad_experts; grad_x and the weight gradient cost a
    # forward each
    return 4 * image + 2 * kernels, 3 * flops


def forward_backward(fn, x, experts, routing, grad_y):
    leaves = [x, experts, routing]
    return torch.autograd.grad(fn(*leaves), leaves, grad_y, allow_unused=True)


def run_once(impl, shape):
    """One forward + backward of `impl` at `shape` (None: only build the inputs), after every
    implementation ran once at a tiny shape: libraries, JIT kernels and thread pools are then
    loaded in every process alike. The peak-RSS mark is reset before the run (importing torch
    and triton peaks higher than many ops do), so differences in it are the op's own memory."""
    for name in IMPLS:
        if name != "reference-compiled":
            forward_backward(IMPLS[name], *[t.requires_grad_() for t in inputs((2, 4, 5, 5))[:3]],
                             torch.ones(2, 4, 5, 5))
    x, experts, routing, grad_y = inputs(shape)
    peak_memory.reset_high_water()
    if impl is not None:
        forward_backward(IMPLS[impl], x.requires_grad_(), experts.requires_grad_(),
                         routing.requires_grad_(), grad_y)


def make_run(impl, shape, mode, c_out=None, experts=EXPERTS):
    """A function running one forward (no autograd) or forward + backward of `impl` at `shape`
    (with c_out output channels and `experts` experts, as in :func:`inputs`) on :func:`inputs`."""
    x, experts, routing, grad_y = inputs(shape, c_out=c_out, experts=experts)
    fn = IMPLS[impl]
    if mode == "forward":
        def run():
            with torch.no_grad():
                return fn(x, experts, routing)
        return run
    leaves = [t.clone().requires_grad_() for t in (x, experts, routing)]
    return lambda: forward_backward(fn, *leaves, grad_y)


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}x{s[3]}")
def test_dynamic_conv2d(benchmark, shape, impl, mode):
    run = make_run(impl, shape, mode)
    out = run()  # warm-up (and compilation for the compiled formulation)
    if mode == "forward" and impl != "static-conv":  # what is timed must compute the right thing
        x, experts, routing, _ = inputs(shape)
        expected = dynamic_conv2d_reference(x, experts, routing, padding=1)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    nbytes, flops = op_cost(shape, mode)
    benchmark.extra_info.update(op="dynamic_conv2d", impl=impl, mode=mode, shape=list(shape),
                                bytes=nbytes, flops=flops)
    if mode == "forward+backward" and impl != "reference-compiled":
        benchmark.extra_info["peak_mb"] = round(peak_memory.peak_mb(__file__, impl, shape), 1)
    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=1)


if __name__ == "__main__":
    peak_memory.child_main(run_once)
