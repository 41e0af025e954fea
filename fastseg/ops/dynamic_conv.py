"""Dynamic (mixture-of-experts, CondConv-style) convolution: LightAWNet's adaptive weighting.

Each sample ``n`` is convolved with its own kernel, a routing-weighted sum of ``K`` expert
kernels: ``y_n = conv2d(x_n, Σ_k routing[n, k] · experts[k]) + Σ_k routing[n, k] · bias[k]``.
Backends: ``reference`` (mix every sample's kernel and fold the batch into the groups of one
``conv2d``, as LightAWNet's code and timm's CondConv do), ``cpu`` and
``cuda`` (``fastseg._C``), ``triton`` (``fastseg.kernels.dynamic_conv``). No fused backend keeps
the per-sample kernels between forward and backward: the backward recomputes or reduces them.

Layouts: the fused kernels compute on NCHW-contiguous data; a channels-last or non-contiguous
``x`` is copied once to NCHW on entry, and the output is returned in ``x``'s memory format.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .._layout import empty_like_output, output_memory_format
from ..backend import resolve_backend
from ._registry import autocast_inputs, check_finite, cpp_op, register_cpp

__all__ = ["dynamic_conv2d", "dynamic_conv2d_reference"]

IntPair = Union[int, tuple[int, int]]


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def _conv_params(experts: torch.Tensor, stride, padding, dilation):
    """``(stride, padding, dilation)`` as pairs; ``padding=None`` is 'same' padding."""
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    if min(stride) < 1:
        raise ValueError(f"stride must be positive, got {stride}")
    if min(dilation) < 1:
        raise ValueError(f"dilation must be positive, got {dilation}")
    kernel = tuple(experts.shape[-2:])
    if padding is None:
        if stride != (1, 1) or any(k % 2 == 0 for k in kernel):
            raise ValueError(f"padding=None means 'same' padding, which needs odd kernel sizes and "
                             f"stride 1 (got kernel {kernel}, stride {stride}); pass padding "
                             f"explicitly")
        padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel))
    padding = _pair(padding, "padding")
    if min(padding) < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")
    return stride, padding, dilation


def dynamic_conv2d_reference(x: torch.Tensor, experts: torch.Tensor, routing: torch.Tensor,
                             bias: Optional[torch.Tensor] = None, stride: IntPair = 1,
                             padding: Optional[IntPair] = None, dilation: IntPair = 1,
                             groups: int = 1) -> torch.Tensor:
    """The definition, computed as LightAWNet's code does: mix every sample's kernel (and bias),
    then fold the batch into the groups of one ``conv2d`` (sample ``n`` is groups
    ``n·groups … n·groups + groups - 1``).

    x ``[N, C_in, H, W]``; experts ``[K, C_out, C_in/groups, kh, kw]``; routing ``[N, K]``;
    bias ``[K, C_out]``. Returns ``[N, C_out, H_out, W_out]``.
    """
    stride, padding, dilation = _conv_params(experts, stride, padding, dilation)
    N, C_in, H, W = x.shape
    K, C_out = experts.shape[:2]
    weight = (routing @ experts.flatten(1)).reshape(N * C_out, *experts.shape[2:])
    b = (routing @ bias).flatten() if bias is not None else None
    y = F.conv2d(x.reshape(1, N * C_in, H, W), weight, b, stride, padding, dilation, N * groups)
    return y.view(N, C_out, *y.shape[2:])


def _validate(x, experts, routing, bias, groups):
    """Check shapes, dtypes and devices, naming the argument."""
    for name, t in (("x", x), ("experts", experts), ("routing", routing)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape [N, C_in, H, W], got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if experts.dim() != 5 or experts.numel() == 0:
        raise ValueError(f"experts must have shape [K, C_out, C_in/groups, kh, kw] (non-empty), "
                         f"got {tuple(experts.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    N, C_in = x.shape[:2]
    K, C_out = experts.shape[:2]
    if C_in % groups:
        raise ValueError(f"x has C_in={C_in} channels, not divisible by groups={groups}")
    if C_out % groups:
        raise ValueError(f"experts has C_out={C_out} (dim 1), not divisible by groups={groups}")
    if experts.shape[2] != C_in // groups:
        raise ValueError(f"experts must have C_in/groups={C_in // groups} input channels (dim 2) "
                         f"for x with C_in={C_in} and groups={groups}, got {tuple(experts.shape)}")
    if tuple(routing.shape) != (N, K):
        raise ValueError(f"routing must have shape [N, K] = [{N}, {K}] (N from x, K from experts), "
                         f"got {tuple(routing.shape)}")
    if bias is not None and tuple(bias.shape) != (K, C_out):
        raise ValueError(f"bias must have shape [K, C_out] = [{K}, {C_out}], got {tuple(bias.shape)}")
    named = [("experts", experts), ("routing", routing)] + ([("bias", bias)] if bias is not None else [])
    for name, t in named:
        if t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_geometry(x, experts, stride, padding, dilation):
    for d, name in ((0, "height"), (1, "width")):
        span = dilation[d] * (experts.shape[3 + d] - 1) + 1
        if x.shape[2 + d] + 2 * padding[d] < span:
            raise ValueError(f"x's padded {name} ({x.shape[2 + d]} + 2·{padding[d]}) is smaller than "
                             f"the dilated kernel ({span})")


# --- autograd glue shared by the C++ and Triton ops --------------------------------------------

def _output_shape(x, experts, stride, padding, dilation):
    size = [(x.shape[2 + d] + 2 * padding[d] - dilation[d] * (experts.shape[3 + d] - 1) - 1)
            // stride[d] + 1 for d in range(2)]
    return (x.shape[0], experts.shape[1], *size)


def _fake_forward(x, experts, routing, bias, stride, padding, dilation, groups):
    return empty_like_output(x, _output_shape(x, experts, stride, padding, dilation))


def _fake_backward(grad_out, x, experts, routing, bias, stride, padding, dilation, groups):
    return (empty_like_output(x), torch.empty_like(experts, memory_format=torch.contiguous_format),
            torch.empty_like(routing, memory_format=torch.contiguous_format),
            experts.new_empty(experts.shape[:2]))


def _setup_context(ctx, inputs, output):
    x, experts, routing, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, experts, routing, bias)
    ctx.conv = (stride, padding, dilation, groups)


def _make_backward(backward_op):
    def backward(ctx, grad_out):
        x, experts, routing, bias = ctx.saved_tensors
        grad_x, grad_experts, grad_routing, grad_bias = backward_op(
            grad_out, x, experts, routing, bias, *ctx.conv)
        return (grad_x, grad_experts, grad_routing, grad_bias if bias is not None else None,
                None, None, None, None)
    return backward


register_cpp("dynamic_conv2d", _fake_forward, _fake_backward, _setup_context,
             _make_backward(cpp_op("dynamic_conv2d_backward")))


@torch.library.custom_op("fastseg::dynamic_conv2d_triton", mutates_args=())
def _triton_forward(x: torch.Tensor, experts: torch.Tensor, routing: torch.Tensor,
                    bias: Optional[torch.Tensor], stride: list[int], padding: list[int],
                    dilation: list[int], groups: int) -> torch.Tensor:
    from fastseg.kernels import dynamic_conv as kernels
    return kernels.forward(x, experts, routing, bias, tuple(stride), tuple(padding),
                           tuple(dilation), groups)


@torch.library.custom_op("fastseg::dynamic_conv2d_triton_backward", mutates_args=())
def _triton_backward(grad_out: torch.Tensor, x: torch.Tensor, experts: torch.Tensor,
                     routing: torch.Tensor, bias: Optional[torch.Tensor], stride: list[int],
                     padding: list[int], dilation: list[int], groups: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastseg.kernels import dynamic_conv as kernels
    return kernels.backward(grad_out, x, experts, routing, bias, tuple(stride), tuple(padding),
                            tuple(dilation), groups)


_triton_forward.register_fake(_fake_forward)
_triton_backward.register_fake(_fake_backward)
_triton_forward.register_autograd(_make_backward(_triton_backward), setup_context=_setup_context)

#: the cpu backend's stacked plan (:func:`_stacked`) runs up to this many expert output channels
#: ``K·C_out`` (groups 1)
STACKED_MAX_CHANNELS = 16


def _stacked(x, experts, routing, bias, stride, padding, dilation):
    """The cpu backend's plan for few output channels: one static convolution of the whole batch
    with all ``K·C_out`` expert filters, then each sample's expert outputs mixed,
    ``y_n = Σ_k routing[n, k] · (conv(x_n, experts[k]) + bias[k])``, equal to the mixed-kernel
    convolution by linearity; ATen differentiates both steps. It costs ``K`` times a static
    convolution's arithmetic and keeps the ``K·C_out`` expert outputs for the routing gradient
    (no per-sample kernel), which pays off only where oneDNN's grouped convolution is at its
    slowest, a few output channels per group (16 → 1 channel at 8×128², when the folded plan's
    weight gradients were oneDNN's: 59 ms there against 27 ms here). 3×3 kernels at stride 1
    no longer come here: the folded plan computes their weight gradients itself (see
    :func:`_cpu_plan_is_stacked`)."""
    K, C_out = experts.shape[:2]
    flat_bias = None if bias is None else bias.reshape(K * C_out)
    y = F.conv2d(x, experts.reshape(K * C_out, *experts.shape[2:]), flat_bias, stride, padding,
                 dilation)
    y = torch.einsum("nk,nkchw->nchw", routing, y.unflatten(1, (K, C_out)))
    return y.contiguous(memory_format=output_memory_format(x))


def _cpu_plan_is_stacked(experts, groups, needs_grad: bool, stride=(1, 1), padding=(1, 1),
                         dilation=(1, 1)) -> bool:
    """Whether the cpu backend takes :func:`_stacked`: for few output channels, when a gradient
    will be asked for (its backward is the reason for it), except for 3×3 kernels at stride 1,
    padding 1 and dilation 1, whose convolutions and weight gradients the C++ folded plan
    computes itself (LightAWNet's head, 16 → 1 channel, 4 experts, forward + backward at
    8×128²: 5.5 ms against 22–30 ms stacked; without a gradient at 1×256², ≈ 0.7 against 4.4
    ms). FASTSEG_DYNAMIC_CONV_CPU_PLAN=stacked forces it wherever it applies (groups 1), =folded
    or =gemm a C++ plan (csrc/cpu/dynamic_conv.cpp)."""
    if groups != 1:
        return False
    forced = os.environ.get("FASTSEG_DYNAMIC_CONV_CPU_PLAN", "").strip()
    if forced in ("", "auto"):
        own_3x3 = (tuple(experts.shape[3:]) == (3, 3) and tuple(stride) == (1, 1)
                   and tuple(padding) == (1, 1) and tuple(dilation) == (1, 1))
        return (needs_grad and not own_3x3
                and experts.shape[0] * experts.shape[1] <= STACKED_MAX_CHANNELS)
    return forced == "stacked"


_FUSED = {"cpu": cpp_op("dynamic_conv2d"), "cuda": cpp_op("dynamic_conv2d"),
          "triton": _triton_forward}


@autocast_inputs
def dynamic_conv2d(x: torch.Tensor, experts: torch.Tensor, routing: torch.Tensor,
                   bias: Optional[torch.Tensor] = None, stride: IntPair = 1,
                   padding: Optional[IntPair] = None, dilation: IntPair = 1, groups: int = 1, *,
                   backend: str = "auto") -> torch.Tensor:
    """Convolve each sample with its own routing-weighted mixture of expert kernels, fused.

    Args:
        x: ``[N, C_in, H, W]`` float tensor (NCHW or channels-last; other strides are copied).
        experts: ``[K, C_out, C_in/groups, kh, kw]``, the expert kernels.
        routing: ``[N, K]``, each sample's (already activated) expert weights; they need not sum
            to 1 (LightAWNet routes with a sigmoid).
        bias: optional ``[K, C_out]`` expert biases, mixed with the same routing weights.
        stride, dilation: an int or an ``(h, w)`` pair, as in :func:`torch.nn.functional.conv2d`.
        padding: an int or an ``(h, w)`` pair of zero padding; ``None`` (default) is 'same'
            padding, ``dilation·(k − 1)/2`` per side, for odd kernels at stride 1 only.
        groups: grouped convolution: ``C_in`` and ``C_out`` divisible by it.
        backend: ``"auto"`` or one of ``reference``/``cpu``/``cuda``/``triton``
            (see :mod:`fastseg.backend`).

    Returns:
        ``[N, C_out, H_out, W_out]`` with ``y_n = conv2d(x_n, Σ_k routing[n, k] · experts[k]) +
        Σ_k routing[n, k] · bias[k]`` (``H_out``, ``W_out`` as for ``conv2d``), in ``x``'s
        memory format. Differentiable in ``x``, ``experts``, ``routing`` and ``bias`` on all
        backends.

    Raises:
        ValueError: naming the argument, for wrong ranks or shapes, channel counts that do not
            match or divide by ``groups``, mixed dtypes or devices, empty inputs, kernels larger
            than the padded input, ``padding=None`` where 'same' padding is undefined, NaN/inf.
    """
    _validate(x, experts, routing, bias, groups)
    stride, padding, dilation = _conv_params(experts, stride, padding, dilation)
    _check_geometry(x, experts, stride, padding, dilation)
    chosen = resolve_backend(backend, x.device, x.dtype)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, experts, routing, bias))
    stacked = chosen == "cpu" and _cpu_plan_is_stacked(experts, groups, needs_grad, stride,
                                                         padding, dilation)
    # NaN/inf: the C++ cpu plans check their inputs themselves while they first read them (a
    # separate pass over x would cost a noticeable part of the op); the stacked plan is ATen's.
    if chosen != "cpu" or stacked:
        check_finite([("x", x), ("experts", experts), ("routing", routing), ("bias", bias)])
    if chosen == "reference":
        return dynamic_conv2d_reference(x, experts, routing, bias, stride, padding, dilation, groups)
    if stacked:
        return _stacked(x, experts, routing, bias, stride, padding, dilation)
    return _FUSED[chosen](x, experts, routing, bias, list(stride), list(padding), list(dilation),
                          groups)
