"""Triton kernels for the mixed depthwise convolution (:mod:`fastseg.ops.mixed_depthwise_conv`).

One launch per channel group, with the group's odd kernel size ``K`` a compile-time constant. A
program owns one ``BLOCK_H × BLOCK_W`` output tile of one ``(n, c)`` plane. Every tap is read as a
shifted tile whose out-of-image part is masked to zero ('same' padding without a padded copy); the
taps' rows run in a loop and their columns unroll, so only ``K`` loads are in flight at a time
(neighbouring taps hit the same cache lines). :func:`launch_config` picks tile and warps per
kernel size.

* :func:`forward`: ``y = depthwise_conv_K(x) + bias (+ x)``.
* :func:`backward`: ``grad_x`` is the forward kernel run on ``grad_out`` with the flipped
  weights (the adjoint of a 'same' cross-correlation), ``+ grad_out`` for the residual; the
  weight and bias gradients are per-tile partial sums that torch reduces afterwards, which keeps
  them deterministic (no atomics).

Layouts: the kernels read NCHW-contiguous inputs, so a channels-last or non-contiguous ``x`` or
``grad_out`` is copied once with ``.contiguous()``; outputs are written through their strides
straight into a tensor in ``x``'s memory format (:func:`fastseg._layout.empty_like_output`).
Sums are accumulated in float32, or in float64 for float64 inputs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from fastseg._layout import empty_like_output

from ._launch import launch

__all__ = ["forward", "backward", "launch_config"]


@triton.jit
def _depthwise_conv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    C, H, W, c_start, C_group,
    stride_yn, stride_yc, stride_yh, stride_yw,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One channel group of ``y[n, c] = conv_K(x[n, c], 'same') + b[c] (+ x[n, c])``.

    x ``[N, C, H, W]`` contiguous; w ``[C_group, 1, K, K]`` contiguous in ``ACC_DTYPE`` (this
    group's kernels); b ``[C]`` (read only if ``HAS_BIAS``); y ``[N, C, H, W]`` with strides
    ``stride_y*``. Channels ``c_start .. c_start + C_group - 1`` are computed. Program
    ``(p, th, tw)`` computes the ``BLOCK_H × BLOCK_W`` output tile ``(th, tw)`` of plane
    ``p = n * C_group + (c - c_start)``.
    Grid: ``(N * C_group, cdiv(H, BLOCK_H), cdiv(W, BLOCK_W))``.
    """
    plane = tl.program_id(0)
    c_in_group = plane % C_group
    c = c_start + c_in_group
    # The plane's base address in 64 bits once; offsets inside a plane stay 32-bit.
    x_plane = x_ptr + ((plane // C_group).to(tl.int64) * C + c) * H * W
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    w_taps = w_ptr + c_in_group * (K * K)

    acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=ACC_DTYPE)
    # Rows of taps in a loop, columns unrolled: K loads in flight, not K², keeps registers low.
    for i in range(K):
        src_rows = rows + (i - K // 2)
        row_ptrs = x_plane + src_rows * W
        row_ok = (src_rows >= 0) & (src_rows < H)
        for j in tl.static_range(K):
            src_cols = cols + (j - K // 2)
            mask = row_ok & (src_cols >= 0) & (src_cols < W)
            tap = tl.load(row_ptrs + src_cols, mask=mask, other=0.0)
            acc += tap.to(ACC_DTYPE) * tl.load(w_taps + i * K + j)

    inside = (rows < H) & (cols < W)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(ACC_DTYPE)
    if RESIDUAL:
        acc += tl.load(x_plane + rows * W + cols, mask=inside, other=0.0).to(ACC_DTYPE)
    y = (y_ptr + (plane // C_group).to(tl.int64) * stride_yn + c.to(tl.int64) * stride_yc
         + rows * stride_yh + cols * stride_yw)
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _depthwise_conv_grad_params_kernel(
    grad_out_ptr, x_ptr, grad_w_partial_ptr, grad_b_partial_ptr,
    C, H, W, c_start, C_group,
    K: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Per-tile partial sums of one channel group's weight and bias gradients.

    grad_out, x ``[N, C, H, W]`` contiguous; program ``(p, th, tw)`` takes tile ``t = th *
    cdiv(W, BLOCK_W) + tw`` of plane ``p = n * C_group + cg`` (``c = c_start + cg``), as in
    ``_depthwise_conv_kernel``. With ``q = K // 2`` and ``T`` tiles per plane, writes in ``ACC_DTYPE``

    * ``grad_w_partial[p, t, i*K + j] = Σ_tile grad_out[n, c, r, s] · x[n, c, r+i-q, s+j-q]``
      (``[N * C_group, T, K * K]``, zero outside the image);
    * ``grad_b_partial[p, t] = Σ_tile grad_out[n, c, r, s]`` (``[N * C_group, T]``).

    Grid: ``(N * C_group, cdiv(H, BLOCK_H), cdiv(W, BLOCK_W))``.
    """
    plane = tl.program_id(0)
    c = c_start + plane % C_group
    offset = ((plane // C_group).to(tl.int64) * C + c) * H * W
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    num_tiles = tl.num_programs(1) * tl.num_programs(2)
    tile = plane.to(tl.int64) * num_tiles + tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)

    inside = (rows < H) & (cols < W)
    grad = tl.load(grad_out_ptr + offset + rows * W + cols, mask=inside, other=0.0).to(ACC_DTYPE)
    tl.store(grad_b_partial_ptr + tile, tl.sum(tl.sum(grad, 1), 0))

    grad_w_partial = grad_w_partial_ptr + tile * (K * K)
    x_plane = x_ptr + offset
    for i in range(K):
        src_rows = rows + (i - K // 2)
        row_ptrs = x_plane + src_rows * W
        row_ok = (src_rows >= 0) & (src_rows < H)
        for j in tl.static_range(K):
            src_cols = cols + (j - K // 2)
            mask = row_ok & (src_cols >= 0) & (src_cols < W)
            tap = tl.load(row_ptrs + src_cols, mask=mask, other=0.0).to(ACC_DTYPE)
            tl.store(grad_w_partial + i * K + j, tl.sum(tl.sum(grad * tap, 1), 0))


def launch_config(H: int, W: int, K: int) -> tuple[int, int, int]:
    """``(BLOCK_H, BLOCK_W, num_warps)`` for an ``H × W`` plane and a ``K × K`` kernel.

    Tiles of up to 16 × 64 pixels (less for a smaller plane), about 8 pixels per thread, fewer
    for K ≥ 7 whose taps keep more loads in flight: every config the models launch then compiles
    to ≤ 128 registers per thread with no spills (``python -m fastseg gpu-report``).
    """
    block_h = min(16, triton.next_power_of_2(H))
    block_w = min(64, triton.next_power_of_2(W))
    pixels_per_thread = 8 if K <= 5 else 4
    num_warps = max(1, min(8, block_h * block_w // (32 * pixels_per_thread)))
    return block_h, block_w, num_warps


def _blocks(H, W, K, block_h, block_w, num_warps):
    default = launch_config(H, W, K)
    chosen = (block_h or default[0], block_w or default[1], num_warps or default[2])
    for name, value in zip(("block_h", "block_w", "num_warps"), chosen):
        if value <= 0 or value & (value - 1):
            raise ValueError(f"{name} must be a positive power of two, got {value}")
    return chosen


def _acc_dtype(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _conv(x: torch.Tensor, weights: Sequence[torch.Tensor], bias: Optional[torch.Tensor],
          residual: bool, out: torch.Tensor, blocks: dict) -> torch.Tensor:
    """``out = concat_g(conv_{k_g}(x[:, g])) + bias (+ x)`` for NCHW-contiguous ``x``."""
    N, C, H, W = x.shape
    acc_tl, acc_torch = _acc_dtype(x.dtype)
    c_start = 0
    for w in weights:
        C_group, K = w.shape[0], w.shape[-1]
        block_h, block_w, num_warps = _blocks(H, W, K, **blocks)
        launch(_depthwise_conv_kernel, (N * C_group, triton.cdiv(H, block_h), triton.cdiv(W, block_w)),
               x, w.to(acc_torch).contiguous(), bias if bias is not None else x, out,
               C, H, W, c_start, C_group, *out.stride(),
               K=K, HAS_BIAS=bias is not None, RESIDUAL=residual, ACC_DTYPE=acc_tl,
               BLOCK_H=block_h, BLOCK_W=block_w, num_warps=num_warps)
        c_start += C_group
    return out


def forward(x: torch.Tensor, weights: Sequence[torch.Tensor], bias: Optional[torch.Tensor],
            residual: bool, *, block_h: Optional[int] = None, block_w: Optional[int] = None,
            num_warps: Optional[int] = None) -> torch.Tensor:
    """Mixed depthwise conv: ``y = concat_g(depthwise_conv_{k_g}(x[:, g], 'same')) + bias (+ x)``.

    x ``[N, C, H, W]``; ``weights[g]`` ``[C_g, 1, k_g, k_g]`` (odd ``k_g``, ``Σ C_g = C``);
    bias ``[C]`` or ``None``. Returns ``[N, C, H, W]`` in ``x``'s memory format. Block sizes
    (powers of two) and warps default to :func:`launch_config` per group.
    """
    blocks = dict(block_h=block_h, block_w=block_w, num_warps=num_warps)
    bias = bias.contiguous() if bias is not None else None
    return _conv(x.contiguous(), weights, bias, residual, empty_like_output(x), blocks)


def backward(grad_out: torch.Tensor, x: torch.Tensor, weights: Sequence[torch.Tensor],
             residual: bool, *, block_h: Optional[int] = None, block_w: Optional[int] = None,
             num_warps: Optional[int] = None
             ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Gradients of :func:`forward` given ``grad_out`` ``[N, C, H, W]``.

    Returns ``(grad_x, grad_weights, grad_bias)``: ``grad_x`` ``[N, C, H, W]`` in ``x``'s memory
    format, ``grad_weights[g]`` contiguous with ``weights[g]``'s shape, ``grad_bias`` ``[C]``
    (always computed).
    """
    N, C, H, W = x.shape
    blocks = dict(block_h=block_h, block_w=block_w, num_warps=num_warps)
    grad_x = empty_like_output(x)
    grad_out, x = grad_out.contiguous(), x.contiguous()
    _conv(grad_out, [w.flip(-2, -1) for w in weights], None, residual, grad_x, blocks)

    acc_tl, acc_torch = _acc_dtype(x.dtype)
    grad_weights, grad_bias = [], []
    c_start = 0
    for w in weights:
        C_group, K = w.shape[0], w.shape[-1]
        block_h, block_w, num_warps = _blocks(H, W, K, **blocks)
        grid = (N * C_group, triton.cdiv(H, block_h), triton.cdiv(W, block_w))
        num_tiles = grid[1] * grid[2]
        grad_w_partial = torch.empty(N, C_group, num_tiles, K * K, dtype=acc_torch, device=x.device)
        grad_b_partial = torch.empty(N, C_group, num_tiles, dtype=acc_torch, device=x.device)
        launch(_depthwise_conv_grad_params_kernel, grid,
               grad_out, x, grad_w_partial, grad_b_partial, C, H, W, c_start, C_group,
               K=K, ACC_DTYPE=acc_tl, BLOCK_H=block_h, BLOCK_W=block_w, num_warps=num_warps)
        grad_weights.append(grad_w_partial.sum((0, 2)).view(C_group, 1, K, K).to(w.dtype))
        grad_bias.append(grad_b_partial.sum((0, 2)))
        c_start += C_group
    return grad_x, grad_weights, torch.cat(grad_bias).to(x.dtype)
