"""dilated_attention2d at the models' shapes: the original formulation (eager and compiled),
rearrange + ``scaled_dot_product_attention`` (eager and compiled), and the fused kernels.

    .venv/bin/python -m pytest bench/bench_dilated_attention.py --benchmark-json=da.json
    .venv/bin/python bench/summary.py da.json

Shapes (batch 8, 256² input): LGMSNet's GMS transformers, 4 heads × 8 in parity groups
(dilation 2), on 64 × 64 tokens (the 1/4 decoder stage) and 32 × 32 tokens (1/8); LightAWNet's
bottleneck self-attention, one head with q/k of 32 and v of 256 over all 16 × 16 tokens
(dilation 1, scale 1). Modes: forward, and forward + backward (gradients of q, k and v for a
fixed random upstream gradient). Implementations, all taking and returning the token-major
``[N, H, W, heads, d]`` tensors:

* ``reference``: the original formulation, :func:`fastseg.ops.dilated_attention2d_reference`
  (rearrange into the groups, ``q kᵀ``, softmax, ``· v``, rearrange back): it stores the
  ``(HW/s²)²`` scores per group and head;
* ``reference-compiled``: the same under ``torch.compile``;
* ``sdpa`` / ``sdpa-compiled``: the same rearranges around
  ``torch.nn.functional.scaled_dot_product_attention``, eager / compiled;
* each fused backend that runs here (``cpu``), through the public API with its checks.

Peak memory of forward + backward (``extra_info["peak_mb"]``): measured in fresh subprocesses
(:mod:`peak_memory`); not for the compiled implementations, whose fresh process would measure
the compiler. The floor (summary.py) is the FLOP count at the float32 matmul rate: 4·L²·(d_qk +
d_v)/2 per group and head forward (two products), 2.5× that forward + backward (five products).
"""
import pytest
import torch
import torch.nn.functional as F

from compiled import compiled_on_first_call
import fastseg
import peak_memory
from fastseg.ops import dilated_attention2d, dilated_attention2d_reference
from fastseg.ops.dilated_attention import _groups

# (N, H, W, heads, d_qk, d_v, dilation, scale)
SHAPES = [(8, 64, 64, 4, 8, 8, 2, None), (8, 32, 32, 4, 8, 8, 2, None),
          (8, 16, 16, 1, 32, 256, 1, 1.0)]


def sdpa(q, k, v, dilation, scale):
    """The rearranges of the original around torch's fused attention."""
    N, H, W, heads, _ = q.shape
    s = dilation
    out = F.scaled_dot_product_attention(_groups(q, s), _groups(k, s), _groups(v, s), scale=scale)
    return (out.reshape(N, s, s, heads, H // s, W // s, -1).permute(0, 4, 1, 5, 2, 3, 6)
            .reshape(N, H, W, heads, -1))


IMPLS = {
    "reference": dilated_attention2d_reference,
    "reference-compiled": compiled_on_first_call(dilated_attention2d_reference),
    "sdpa": sdpa,
    "sdpa-compiled": compiled_on_first_call(sdpa),
}
for _name in fastseg.available_backends("cpu"):
    if _name not in ("reference", "triton"):  # triton runs on CPU only in its (slow) interpreter
        IMPLS[_name] = (lambda b: lambda q, k, v, s, sc: dilated_attention2d(q, k, v, s, sc, backend=b))(_name)


def inputs(shape, seed=0):
    """q, k, v and the upstream gradient of the output."""
    N, H, W, heads, d_qk, d_v = shape[:6]
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(N, H, W, heads, d_qk, generator=g) for _ in range(2))
    v, grad_out = (torch.randn(N, H, W, heads, d_v, generator=g) for _ in range(2))
    return q, k, v, grad_out


def op_cost(shape, mode):
    """(bytes, flops) that the op must at least move and compute: the floor's inputs."""
    N, H, W, heads, d_qk, d_v, s = shape[:7]
    tokens = H * W // (s * s)
    problems = N * s * s * heads
    io = N * H * W * heads * (2 * d_qk + 2 * d_v) * 4  # read q, k, v, write out
    flops = problems * 2 * tokens * tokens * (d_qk + d_v)
    if mode == "forward":
        return io, flops
    return 2 * io + N * H * W * heads * (2 * d_qk + d_v) * 4, int(2.5 * flops)


def forward_backward(fn, q, k, v, grad_out, s, scale):
    return torch.autograd.grad(fn(q, k, v, s, scale), (q, k, v), grad_out)


def run_once(impl, shape):
    """One forward + backward of `impl` (None: only build the inputs), for peak_memory."""
    for name, fn in IMPLS.items():
        if not name.endswith("-compiled"):
            tiny = [t.requires_grad_() for t in inputs((2, 4, 4, 2, 8, 8))[:3]]
            forward_backward(fn, *tiny, torch.ones(2, 4, 4, 2, 8), 2, None)
    q, k, v, grad_out = inputs(shape)
    peak_memory.reset_high_water()
    if impl is not None:
        forward_backward(IMPLS[impl], q.requires_grad_(), k.requires_grad_(), v.requires_grad_(),
                         grad_out, *shape[6:])


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])) + f"-s{s[6]}")
def test_dilated_attention2d(benchmark, shape, impl, mode):
    q, k, v, grad_out = inputs(shape)
    s, scale = shape[6:]
    fn = IMPLS[impl]
    if mode == "forward":
        def run():
            with torch.no_grad():
                return fn(q, k, v, s, scale)
    else:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]

        def run():
            return forward_backward(fn, *leaves, grad_out, s, scale)
    out = run()  # warm-up (and compilation)
    if mode == "forward":  # what is timed must compute the right thing
        torch.testing.assert_close(out, dilated_attention2d_reference(q, k, v, s, scale),
                                   rtol=1e-4, atol=1e-4)
    nbytes, flops = op_cost(shape, mode)
    benchmark.extra_info.update(op="dilated_attention2d", impl=impl, mode=mode,
                                shape=list(shape[:7]), bytes=nbytes, flops=flops)
    if mode == "forward+backward" and not impl.endswith("-compiled"):
        benchmark.extra_info["peak_mb"] = round(peak_memory.peak_mb(__file__, impl, shape), 1)
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)


if __name__ == "__main__":
    peak_memory.child_main(run_once)
