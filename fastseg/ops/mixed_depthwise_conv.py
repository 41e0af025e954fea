"""Heterogeneous-kernel (mixed) depthwise convolution: LGMSNet's local multiscale block.

The channels of ``x`` are split into groups; group ``g`` gets its own odd ``k_g × k_g`` depthwise
kernel with stride 1 and 'same' zero padding, plus an optional per-channel bias and an optional
fused residual ``+ x``. Backends: ``reference`` (split → one conv per group → concat), ``cpu`` and
``cuda`` (``fastseg._C``), ``triton`` (``fastseg.kernels.mixed_depthwise_conv``).

Layouts: the ``cpu`` kernels compute NCHW- and channels-last-contiguous ``x`` in its own layout
(channels-last in blocks of 16 channels of a sample, gathered into planes and written back in one
pass each); the ``cuda`` and ``triton`` kernels compute on NCHW-contiguous data, copying a
channels-last ``x`` once on entry. Any other ``x`` (a strided view) is copied once to NCHW. The
output is returned in ``x``'s memory format.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .._layout import empty_like_output
from ..backend import resolve_backend
from ._registry import autocast_inputs, check_finite, cpp_op, register_cpp

__all__ = ["mixed_depthwise_conv2d", "mixed_depthwise_conv2d_reference", "equal_splits"]


def equal_splits(channels: int, num_groups: int) -> list[int]:
    """Channel counts of ``num_groups`` groups: equal, remainder to the first (timm's MixedConv2d).

    >>> equal_splits(18, 4)
    [6, 4, 4, 4]
    """
    if num_groups <= 0 or channels < num_groups:
        raise ValueError(f"cannot split {channels} channels into {num_groups} non-empty groups")
    splits = [channels // num_groups] * num_groups
    splits[0] += channels - sum(splits)
    return splits


def mixed_depthwise_conv2d_reference(x: torch.Tensor, weights: Sequence[torch.Tensor],
                                     biases: Optional[Sequence[torch.Tensor]] = None,
                                     residual: bool = False) -> torch.Tensor:
    """The definition: split channels, one depthwise ``conv2d`` per group, concatenate.

    x ``[N, C, H, W]``; ``weights[g]`` ``[C_g, 1, k_g, k_g]`` (odd ``k_g``, ``Σ C_g = C``);
    ``biases[g]`` ``[C_g]``. Returns ``[N, C, H, W]``.
    """
    groups = torch.split(x, [w.shape[0] for w in weights], dim=1)
    biases = biases if biases is not None else [None] * len(weights)
    y = torch.cat([F.conv2d(xg, w, b, padding=w.shape[-1] // 2, groups=w.shape[0])
                   for xg, w, b in zip(groups, weights, biases)], dim=1)
    return y + x if residual else y


def _validate(x, weights, biases):
    """Check the arguments; return ``(weights list, concatenated bias or None)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape [N, C, H, W], got {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if isinstance(weights, torch.Tensor):
        raise TypeError("weights must be a sequence of per-group tensors [C_g, 1, k_g, k_g]")
    weights = list(weights)
    if not weights:
        raise ValueError("weights must hold at least one group")
    for g, w in enumerate(weights):
        if not isinstance(w, torch.Tensor) or w.dim() != 4 or w.shape[1] != 1 \
                or w.shape[2] != w.shape[3] or w.shape[2] % 2 == 0 or w.shape[0] == 0:
            shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"weights[{g}] must have shape [C_g, 1, k, k] with odd k and C_g > 0, "
                             f"got {shape}")
        if w.dtype != x.dtype:
            raise ValueError(f"weights[{g}] has dtype {w.dtype} but x has {x.dtype}")
        if w.device != x.device:
            raise ValueError(f"weights[{g}] is on {w.device} but x is on {x.device}")
    total = sum(w.shape[0] for w in weights)
    if total != x.shape[1]:
        raise ValueError(f"weights cover {total} channels (splits {[w.shape[0] for w in weights]}) "
                         f"but x has C={x.shape[1]}")
    if biases is None:
        return weights, None
    biases = list(biases)
    if len(biases) != len(weights):
        raise ValueError(f"biases has {len(biases)} entries but weights has {len(weights)} groups")
    for g, (b, w) in enumerate(zip(biases, weights)):
        if not isinstance(b, torch.Tensor) or tuple(b.shape) != (w.shape[0],):
            shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"biases[{g}] must have shape [{w.shape[0]}], got {shape}")
        if b.dtype != x.dtype or b.device != x.device:
            raise ValueError(f"biases[{g}] must match x's dtype and device "
                             f"({x.dtype}, {x.device}), got ({b.dtype}, {b.device})")
    return weights, torch.cat(biases)


