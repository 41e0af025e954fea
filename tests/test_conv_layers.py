"""PointwiseConv2d and DepthwiseConv2d: nn.Conv2d layers computed by GEMMs and the fused depthwise op."""
import pytest
import torch
from torch import nn

import fastseg.ops.pointwise as ops_pw
from fastseg.layers import PointwiseConv2d
from fastseg.layers.pointwise_conv import MIN_KERNEL_CHANNELS
from op_helpers import count_calls


def pair(c_in, c_out, bias, dtype=torch.float32, backend="cpu"):
    torch.manual_seed(0)
    layer = PointwiseConv2d(c_in, c_out, bias=bias, backend=backend).to(dtype)
    plain = nn.Conv2d(c_in, c_out, 1, bias=bias).to(dtype)
    plain.load_state_dict(layer.state_dict())
    return layer, plain


def outputs_and_grads(module, x, grad_y):
    x = x.clone().requires_grad_()
    y = module(x)
    grads = torch.autograd.grad(y, [x] + list(module.parameters()), grad_y)
    return y, grads


class CountGemm:
    """Counts calls of the GEMM path (ATen's thnn_conv2d) and of the CPU kernel
    (fastseg.ops.pointwise_conv2d's C++ op) while active."""

    def __init__(self, monkeypatch):
        self._gemm = count_calls(monkeypatch, torch._C._nn, "thnn_conv2d")
        self._kernel = count_calls(monkeypatch, ops_pw, "_cpp")

    @property
    def calls(self):
        return self._gemm[0]

    @property
    def kernel_calls(self):
        return self._kernel[0]


# 13 input channels run the CPU kernel, 5 (below MIN_KERNEL_CHANNELS) the GEMMs.
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("c_in", [13, 5])
def test_matches_nn_conv2d(monkeypatch, c_in, dtype, rtol, bias, layout):
    assert MIN_KERNEL_CHANNELS == 8
    gemm = CountGemm(monkeypatch)
    layer, plain = pair(c_in, 7, bias, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, c_in, 9, 11, generator=g, dtype=dtype)
    grad_y = torch.randn(3, 7, 9, 11, generator=g, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y, grads = outputs_and_grads(layer, x, grad_y)
    y_ref, grads_ref = outputs_and_grads(plain, x, grad_y)
    nchw = layout == "nchw"  # channels-last keeps oneDNN's path
    assert (gemm.kernel_calls, gemm.calls) == ((nchw and c_in >= 8, nchw and c_in < 8))
    for a, b in zip((y,) + grads, (y_ref,) + grads_ref):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= rtol * b.abs().max()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("c_in,expected", [(3, "matmul"), (9, "fastseg.pointwise_conv2d")])
def test_compiled_kernel_matches_nn_conv2d(c_in, expected, bias):
    """``compiled_kernel``: under torch.compile the layer is the CPU kernel's op (from 8 input
    channels) or one matrix product; outputs and gradients equal nn.Conv2d's, and the compiled
    graph holds no convolution."""
    layer, plain = pair(c_in, 5, bias)
    layer.compiled_kernel = True
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, c_in, 7, 9, generator=g)
    grad_y = torch.randn(2, 5, 7, 9, generator=g)
    ops = []

    def backend(gm, example_inputs):
        ops.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    y, grads = outputs_and_grads(compiled, x, grad_y)
    y_ref, grads_ref = outputs_and_grads(plain, x, grad_y)
    assert not any("conv" in op and "fastseg" not in op for op in ops), ops
    assert any(expected in op for op in ops), ops
    for a, b in zip((y,) + grads, (y_ref,) + grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_reference_backend_is_nn_conv2d(monkeypatch):
    gemm = CountGemm(monkeypatch)
    layer, plain = pair(4, 5, True, backend="reference")
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=0)
    assert gemm.calls == 0


def test_state_dict_moves_both_ways():
    layer, plain = pair(6, 3, True)
    assert list(layer.state_dict()) == ["weight", "bias"]
    assert layer.weight.shape == (3, 6, 1, 1)
    back = PointwiseConv2d(6, 3)
    back.load_state_dict(plain.state_dict())
    torch.testing.assert_close(back.weight, plain.weight)


def test_autocast_and_compile():
    layer, plain = pair(8, 4, True)
    x = torch.randn(2, 8, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # nn.Conv2d's autocast path
    compiled = torch.compile(layer, fullgraph=True)  # nn.Conv2d's path inside the graph
    torch.testing.assert_close(compiled(x), plain(x), rtol=1e-5, atol=1e-5)


# --- DepthwiseConv2d: nn.Conv2d's depthwise conv through mixed_depthwise_conv2d -----------------

@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_depthwise_matches_nn_conv2d(monkeypatch, backend, bias, layout):
    from fastseg.backend import unavailable_reason
    from fastseg.layers import DepthwiseConv2d
    from fastseg.ops import mixed_depthwise_conv as mdc
    if unavailable_reason(backend, "cpu"):
        pytest.skip(unavailable_reason(backend, "cpu"))
    calls = []
    real = mdc.mixed_depthwise_conv2d
    monkeypatch.setattr("fastseg.layers.mixed_depthwise_conv.mixed_depthwise_conv2d",
                        lambda *a, **k: calls.append(k["backend"]) or real(*a, **k))
    torch.manual_seed(0)
    layer = DepthwiseConv2d(5, 7, bias=bias, backend=backend)
    plain = nn.Conv2d(5, 5, 7, padding=3, groups=5, bias=bias)
    plain.load_state_dict(layer.state_dict())
    g = torch.Generator().manual_seed(1)
    # 17×19 = 323 pixels: above DepthwiseConv2d.small_plane, so the fused op runs on cpu too;
    # 9×11 = 99 pixels: the cpu backend hands such planes to nn.Conv2d, the others do not.
    for h, w, fused in ((17, 19, True), (9, 11, backend != "cpu")):
        calls.clear()
        x = torch.randn(2, 5, h, w, generator=g)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        grad_y = torch.randn(2, 5, h, w, generator=g)
        y, grads = outputs_and_grads(layer, x, grad_y)
        y_ref, grads_ref = outputs_and_grads(plain, x, grad_y)
        assert calls == ([backend] if fused else [])
        for a, b in zip((y,) + grads, (y_ref,) + grads_ref):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert DepthwiseConv2d.small_plane == 16 * 16


def test_depthwise_reference_backend_and_bad_kernel():
    from fastseg.layers import DepthwiseConv2d
    layer = DepthwiseConv2d(3, 5, backend="reference")
    plain = nn.Conv2d(3, 3, 5, padding=2, groups=3)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="kernel_size"):
        DepthwiseConv2d(3, 4)
