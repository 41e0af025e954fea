"""``max_pool2x2``: ``F.max_pool2d(x, 2)`` (2×2 windows, stride 2), with a CPU kernel.

Backends: ``reference`` (``F.max_pool2d``) and ``cpu`` (csrc/cpu/max_pool.cpp, NCHW: each output
value and which of its window's four positions won, one byte, so the backward writes every input
position once). ATen's NCHW max pooling walks each window with a generic loop, 19–26× slower
forward on the models' shapes (batch 1, 16 channels at 256²: 5.3 against 0.25 ms). Channels-last
inputs take ATen's kernel, which is fast in that layout. There are no GPU kernels: on CUDA
tensors, and for the ``cuda`` and ``triton`` backends, the reference computes it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backend import _check_name, resolve_backend
from ._registry import cpp_op, register_cpp


def max_pool2x2_reference(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)``: the semantics (the first maximum of each window in row-major
    order gets the gradient; a NaN wins)."""
    return F.max_pool2d(x, 2)


_cpp = cpp_op("max_pool2x2")
_cpp_backward = cpp_op("max_pool2x2_backward")


def _fake(x):
    shape = (*x.shape[:2], x.shape[2] // 2, x.shape[3] // 2)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.uint8)


def _fake_backward(grad_out, index, x_size):
    return grad_out.new_empty(x_size)


def _setup_context(ctx, inputs, output):
    (x,) = inputs
    _, index = output
    ctx.save_for_backward(index)
    ctx.mark_non_differentiable(index)
    ctx.x_size = tuple(x.shape)


def _backward(ctx, grad_y, _grad_index):
    (index,) = ctx.saved_tensors
    return _cpp_backward(grad_y, index, ctx.x_size)


register_cpp("max_pool2x2", _fake, _fake_backward, _setup_context, _backward)


def max_pool2x2(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """2×2 max pooling with stride 2, as ``F.max_pool2d(x, 2)``.

    Args:
        x: ``[N, C, H, W]`` with H, W ≥ 2 (an odd last row or column is dropped, as
            ``F.max_pool2d`` does).
        backend: ``"cpu"`` runs the kernel on NCHW-contiguous CPU tensors of float32/float64;
            every other case (channels-last too) runs the reference.

    Returns:
        ``[N, C, H // 2, W // 2]`` in ``x``'s memory format.
    """
    _check_name(backend)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must have shape [N, C, H, W], got {shape}")
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"x must have H and W of at least 2, got {tuple(x.shape)}")
    fused = (_cpp is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
             and x.is_contiguous() and not torch.is_autocast_enabled("cpu")
             and resolve_backend(backend, x.device, x.dtype) == "cpu")
    if not fused:
        return max_pool2x2_reference(x)
    return _cpp(x)[0]
