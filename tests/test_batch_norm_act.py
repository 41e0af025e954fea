"""batch_norm_act / BatchNormAct2d: BatchNorm2d and its activation as one op on the cpu backend,
against nn.BatchNorm2d followed by the activation."""
import itertools

import pytest
import torch
from torch import nn

from fastseg.backend import unavailable_reason
from fastseg.layers import BatchNormAct2d
from fastseg.ops import batch_norm_act, batch_norm_act_reference
import fastseg.ops.norm_act as ops_bna
from op_helpers import count_calls

pytestmark = pytest.mark.skipif(unavailable_reason("cpu", "cpu") is not None,
                                reason=str(unavailable_reason("cpu", "cpu")))

ACTS = {"relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(0.2), "silu": nn.SiLU(), "identity": nn.Identity()}
# odd sizes; 45·47 = 2115 values per plane crosses the NCHW kernels' 2048-value chunks; 1×1
# planes. Channels-last (rows of C values, k = ceil(128 / C) rows per wide row, blocks of 64
# wide rows): 2×45×47 rows of 3 = 98 wide rows of 43 in two blocks plus a 16-row tail; 4 rows of
# 6 and 39 rows of 2 only a tail; 2×9×31 rows of 33 = 139 wide rows of 4 in three blocks, tail 2.
SHAPES = [(3, 5, 7, 9), (2, 3, 45, 47), (4, 6, 1, 1), (1, 2, 13, 3), (2, 33, 9, 31)]
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


class CountCalls:
    def __init__(self, monkeypatch):
        self._count = count_calls(monkeypatch, ops_bna, "_cpp")

    @property
    def calls(self):
        return self._count[0]


PRE = {"identity": nn.Identity(), "gelu": nn.GELU()}


def _pair(channels, activation, dtype, pre="identity", **kwargs):
    """(BatchNormAct2d, Sequential(pre, nn.BatchNorm2d, activation)) holding the same state."""
    fused = BatchNormAct2d(channels, activation, negative_slope=0.2, backend="cpu",
                           pre_activation=pre, **kwargs).to(dtype)
    fused.min_numel = 0
    with torch.no_grad():
        if fused.affine:
            fused.weight.uniform_(0.5, 1.5)
            fused.bias.uniform_(-0.5, 0.5)
        if fused.track_running_stats:
            fused.running_mean.uniform_(-1, 1)
            fused.running_var.uniform_(0.5, 2)
    plain = nn.BatchNorm2d(channels, **kwargs).to(dtype)
    plain.load_state_dict(fused.state_dict())
    return fused, nn.Sequential(PRE[pre], plain, ACTS[activation])


def _compare(fused, plain, x, dtype):
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    g = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(5))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fused(xa), plain(xb)
    ya.backward(g), yb.backward(g)
    pairs = [("y", ya, yb), ("grad x", xa.grad, xb.grad)]
    if fused.affine:
        pairs += [("grad weight", fused.weight.grad, plain[1].weight.grad),
                  ("grad bias", fused.bias.grad, plain[1].bias.grad)]
    for name, buffer in fused.named_buffers():
        pairs.append((name, buffer, plain[1].get_buffer(name)))
    for name, a, b in pairs:
        if b.is_floating_point():
            assert (a - b).abs().max() <= tol * (1 + b.abs().max()), name
        else:
            assert torch.equal(a, b), name
    return ya, xa.grad


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("pre", list(PRE))
def test_matches_batchnorm_then_activation(monkeypatch, activation, dtype, training, shape, layout,
                                           pre):
    count = CountCalls(monkeypatch)
    torch.manual_seed(0)
    fused, plain = _pair(shape[1], activation, dtype, pre)
    fused.train(training), plain.train(training)
    x = (torch.randn(shape, dtype=dtype) * 3 + 1).contiguous(memory_format=LAYOUTS[layout])
    y, grad = _compare(fused, plain, x, dtype)
    assert count.calls == 1
    if layout == "nhwc" and not x.is_contiguous():  # the output and grad_x keep x's layout
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
        assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kwargs", [dict(affine=False), dict(track_running_stats=False),
                                    dict(momentum=None), dict(eps=1e-3, momentum=0.3)])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_options(monkeypatch, kwargs, training):
    count = CountCalls(monkeypatch)
    torch.manual_seed(1)
    fused, plain = _pair(4, "silu", torch.float64, **kwargs)
    fused.train(training), plain.train(training)
    for step in range(3):  # momentum=None: the cumulative average over the steps
        _compare(fused, plain, torch.randn(2, 4, 5, 6, dtype=torch.float64) + step, torch.float64)
    assert count.calls == 3


