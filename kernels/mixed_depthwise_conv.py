"""Triton kernels for the mixed depthwise convolution (:mod:`fastseg.ops.mixed_depthwise_conv`).

One launch per channel group, with the group's odd kernel size ``K`` a compile-time constant so
the ``K × K`` taps unroll. A program owns a ``BLOCK_NC × BLOCK_H × BLOCK_W`` tile: the same
spatial tile of ``BLOCK_NC`` of the group's ``(n, c)`` planes (several planes per program keep
small images from leaving most lanes idle). Every tap is read as a shifted tile whose
out-of-image part is masked to zero: 'same' padding without a padded copy.

* :func:`forward`: ``y = depthwise_conv_K(x) + bias (+ x)``.
* :func:`backward`: ``grad_x`` is the forward kernel run on ``grad_out`` with the flipped
  weights (the adjoint of a 'same' cross-correlation), ``+ grad_out`` for the residual; the
  weight and bias gradients are per-tile partial sums that torch reduces afterwards, which keeps
  them deterministic (no atomics).

Layouts: the kernels read NCHW-contiguous inputs, so a channels-last or non-contiguous ``x`` or
``grad_out`` is copied once with ``.contiguous()``; outputs are written through their strides
straight into a tensor in ``x``'s memory format (:func:`~fastseg.ops._registry.empty_like_output`).
Sums are accumulated in float32, or in float64 for float64 inputs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from fastseg.ops._registry import empty_like_output

__all__ = ["forward", "backward", "BLOCK_H", "BLOCK_W", "BLOCK_ELEMENTS"]

# Default tile: at most BLOCK_H × BLOCK_W pixels (less for a smaller image), and as many planes
# as fit in BLOCK_ELEMENTS.
BLOCK_H = 16
BLOCK_W = 32
BLOCK_ELEMENTS = 2048


@triton.jit
def _depthwise_conv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    N, C, H, W, c_start, C_group,
    stride_yn, stride_yc, stride_yh, stride_yw,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_NC: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One channel group of ``y[n, c] = conv_K(x[n, c], 'same') + b[c] (+ x[n, c])``.

    x ``[N, C, H, W]`` contiguous; w ``[C_group, 1, K, K]`` contiguous in ``ACC_DTYPE`` (this
    group's kernels); b ``[C]`` (read only if ``HAS_BIAS``); y ``[N, C, H, W]`` with strides
    ``stride_y*``. Channels ``c_start .. c_start + C_group - 1`` are computed; program ``pid``
    along axis 0 takes planes ``pid * BLOCK_NC + q`` of ``[N, C_group]`` in row-major order.
    Grid: ``(cdiv(N * C_group, BLOCK_NC), cdiv(H, BLOCK_H), cdiv(W, BLOCK_W))``.
    """
    planes = tl.program_id(0) * BLOCK_NC + tl.arange(0, BLOCK_NC)[:, None, None]
    plane_ok = planes < N * C_group
    n = (planes // C_group).to(tl.int64)
    c_in_group = planes % C_group
    c = c_start + c_in_group
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[None, :, None]
    cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)[None, None, :]
    centers = x_ptr + (n * C + c) * H * W + rows * W + cols
    w_taps = w_ptr + c_in_group * (K * K)
    # Tap (i, j) reads x[r + i - K//2, s + j - K//2]; its bounds are compared against constants
    # so the unrolled taps do no index arithmetic.
    rows_past_end, cols_past_end = rows - H, cols - W

    acc = tl.zeros((BLOCK_NC, BLOCK_H, BLOCK_W), dtype=ACC_DTYPE)
    for i in tl.static_range(K):
        row_ptrs = centers + (i - K // 2) * W
        row_ok = plane_ok & (rows >= K // 2 - i) & (rows_past_end < K // 2 - i)
        for j in tl.static_range(K):
            mask = row_ok & (cols >= K // 2 - j) & (cols_past_end < K // 2 - j)
            tap = tl.load(row_ptrs + (j - K // 2), mask=mask, other=0.0)
            acc += tap.to(ACC_DTYPE) * tl.load(w_taps + (i * K + j), mask=plane_ok, other=0.0)

    inside = plane_ok & (rows < H) & (cols < W)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=plane_ok, other=0.0).to(ACC_DTYPE)
    if RESIDUAL:
        acc += tl.load(centers, mask=inside, other=0.0).to(ACC_DTYPE)
    y = y_ptr + n * stride_yn + c.to(tl.int64) * stride_yc + rows * stride_yh + cols * stride_yw
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _depthwise_conv_grad_params_kernel(
    grad_out_ptr, x_ptr, grad_w_partial_ptr, grad_b_partial_ptr,
    N, C, H, W, c_start, C_group,
    K: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_NC: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Per-tile partial sums of one channel group's weight and bias gradients.

    grad_out, x ``[N, C, H, W]`` contiguous; planes assigned as in ``_depthwise_conv_kernel``.
    With ``c = c_start + cg``, ``p = K // 2`` and ``t`` the row-major index of the program's
    spatial tile among ``T``, writes in ``ACC_DTYPE``

    * ``grad_w_partial[n, cg, t, i*K + j] = Σ_tile grad_out[n, c, r, s] · x[n, c, r+i-p, s+j-p]``
      (``[N, C_group, T, K * K]``, zero outside the image);
    * ``grad_b_partial[n, c, t] = Σ_tile grad_out[n, c, r, s]`` (``[N, C, T]``).

    Grid: ``(cdiv(N * C_group, BLOCK_NC), cdiv(H, BLOCK_H), cdiv(W, BLOCK_W))``.
    """
    planes_1d = tl.program_id(0) * BLOCK_NC + tl.arange(0, BLOCK_NC)
    plane_ok_1d = planes_1d < N * C_group
    n_1d = planes_1d // C_group
    c_1d = c_start + planes_1d % C_group
    plane_ok = plane_ok_1d[:, None, None]
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[None, :, None]
    cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)[None, None, :]
    offsets = (n_1d.to(tl.int64) * C + c_1d)[:, None, None] * H * W + rows * W + cols
    num_tiles = tl.num_programs(1) * tl.num_programs(2)
    tile = tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)

    inside = plane_ok & (rows < H) & (cols < W)
    grad = tl.load(grad_out_ptr + offsets, mask=inside, other=0.0).to(ACC_DTYPE)
    tl.store(grad_b_partial_ptr + (n_1d * C + c_1d) * num_tiles + tile,
             tl.sum(tl.sum(grad, 2), 1), mask=plane_ok_1d)

    grad_w_partial = grad_w_partial_ptr + (planes_1d * num_tiles + tile) * (K * K)
    x_centers = x_ptr + offsets
    rows_past_end, cols_past_end = rows - H, cols - W
    for i in tl.static_range(K):
        row_ptrs = x_centers + (i - K // 2) * W
        row_ok = plane_ok & (rows >= K // 2 - i) & (rows_past_end < K // 2 - i)
        for j in tl.static_range(K):
            mask = row_ok & (cols >= K // 2 - j) & (cols_past_end < K // 2 - j)
            tap = tl.load(row_ptrs + (j - K // 2), mask=mask, other=0.0).to(ACC_DTYPE)
            tl.store(grad_w_partial + (i * K + j), tl.sum(tl.sum(grad * tap, 2), 1),
                     mask=plane_ok_1d)


def _block_sizes(planes: int, H: int, W: int, block_nc: Optional[int], block_h: Optional[int],
                 block_w: Optional[int]) -> tuple[int, int, int]:
    block_h = block_h or min(BLOCK_H, triton.next_power_of_2(H))
    block_w = block_w or min(BLOCK_W, triton.next_power_of_2(W))
    block_nc = block_nc or min(triton.next_power_of_2(planes),
                               max(1, BLOCK_ELEMENTS // (block_h * block_w)))
    for name, value in (("block_nc", block_nc), ("block_h", block_h), ("block_w", block_w)):
        if value <= 0 or value & (value - 1):
            raise ValueError(f"{name} must be a positive power of two, got {value}")
    return block_nc, block_h, block_w


def _acc_dtype(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _grid(planes: int, H: int, W: int, blocks: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(triton.cdiv(size, block) for size, block in zip((planes, H, W), blocks))


def _conv(x: torch.Tensor, weights: Sequence[torch.Tensor], bias: Optional[torch.Tensor],
          residual: bool, out: torch.Tensor, blocks: tuple[int, int, int]) -> torch.Tensor:
    """``out = concat_g(conv_{k_g}(x[:, g])) + bias (+ x)`` for NCHW-contiguous ``x``."""
    N, C, H, W = x.shape
    acc_tl, acc_torch = _acc_dtype(x.dtype)
    c_start = 0
    for w in weights:
        C_group, K = w.shape[0], w.shape[-1]
        _depthwise_conv_kernel[_grid(N * C_group, H, W, blocks)](
            x, w.to(acc_torch).contiguous(), bias if bias is not None else x, out,
            N, C, H, W, c_start, C_group, *out.stride(),
            K=K, HAS_BIAS=bias is not None, RESIDUAL=residual, ACC_DTYPE=acc_tl,
            BLOCK_NC=blocks[0], BLOCK_H=blocks[1], BLOCK_W=blocks[2],
        )
        c_start += C_group
    return out


def forward(x: torch.Tensor, weights: Sequence[torch.Tensor], bias: Optional[torch.Tensor],
            residual: bool, *, block_nc: Optional[int] = None, block_h: Optional[int] = None,
            block_w: Optional[int] = None) -> torch.Tensor:
    """Mixed depthwise conv: ``y = concat_g(depthwise_conv_{k_g}(x[:, g], 'same')) + bias (+ x)``.

    x ``[N, C, H, W]``; ``weights[g]`` ``[C_g, 1, k_g, k_g]`` (odd ``k_g``, ``Σ C_g = C``);
    bias ``[C]`` or ``None``. Returns ``[N, C, H, W]`` in ``x``'s memory format. Block sizes
    (powers of two) default from ``BLOCK_H``, ``BLOCK_W`` and ``BLOCK_ELEMENTS``.
    """
    N, _, H, W = x.shape
    blocks = _block_sizes(N * max(w.shape[0] for w in weights), H, W, block_nc, block_h, block_w)
    bias = bias.contiguous() if bias is not None else None
    return _conv(x.contiguous(), weights, bias, residual, empty_like_output(x), blocks)


def backward(grad_out: torch.Tensor, x: torch.Tensor, weights: Sequence[torch.Tensor],
             residual: bool, *, block_nc: Optional[int] = None, block_h: Optional[int] = None,
             block_w: Optional[int] = None
             ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Gradients of :func:`forward` given ``grad_out`` ``[N, C, H, W]``.

    Returns ``(grad_x, grad_weights, grad_bias)``: ``grad_x`` ``[N, C, H, W]`` in ``x``'s memory
    format, ``grad_weights[g]`` contiguous with ``weights[g]``'s shape, ``grad_bias`` ``[C]``
    (always computed).
    """
    N, C, H, W = x.shape
    blocks = _block_sizes(N * max(w.shape[0] for w in weights), H, W, block_nc, block_h, block_w)
    grad_x = empty_like_output(x)
    grad_out, x = grad_out.contiguous(), x.contiguous()
    _conv(grad_out, [w.flip(-2, -1) for w in weights], None, residual, grad_x, blocks)

    acc_tl, acc_torch = _acc_dtype(x.dtype)
    num_tiles = triton.cdiv(H, blocks[1]) * triton.cdiv(W, blocks[2])
    grad_b_partial = torch.empty(N, C, num_tiles, dtype=acc_torch, device=x.device)
    grad_weights = []
    c_start = 0
    for w in weights:
        C_group, K = w.shape[0], w.shape[-1]
        grad_w_partial = torch.empty(N, C_group, num_tiles, K * K, dtype=acc_torch,
                                     device=x.device)
        _depthwise_conv_grad_params_kernel[_grid(N * C_group, H, W, blocks)](
            grad_out, x, grad_w_partial, grad_b_partial, N, C, H, W, c_start, C_group,
            K=K, ACC_DTYPE=acc_tl, BLOCK_NC=blocks[0], BLOCK_H=blocks[1], BLOCK_W=blocks[2],
        )
        grad_weights.append(grad_w_partial.sum((0, 2)).view(C_group, 1, K, K).to(w.dtype))
        c_start += C_group
    return grad_x, grad_weights, grad_b_partial.sum((0, 2)).to(x.dtype)
