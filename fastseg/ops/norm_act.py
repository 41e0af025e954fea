"""``batch_norm_act``: BatchNorm2d (training or eval mode) with the activation after it (ReLU,
LeakyReLU, SiLU) and optionally one before it (GELU: ``BN(GELU(x))``), as one op.

Backends: ``reference`` (``F.batch_norm`` then the activation, as ATen computes them) and
``cpu`` (csrc/cpu/batch_norm_act.cpp, NCHW and channels-last: 3 passes over the tensor forward and
5 backward instead of ATen's 5 and 8, and no normalised tensor kept for the activation's backward). There are no GPU
kernels: on CUDA tensors, and for the ``cuda`` and ``triton`` backends, the reference computes it
(cuDNN's BatchNorm and one elementwise pass).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._layout import empty_like_output
from ..backend import _check_name, resolve_backend
from ._registry import cpp_op, register_cpp

#: activation (after the norm) name → the kernel's code
ACTIVATIONS = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3}
#: pre-activation (before the norm) name → the kernel's code
PRE_ACTIVATIONS = {"identity": 0, "gelu": 1}


def activate(y: torch.Tensor, activation: str, negative_slope: float = 0.01) -> torch.Tensor:
    """``activation`` (one of :data:`ACTIVATIONS` or :data:`PRE_ACTIVATIONS`) of ``y``,
    elementwise."""
    if activation == "gelu":
        return F.gelu(y)
    if activation == "relu":
        return F.relu(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y, negative_slope)
    if activation == "silu":
        return F.silu(y)
    return y


def batch_norm_act_reference(x, weight, bias, running_mean, running_var, training: bool,
                             momentum: float = 0.1, eps: float = 1e-5, activation: str = "relu",
                             negative_slope: float = 0.01, pre_activation: str = "identity"
                             ) -> torch.Tensor:
    """``act(F.batch_norm(pre(x), ...))``: the semantics (and the running-statistics update) of
    ``nn.GELU`` or nothing, then ``nn.BatchNorm2d``, then ``nn.ReLU`` / ``nn.LeakyReLU`` /
    ``nn.SiLU`` / nothing."""
    x = activate(x, pre_activation)
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return activate(y, activation, negative_slope)


_cpp = cpp_op("batch_norm_act")
_cpp_backward = cpp_op("batch_norm_act_backward")


def _like_x_and_two_channel_vectors(x):
    """What both ops return: a tensor of x's shape in the kernels' layout for x (channels-last
    stays channels-last, anything else NCHW) and two ``[C]`` vectors."""
    c = x.shape[1]
    return empty_like_output(x), x.new_empty(c), x.new_empty(c)


def _fake(x, weight, bias, running_mean, running_var, training, eps, act, slope, pre):
    return _like_x_and_two_channel_vectors(x)


def _fake_backward(grad_out, x, weight, bias, mean, var, training, eps, act, slope, pre):
    return _like_x_and_two_channel_vectors(x)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _, training, eps, act, slope, pre = inputs
    _, mean, var = output
    ctx.save_for_backward(x, weight, bias, mean, var)
    ctx.mark_non_differentiable(mean, var)
    ctx.arguments = (training, eps, act, slope, pre)


def _backward(ctx, grad_y, _grad_mean, _grad_var):
    x, weight, bias, mean, var = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = _cpp_backward(grad_y, x, weight, bias, mean, var, *ctx.arguments)
    return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None


register_cpp("batch_norm_act", _fake, _fake_backward, _setup_context, _backward)


def batch_norm_act(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                   training: bool, momentum: float = 0.1, eps: float = 1e-5,
                   activation: str = "relu", negative_slope: float = 0.01, *,
                   pre_activation: str = "identity", backend: str = "auto") -> torch.Tensor:
    """``pre_activation``, then BatchNorm over ``x`` ``[N, C, H, W]``, then ``activation``, as
    ``act(F.batch_norm(pre(x), running_mean, running_var, weight, bias, training, momentum,
    eps))``.

    Args:
        x: ``[N, C, H, W]``.
        weight, bias: ``[C]`` or None (no affine transform).
        running_mean, running_var: ``[C]`` or None. In training they are updated in place
            (``(1 − momentum)·old + momentum·batch``, the variance unbiased) when given; in eval
            mode they normalise ``x`` (None: the batch statistics, as ``F.batch_norm``).
        training: batch statistics (True) or running ones (False).
        activation: ``"identity"``, ``"relu"``, ``"leaky_relu"`` (``negative_slope``) or
            ``"silu"``.
        pre_activation: ``"identity"`` or ``"gelu"`` (exact, erf-based: ``nn.GELU()``), applied
            to ``x`` before the norm; the kernels recompute it in the backward instead of keeping
            the activated tensor.
        backend: ``"cpu"`` fuses them on NCHW- or channels-last-contiguous CPU tensors of
            float32/float64, each computed in its own layout; every other case runs the
            reference (see the module docstring).

    Returns:
        ``[N, C, H, W]``, in ``x``'s memory format.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if pre_activation not in PRE_ACTIVATIONS:
        raise ValueError(f"pre_activation must be one of {sorted(PRE_ACTIVATIONS)}, got "
                         f"{pre_activation!r}")
    _check_name(backend)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must have shape [N, C, H, W], got {shape}")
    use_batch = training or running_mean is None or running_var is None
    fused = (_cpp is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
             and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
             and not torch.is_autocast_enabled("cpu")
             and resolve_backend(backend, x.device, x.dtype) == "cpu")
    if not fused:
        return batch_norm_act_reference(x, weight, bias, running_mean, running_var, training,
                                        momentum, eps, activation, negative_slope, pre_activation)
    c = x.shape[1]
    ones = x.new_ones(c) if weight is None or running_var is None else None
    zeros = x.new_zeros(c) if bias is None or running_mean is None else None
    y, mean, var = _cpp(x, ones if weight is None else weight, zeros if bias is None else bias,
                        zeros if running_mean is None else running_mean,
                        ones if running_var is None else running_var, use_batch, eps,
                        ACTIVATIONS[activation], negative_slope, PRE_ACTIVATIONS[pre_activation])
    if training and running_mean is not None and running_var is not None:
        count = x.numel() // c
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(var * (count / max(count - 1, 1)), alpha=momentum)
    return y