def test_layout_size_switch_and_reference_backend(monkeypatch):
    count = CountCalls(monkeypatch)
    fused, plain = _pair(3, "relu", torch.float32)
    fused.min_numel = BatchNormAct2d.min_numel
    assert BatchNormAct2d.min_numel == 1 << 18
    small = torch.randn(2, 3, 8, 8)
    _compare(fused, plain, small, torch.float32)
    assert count.calls == 0  # below min_numel: nn.BatchNorm2d's path
    fused.min_numel = 0
    cl = small.contiguous(memory_format=torch.channels_last)
    y, grad = _compare(fused, plain, cl, torch.float32)
    assert count.calls == 1 and y.is_contiguous(memory_format=torch.channels_last)
    assert grad.is_contiguous(memory_format=torch.channels_last)
    fused.backend = "reference"
    _compare(fused, plain, small, torch.float32)
    assert count.calls == 1
    fused.backend = "cpu"
    _compare(fused, plain, small, torch.float32)
    assert count.calls == 2


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation,pre", [("silu", "identity"), ("leaky_relu", "identity"),
                                            ("identity", "gelu"), ("silu", "gelu")])
def test_gradcheck(training, activation, pre):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g) + 0.3).requires_grad_()
    w = (torch.rand(3, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, generator=g).requires_grad_()
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def f(x, w, b):  # running statistics copied: gradcheck calls f many times
        return batch_norm_act(x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5, activation,
                              0.1, pre_activation=pre, backend="cpu")
    assert torch.autograd.gradcheck(f, (x, w, b))


def test_opcheck_and_compile():
    x = torch.randn(2, 3, 4, 5)
    w, b, rm, rv = torch.rand(3) + 0.5, torch.randn(3), torch.zeros(3), torch.ones(3)
    for training in (True, False):
        for t, pre in itertools.product((x, x.contiguous(memory_format=torch.channels_last)), (0, 1)):
            torch.library.opcheck(torch.ops.fastseg.batch_norm_act.default,
                                  (t.detach().requires_grad_(), w, b, rm, rv, training, 1e-5, 3, 0.01,
                                   pre))
    compiled = torch.compile(lambda x: batch_norm_act(x, w, b, None, None, True, 0.1, 1e-5, "silu",
                                                      backend="cpu"), fullgraph=True)
    expected = batch_norm_act_reference(x.detach(), w, b, None, None, True, 0.1, 1e-5, "silu")
    torch.testing.assert_close(compiled(x.detach()), expected)


def test_bad_inputs():
    x = torch.randn(2, 3, 4, 4)
    w, b, rm, rv = torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="activation"):
        batch_norm_act(x, w, b, rm, rv, True, activation="gelu", backend="cpu")
    with pytest.raises(ValueError, match="activation"):
        BatchNormAct2d(3, "tanh")
    with pytest.raises(ValueError, match="pre_activation must be one of"):
        batch_norm_act(x, w, b, rm, rv, True, pre_activation="relu", backend="cpu")
    with pytest.raises(ValueError, match="pre_activation must be one of"):
        BatchNormAct2d(3, pre_activation="silu")
    with pytest.raises(ValueError, match=r"x must have shape \[N, C, H, W\]"):
        batch_norm_act(x[0], w, b, rm, rv, True, backend="cpu")
    with pytest.raises(ValueError, match="weight must have shape"):
        batch_norm_act(x, torch.ones(4), b, rm, rv, True, backend="cpu")
    with pytest.raises(ValueError, match="running_var must have x's dtype"):
        batch_norm_act(x, w, b, rm, rv.double(), False, backend="cpu")
    with pytest.raises(ValueError, match="more than one value per channel"):
        batch_norm_act(torch.randn(1, 3, 1, 1), w, b, rm, rv, True, backend="cpu")
