"""Sparse global attention on a pixel grid: LGMSNet's parity-group transformer, LightAWNet's
bottleneck attention.

With dilation ``s``, pixel ``(r, c)`` attends to every pixel ``(r', c')`` with ``r' ≡ r`` and
``c' ≡ c (mod s)``: attention runs independently inside each of the ``s²`` parity groups of
``(H/s)·(W/s)`` tokens, per head. ``s = 1`` is full global attention; ``s = 2`` is LGMSNet's
stride-2 dilated attention, a quarter of the cost of full attention.

Layout: token-major ``[N, H, W, heads, d]``, what a ``Linear`` on channels-last features produces,
so no rearrange copies are needed around the op. Backends: ``reference`` (rearrange, matmul,
softmax, matmul: the definition), ``cpu`` and ``cuda`` (``fastseg._C``), ``triton``
(``fastseg.kernels.dilated_attention``). The fused backends are flash-style: an online softmax
whose log-sum-exp is kept for the backward, which recomputes the probabilities; neither pass
materialises a ``(HW/s²)²`` score tensor.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..backend import resolve_backend
from ._registry import autocast_inputs, check_finite, cpp_op, register_cpp

__all__ = ["dilated_attention2d", "dilated_attention2d_reference"]


def _groups(t: torch.Tensor, s: int) -> torch.Tensor:
    """``[N, H, W, heads, c]`` → ``[N, s, s, heads, (H/s)·(W/s), c]``: the parity groups."""
    N, H, W, heads, c = t.shape
    return (t.reshape(N, H // s, s, W // s, s, heads, c).permute(0, 2, 4, 5, 1, 3, 6)
            .reshape(N, s, s, heads, (H // s) * (W // s), c))


def dilated_attention2d_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  dilation: int = 2, scale: Optional[float] = None) -> torch.Tensor:
    """The definition: gather the parity groups, ``softmax(scale · q kᵀ) v`` in each, scatter back.

    q, k ``[N, H, W, heads, d_qk]``; v ``[N, H, W, heads, d_v]``. Returns ``[N, H, W, heads, d_v]``.
    """
    N, H, W, heads, d_qk = q.shape
    s = dilation
    scale = d_qk ** -0.5 if scale is None else scale
    attn = torch.softmax(scale * _groups(q, s) @ _groups(k, s).transpose(-1, -2), dim=-1)
    out = attn @ _groups(v, s)
    return (out.reshape(N, s, s, heads, H // s, W // s, -1).permute(0, 4, 1, 5, 2, 3, 6)
            .reshape(N, H, W, heads, -1))


def _validate(q, k, v, dilation, scale):
    """Check shapes, dtypes, devices and the dilation, naming the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 5:
            raise ValueError(f"{name} must have shape [N, H, W, heads, d], got {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    if not q.is_floating_point():
        raise ValueError(f"q must be a floating-point tensor, got {q.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:4] != q.shape[:4]:
        raise ValueError(f"v must have q's N, H, W, heads {tuple(q.shape[:4])}, got {tuple(v.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be a positive int, got {dilation!r}")
    H, W = q.shape[1:3]
    if H % dilation or W % dilation:
        raise ValueError(f"dilation={dilation} must divide H={H} and W={W} of q "
                         f"(each parity group is (H/dilation)×(W/dilation) tokens)")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")


# --- autograd glue shared by the C++ and Triton ops --------------------------------------------

def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward(q, k, v, dilation, scale):
    out = v.new_empty(v.shape)
    return out, q.new_empty(q.shape[:4], dtype=_lse_dtype(q.dtype))


def _fake_backward(grad_out, q, k, v, out, lse, dilation, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, dilation, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.attention = (dilation, scale)
    ctx.mark_non_differentiable(lse)


def _make_backward(backward_op):
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grad_q, grad_k, grad_v = backward_op(grad_out.contiguous(), q, k, v, out, lse,
                                             *ctx.attention)
        return grad_q, grad_k, grad_v, None, None
    return backward


register_cpp("dilated_attention2d", _fake_forward, _fake_backward, _setup_context,
             _make_backward(cpp_op("dilated_attention2d_backward")))


@torch.library.custom_op("fastseg::dilated_attention2d_triton", mutates_args=())
def _triton_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dilation: int,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from fastseg.kernels import dilated_attention as kernels
    return kernels.forward(q, k, v, dilation, scale)


@torch.library.custom_op("fastseg::dilated_attention2d_triton_backward", mutates_args=())
def _triton_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     out: torch.Tensor, lse: torch.Tensor, dilation: int, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastseg.kernels import dilated_attention as kernels
    return kernels.backward(grad_out, q, k, v, out, lse, dilation, scale)


_triton_forward.register_fake(_fake_forward)
_triton_backward.register_fake(_fake_backward)
_triton_forward.register_autograd(_make_backward(_triton_backward), setup_context=_setup_context)

_FUSED = {"cpu": cpp_op("dilated_attention2d"), "cuda": cpp_op("dilated_attention2d"),
          "triton": _triton_forward}


@autocast_inputs
def dilated_attention2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dilation: int = 2,
                        scale: Optional[float] = None, *, backend: str = "auto") -> torch.Tensor:
    """Attention inside the ``dilation²`` parity groups of a pixel grid, fused (flash-style).

    Args:
        q: ``[N, H, W, heads, d_qk]`` queries, token-major (any strides: the fused backends
            copy a tensor whose ``heads, d`` dims are not dense once, e.g. none for the
            ``q``/``k``/``v`` slices of one ``Linear``'s output ``reshape``d to this shape).
        k: ``[N, H, W, heads, d_qk]`` keys.
        v: ``[N, H, W, heads, d_v]`` values; ``d_v`` may differ from ``d_qk``.
        dilation: ``s``, dividing ``H`` and ``W``. Pixel ``(r, c)`` attends to the pixels
            ``(r', c')`` with ``r' ≡ r`` and ``c' ≡ c`` mod ``s``. ``1`` is full global attention.
        scale: multiplies the scores ``q·k``; ``None`` is ``d_qk ** -0.5``.
        backend: ``"auto"`` or one of ``reference``/``cpu``/``cuda``/``triton``
            (see :mod:`fastseg.backend`).

    Returns:
        ``[N, H, W, heads, d_v]``: ``out[n, r, c, h] = Σ softmax(scale · q·k) · v`` over the
        query's group. Differentiable in ``q``, ``k`` and ``v`` on all backends.

    Raises:
        ValueError: naming the argument, for wrong ranks or shapes, mixed dtypes or devices, empty
            inputs, a dilation that does not divide ``H`` and ``W``, a non-finite scale, NaN/inf.
    """
    _validate(q, k, v, dilation, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    chosen = resolve_backend(backend, q.device, q.dtype)
    check_finite([("q", q), ("k", k), ("v", v)])
    if chosen == "reference":
        return dilated_attention2d_reference(q, k, v, dilation, scale)
    return _FUSED[chosen](q, k, v, dilation, scale)[0]
