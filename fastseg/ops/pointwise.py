"""``pointwise_conv2d``: a 1×1 convolution ``F.conv2d(x, weight, bias)`` with a CPU kernel.

Backends: ``reference`` (``F.conv2d``) and ``cpu`` (csrc/cpu/pointwise_conv.cpp, NCHW): the
products ``W [C_out, C_in] · x_n [C_in, H·W]`` register-blocked on blocks of pixels (forward, and
the input gradient with ``Wᵀ``), the weight gradient through BLAS. ATen runs an NCHW 1×1
convolution through oneDNN's reorders into its blocked layout, or (``thnn_conv2d``) through BLAS
calls that run these shapes — few channels, many pixels — at a fraction of the machine's speed
(LightAWNet's 16 → 64 channels at 1×128², forward: 0.47 ms as BLAS products, 0.33 ms here; the numbers
are in bench/RESULTS.md, "Ops: `pointwise_conv2d`"). Channels-last inputs take the reference
(oneDNN is fast in that layout). There are no GPU kernels: on CUDA tensors, and for the ``cuda``
and ``triton`` backends, the reference computes it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backend import _check_name, resolve_backend
from ._registry import autocast_inputs, cpp_op, register_cpp


def pointwise_conv2d_reference(x: torch.Tensor, weight: torch.Tensor,
                               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` with a ``[C_out, C_in, 1, 1]`` weight: the semantics."""
    return F.conv2d(x, weight, bias)


_cpp = cpp_op("pointwise_conv2d")
_cpp_backward = cpp_op("pointwise_conv2d_backward")


def _fake(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))


def _fake_backward(grad_out, x, weight):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[:1])


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    grad_x, grad_w, grad_b = _cpp_backward(grad_y, x, weight)
    return grad_x, grad_w, grad_b if ctx.has_bias else None


register_cpp("pointwise_conv2d", _fake, _fake_backward, _setup_context, _backward)


def fused(x: torch.Tensor, weight: torch.Tensor, backend: str) -> bool:
    """Whether :func:`pointwise_conv2d` runs the CPU kernel on these arguments (an NCHW-contiguous
    float32/float64 CPU tensor, outside autocast, ``backend`` resolving to ``"cpu"``)."""
    return (_cpp is not None and x.device.type == "cpu" and x.dim() == 4
            and x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype
            and x.is_contiguous() and not torch.is_autocast_enabled("cpu")
            and resolve_backend(backend, x.device, x.dtype) == "cpu")


@autocast_inputs
def pointwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     *, backend: str = "auto") -> torch.Tensor:
    """1×1 convolution, ``F.conv2d(x, weight, bias)``.

    Args:
        x: ``[N, C_in, H, W]``.
        weight: ``[C_out, C_in, 1, 1]``.
        bias: ``[C_out]`` or None.
        backend: ``"cpu"`` runs the kernel on NCHW-contiguous CPU tensors of float32/float64;
            every other case (channels-last too) runs the reference.

    Returns:
        ``[N, C_out, H, W]`` (NCHW from the kernel; the reference's layout otherwise).
    """
    _check_name(backend)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must have shape [N, C_in, H, W], got {shape}")
    if (not isinstance(weight, torch.Tensor) or weight.dim() != 4
            or tuple(weight.shape[1:]) != (x.shape[1], 1, 1)):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must have shape [C_out, {x.shape[1]}, 1, 1], got {shape}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    if not fused(x, weight, backend):
        return pointwise_conv2d_reference(x, weight, bias)
    return _cpp(x, weight, bias)