def _check_finite(x, weights, bias, backend):
    """NaN/inf check of the parameters, and of ``x`` unless the backend checks it itself (the cpu
    kernels do, for free, while they copy each plane; a separate pass would cost more than the op)."""
    named = [(f"weights[{g}]", w) for g, w in enumerate(weights)]
    named += [("biases", bias)] if bias is not None else []
    named += [("x", x)] if backend != "cpu" else []
    check_finite(named)


# --- autograd glue shared by the C++ and Triton ops --------------------------------------------

def _fake_forward(x, weights, bias, residual):
    return empty_like_output(x)


def _fake_backward(grad_out, x, weights, residual):
    return (empty_like_output(x), [torch.empty_like(w, memory_format=torch.contiguous_format)
                                   for w in weights], x.new_empty(x.shape[1]))


def _setup_context(ctx, inputs, output):
    x, weights, bias, residual = inputs
    ctx.save_for_backward(x, *weights)
    ctx.residual = residual
    ctx.has_bias = bias is not None


def _make_backward(backward_op):
    def backward(ctx, grad_out):
        x, *weights = ctx.saved_tensors
        grad_x, grad_weights, grad_bias = backward_op(grad_out, x, weights, ctx.residual)
        return grad_x, list(grad_weights), (grad_bias if ctx.has_bias else None), None
    return backward


register_cpp("mixed_depthwise_conv2d", _fake_forward, _fake_backward, _setup_context,
             _make_backward(cpp_op("mixed_depthwise_conv2d_backward")))


@torch.library.custom_op("fastseg::mixed_depthwise_conv2d_triton", mutates_args=())
def _triton_forward(x: torch.Tensor, weights: list[torch.Tensor], bias: Optional[torch.Tensor],
                    residual: bool) -> torch.Tensor:
    from fastseg.kernels import mixed_depthwise_conv as kernels
    return kernels.forward(x, weights, bias, residual)


@torch.library.custom_op("fastseg::mixed_depthwise_conv2d_triton_backward", mutates_args=())
def _triton_backward(grad_out: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor],
                     residual: bool) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    from fastseg.kernels import mixed_depthwise_conv as kernels
    return kernels.backward(grad_out, x, weights, residual)


_triton_forward.register_fake(_fake_forward)
_triton_backward.register_fake(_fake_backward)
_triton_forward.register_autograd(_make_backward(_triton_backward), setup_context=_setup_context)

_FUSED = {"cpu": cpp_op("mixed_depthwise_conv2d"), "cuda": cpp_op("mixed_depthwise_conv2d"),
          "triton": _triton_forward}


@autocast_inputs
def mixed_depthwise_conv2d(x: torch.Tensor, weights: Sequence[torch.Tensor],
                           biases: Optional[Sequence[torch.Tensor]] = None, residual: bool = False,
                           *, backend: str = "auto") -> torch.Tensor:
    """Depthwise conv with a different odd kernel size per channel group, fused in one op.

    Args:
        x: ``[N, C, H, W]`` float tensor (NCHW or channels-last; other strides are copied).
        weights: per-group depthwise kernels, ``weights[g]`` of shape ``[C_g, 1, k_g, k_g]`` with
            odd ``k_g`` and ``Σ C_g = C`` (group g covers the next ``C_g`` channels of ``x``).
        biases: optional per-group biases, ``biases[g]`` of shape ``[C_g]``.
        residual: add ``x`` to the output (fused).
        backend: ``"auto"`` or one of ``reference``/``cpu``/``cuda``/``triton``
            (see :mod:`fastseg.backend`).

    Returns:
        ``[N, C, H, W]``: ``y[:, g] = depthwise_conv_{k_g}(x[:, g], 'same') + bias[g] (+ x)``.
        Differentiable in ``x``, every weight and every bias on all backends.

    Raises:
        ValueError: naming the argument, for wrong ranks or shapes, even kernel sizes, channel
            counts that do not add up, mixed dtypes or devices, empty inputs, NaN/inf values.
    """
    weights, bias = _validate(x, weights, biases)
    chosen = resolve_backend(backend, x.device, x.dtype)
    _check_finite(x, weights, bias, chosen)
    if chosen == "reference":
        return mixed_depthwise_conv2d_reference(x, weights, biases, residual)
    return _FUSED[chosen](x, weights, bias, bool(residual))
