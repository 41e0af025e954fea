"""batch_norm_act (BatchNorm2d + activation, training mode) at LGMSNet's shapes: reference eager,
reference compiled, the fused cpu op.

    .venv/bin/python -m pytest bench/bench_batch_norm_act.py --benchmark-json=bna.json
    .venv/bin/python bench/summary.py bna.json

Shapes (batch 8): 16 channels at 256² (stem, encoder 1, decoder 2), 4 at 256² (the LMS block's
1×1 reduction), 32 at 128², 64 at 64², 128 at 32²; SiLU, and ReLU at 16 × 256²; GELU before the
norm (LGMSNet's Fusion blocks: ``pre_activation="gelu"``) at 32 and 64 channels at 128²; NCHW, and
channels-last (``-cl``, the layout LGMSNet's fused model computes in) for three of them. Modes:
forward, and forward + backward (gradients of x, weight and bias for a fixed random upstream
gradient).
Implementations: ``reference`` (``F.batch_norm`` then the activation, ATen), ``reference-compiled``
(the same under ``torch.compile``) and ``cpu`` (:func:`fastseg.ops.batch_norm_act`).
"""
import pytest
import torch

from compiled import compiled_on_first_call
from fastseg.backend import unavailable_reason
from fastseg.ops import batch_norm_act, batch_norm_act_reference

# (shape, activation, pre-activation, channels-last)
SHAPES = [((8, 16, 256, 256), "silu", "identity", False), ((8, 16, 256, 256), "relu", "identity", False),
          ((8, 4, 256, 256), "silu", "identity", False), ((8, 32, 128, 128), "silu", "identity", False),
          ((8, 64, 64, 64), "silu", "identity", False), ((8, 128, 32, 32), "silu", "identity", False),
          ((8, 16, 256, 256), "silu", "identity", True), ((8, 32, 128, 128), "identity", "gelu", False),
          ((8, 32, 128, 128), "identity", "gelu", True), ((8, 64, 128, 128), "identity", "gelu", True)]

reference_compiled = compiled_on_first_call(batch_norm_act_reference)


IMPLS = {"reference": batch_norm_act_reference, "reference-compiled": reference_compiled}
if unavailable_reason("cpu", "cpu") is None:
    IMPLS["cpu"] = lambda *args: batch_norm_act(*args[:10], pre_activation=args[10], backend="cpu")


def op_cost(shape, mode):
    """(bytes, flops) the op must at least move and compute: the floor's inputs."""
    tensor = shape[0] * shape[1] * shape[2] * shape[3] * 4
    if mode == "forward":
        return 3 * tensor, 0  # read x (statistics), read x and write y
    return 8 * tensor, 0  # + read x and grad_y (reductions), read both again, write grad_x


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", SHAPES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-"
                         f"{c[1] if c[2] == 'identity' else c[2] + '-bn'}{'-cl' if c[3] else ''}")
def test_batch_norm_act(benchmark, case, impl, mode):
    shape, activation, pre, channels_last = case
    g = torch.Generator().manual_seed(0)
    c = shape[1]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(shape, generator=g) * 2 + 1).contiguous(memory_format=fmt)
    weight, bias = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    mean, var = torch.zeros(c), torch.ones(c)
    fn = IMPLS[impl]
    if mode == "forward":
        def run():
            with torch.no_grad():
                return fn(x, weight, bias, mean, var, True, 0.1, 1e-5, activation, 0.01, pre)
    else:
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        grad_y = torch.randn(shape, generator=g).contiguous(memory_format=fmt)

        def run():
            y = fn(*leaves, mean, var, True, 0.1, 1e-5, activation, 0.01, pre)
            return torch.autograd.grad(y, leaves, grad_y)
    out = run()  # warm-up (and compilation for the compiled reference)
    expected = batch_norm_act_reference(x, weight, bias, None, None, True, 0.1, 1e-5, activation,
                                        0.01, pre)
    if mode == "forward":  # what is timed must compute the right thing
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    nbytes, flops = op_cost(shape, mode)
    name = activation if pre == "identity" else f"{pre}→bn"
    benchmark.extra_info.update(op=f"batch_norm_act[{name}{', cl' if channels_last else ''}]",
                                impl=impl, mode=mode, shape=list(shape), activation=activation,
                                pre_activation=pre, channels_last=channels_last, bytes=nbytes,
                                flops=flops)
    benchmark.pedantic(run, rounds=9, iterations=1, warmup_rounds=1)
