"""Triton kernels for the dynamic (mixture-of-experts) convolution (:mod:`fastseg.ops.dynamic_conv`).

Sample ``n`` is convolved with its own kernel ``W_n = Σ_k routing[n, k] · experts[k]``. No kernel
ever stores ``W_n``: each program mixes the tile of it that it needs from the ``K`` expert tiles
and the sample's routing row, in registers, right before using it.

* :func:`forward`: per sample and group, an implicit GEMM ``y_n[co, p] = Σ_r W_n[co, r] · X_n[r, p]``
  with ``r = (ci, i, j)`` the flattened kernel window and ``X_n`` the im2col matrix of ``x_n``,
  gathered tile by tile with out-of-image (padding) entries masked to zero.
* :func:`backward`:

  - ``grad_x``: the transposed implicit GEMM ``gx_n[ci, q] = Σ_{(co, i, j)} W_n[co, ci, i, j] ·
    gy_n[co, o(q, i, j)]``, gathered over output positions: input pixel ``q`` receives tap
    ``(i, j)`` of output ``o`` only where ``q + pad - tap·dilation`` is a non-negative multiple of
    the stride (strides and dilations need no special kernels).
  - ``grad_experts``, ``grad_routing``, ``grad_bias``: a program owns a tile of the weight and
    loops over samples; per sample it computes that tile of the per-sample weight gradient
    ``gW_n = gy_n · X_nᵀ`` and folds it at once into ``Σ_n routing[n, k] · gW_n`` for every expert
    (``K`` accumulators) and into ``⟨gW_n, experts[k]⟩`` (a partial of ``grad_routing``), so no
    per-sample weight or gradient is ever written. Large images are also split over pixels, for
    enough programs to fill the GPU. Partials are reduced by torch afterwards: deterministic, no
    atomics. The bias terms need only ``Σ_hw gy_n``, which the same kernel sums.

Layouts: the kernels read NCHW-contiguous ``x`` and ``grad_out`` (a channels-last or non-contiguous
one is copied once with ``.contiguous()``) and write ``y`` / ``grad_x`` through their strides
straight into a tensor in ``x``'s memory format. Products run on ``tl.dot`` (tensor cores for
float16/bfloat16; exact IEEE float32, not TF32, for float32) and accumulate in float32, or in
float64 for float64 inputs; the mixed weight tile is rounded to the input dtype before the product,
as a conv with a stored ``W_n`` would. Every block size is a power of two ≥ 16 (``tl.dot``'s
minimum); channel counts below 16 (e.g. ``C_out = 1``) are masked.

Launch configurations come from :func:`conv_config` and :func:`weight_grad_config`; tests pass
their own (small tiles) through the keyword arguments of :func:`forward` and :func:`backward`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from fastseg._layout import empty_like_output

from ._launch import launch

__all__ = ["forward", "backward", "ConvConfig", "WeightGradConfig", "conv_config",
           "weight_grad_config", "output_size"]


class ConvConfig(NamedTuple):
    """Tiles of an implicit-GEMM launch: ``block_m`` channels (output channels in the forward,
    input channels for ``grad_x``) × ``block_p`` pixels per program, the reduction over the
    flattened ``(channel, i, j)`` window ``block_r`` at a time."""
    block_m: int
    block_p: int
    block_r: int
    num_warps: int


class WeightGradConfig(NamedTuple):
    """Tiles of the weight/routing gradient launch: a ``block_co × block_r`` weight tile per
    program, output pixels ``block_p`` at a time, the pixel tiles of each sample split into
    ``pixel_splits`` contiguous ranges (one program each)."""
    block_co: int
    block_r: int
    block_p: int
    pixel_splits: int
    num_warps: int


# Enough programs to keep every SM of a large GPU busy with a few resident programs each.
_TARGET_PROGRAMS = 1024


def _tile(size: int, largest: int) -> int:
    """The smallest power of two ≥ 16 covering ``size``, at most ``largest``."""
    return max(16, min(largest, triton.next_power_of_2(size)))


def conv_config(channels: int, pixels: int, reduction: int) -> ConvConfig:
    """Tiles for an implicit GEMM with ``channels`` rows (per group), ``pixels`` columns (per
    sample) and a reduction of length ``reduction``."""
    block_m = _tile(channels, 64)
    # Narrow channel tiles take more pixels, so a program still does a 64 × 64 product's work.
    block_p = _tile(pixels, 64 * 64 // block_m)
    block_r = _tile(reduction, 32)
    return ConvConfig(block_m, block_p, block_r, 4)


def weight_grad_config(channels: int, reduction: int, pixels: int, num_experts: int,
                       groups: int) -> WeightGradConfig:
    """Tiles for the weight gradient of ``channels`` output channels per group times a flattened
    window of ``reduction`` entries in each of ``groups`` groups, over ``pixels`` output pixels
    per sample. ``num_experts`` accumulators of the tile stay in registers: their
    size is kept to ≤ 4096 elements (32 per thread with 4 warps)."""
    experts_pow2 = triton.next_power_of_2(num_experts)
    block_co = _tile(channels, 32)
    block_r = _tile(reduction, 32)
    while experts_pow2 * block_co * block_r > 4096 and block_r > 16:
        block_r //= 2
    while experts_pow2 * block_co * block_r > 4096 and block_co > 16:
        block_co //= 2
    block_p = _tile(pixels, 64)
    tiles = groups * triton.cdiv(channels, block_co) * triton.cdiv(reduction, block_r)
    pixel_tiles = triton.cdiv(pixels, block_p)
    # Split a sample's pixels only as far as needed for enough programs, and never so far that a
    # split holds less than a few tiles per sample (its partials would outweigh its work).
    splits = max(1, min(triton.cdiv(_TARGET_PROGRAMS, tiles), pixel_tiles // 4))
    splits = triton.cdiv(pixel_tiles, triton.cdiv(pixel_tiles, splits))
    num_warps = 4 if experts_pow2 * block_co * block_r <= 4096 else 8
    return WeightGradConfig(block_co, block_r, block_p, splits, num_warps)


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output extent of a convolution along one dimension (as ``torch.nn.functional.conv2d``)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@triton.jit
def _dynamic_conv_forward_kernel(
    x_ptr, experts_ptr, routing_ptr, bias_ptr, y_ptr,
    C_in, H, W, C_out, H_out, W_out, C_group_in, C_group_out, num_experts,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, kh, kw,
    stride_yn, stride_yc, stride_yh, stride_yw,
    HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``y[n, c, oh, ow] = Σ_{ci, i, j} W_n[c, ci, i, j] · x[n, g·C_group_in + ci, oh·s_h - p_h +
    i·d_h, ow·s_w - p_w + j·d_w] + Σ_k routing[n, k] · bias[k, c]`` with ``g = c // C_group_out``
    and ``W_n = Σ_k routing[n, k] · experts[k]``.

    x ``[N, C_in, H, W]`` contiguous; experts ``[K, C_out, C_group_in, kh, kw]`` contiguous;
    routing ``[N, K]`` contiguous; bias ``[K, C_out]`` contiguous (read only if ``HAS_BIAS``);
    y ``[N, C_out, H_out, W_out]`` with strides ``stride_y*``. A program computes ``BLOCK_CO``
    output channels of one group × ``BLOCK_P`` output pixels (row-major) of one sample, reducing
    over the ``R = C_group_in·kh·kw`` window entries ``BLOCK_R`` at a time.
    Grid: ``(N · groups · cdiv(H_out·W_out, BLOCK_P) · cdiv(C_group_out, BLOCK_CO),)``, the
    channel tile fastest (programs that read the same ``x`` tile run together), then the pixel
    tile, then ``(n, g)``.
    """
    co_tiles = tl.cdiv(C_group_out, BLOCK_CO)
    p_tiles = tl.cdiv(H_out * W_out, BLOCK_P)
    pid = tl.program_id(0)
    co_tile = pid % co_tiles
    p_tile = pid // co_tiles % p_tiles
    sample_group = pid // (co_tiles * p_tiles)
    groups = C_in // C_group_in
    n = sample_group // groups
    g = sample_group % groups

    co = co_tile * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < C_group_out
    c = g * C_group_out + co
    p = p_tile * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < H_out * W_out
    ih0 = (p // W_out) * stride_h - pad_h
    iw0 = (p % W_out) * stride_w - pad_w

    taps = kh * kw
    R = C_group_in * taps
    x_sample = x_ptr + n.to(tl.int64) * C_in * H * W + g * C_group_in * H * W
    routing_row = routing_ptr + n * num_experts
    expert_rows = experts_ptr + c[:, None] * R

    acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=ACC_DTYPE)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < R
        ci = r // taps
        i = r % taps // kw
        j = r % kw
        w_mask = co_ok[:, None] & r_ok[None, :]
        w = tl.zeros((BLOCK_CO, BLOCK_R), dtype=ACC_DTYPE)
        for k in range(num_experts):
            expert = tl.load(expert_rows + k * C_out * R + r[None, :], mask=w_mask, other=0.0)
            w += tl.load(routing_row + k).to(ACC_DTYPE) * expert.to(ACC_DTYPE)
        ih = ih0[None, :] + (i * dil_h)[:, None]
        iw = iw0[None, :] + (j * dil_w)[:, None]
        x_mask = r_ok[:, None] & p_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        patch = tl.load(x_sample + (ci * H * W)[:, None] + ih * W + iw, mask=x_mask, other=0.0)
        acc = tl.dot(w.to(patch.dtype), patch, acc, input_precision="ieee")

    if HAS_BIAS:
        bias = tl.zeros((BLOCK_CO,), dtype=ACC_DTYPE)
        for k in range(num_experts):
            bias += tl.load(routing_row + k).to(ACC_DTYPE) * \
                tl.load(bias_ptr + k * C_out + c, mask=co_ok, other=0.0).to(ACC_DTYPE)
        acc += bias[:, None]
    y = y_ptr + n.to(tl.int64) * stride_yn + c[:, None].to(tl.int64) * stride_yc + \
        (p // W_out * stride_yh + p % W_out * stride_yw)[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=co_ok[:, None] & p_ok[None, :])


@triton.jit
def _dynamic_conv_input_grad_kernel(
    grad_out_ptr, experts_ptr, routing_ptr, grad_x_ptr,
    C_in, H, W, C_out, H_out, W_out, C_group_in, C_group_out, num_experts,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, kh, kw,
    stride_gn, stride_gc, stride_gh, stride_gw,
    ACC_DTYPE: tl.constexpr,
    BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``grad_x[n, g·C_group_in + ci, ih, iw] = Σ_{co, i, j} W_n[g·C_group_out + co, ci, i, j] ·
    grad_out[n, g·C_group_out + co, oh, ow]`` over the taps with ``oh·s_h = ih + p_h - i·d_h`` and
    ``ow·s_w = iw + p_w - j·d_w`` inside the output, ``W_n = Σ_k routing[n, k] · experts[k]``.

    grad_out ``[N, C_out, H_out, W_out]`` contiguous; experts ``[K, C_out, C_group_in, kh, kw]``
    contiguous; routing ``[N, K]`` contiguous; grad_x ``[N, C_in, H, W]`` with strides
    ``stride_g*``. A program computes ``BLOCK_CI`` input channels of one group × ``BLOCK_P`` input
    pixels (row-major) of one sample, reducing over the ``R = C_group_out·kh·kw`` entries
    ``(co, i, j)`` ``BLOCK_R`` at a time.
    Grid: ``(N · groups · cdiv(H·W, BLOCK_P) · cdiv(C_group_in, BLOCK_CI),)``, ordered as the
    forward's.
    """
    ci_tiles = tl.cdiv(C_group_in, BLOCK_CI)
    p_tiles = tl.cdiv(H * W, BLOCK_P)
    pid = tl.program_id(0)
    ci_tile = pid % ci_tiles
    p_tile = pid // ci_tiles % p_tiles
    sample_group = pid // (ci_tiles * p_tiles)
    groups = C_in // C_group_in
    n = sample_group // groups
    g = sample_group % groups

    ci = ci_tile * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = ci < C_group_in
    q = p_tile * BLOCK_P + tl.arange(0, BLOCK_P)
    q_ok = q < H * W
    ih = q // W
    iw = q % W

    taps = kh * kw
    R = C_group_out * taps
    grad_out_sample = grad_out_ptr + n.to(tl.int64) * C_out * H_out * W_out + \
        g * C_group_out * H_out * W_out
    routing_row = routing_ptr + n * num_experts
    # experts[k, g·C_group_out + co, ci, i, j] sits at k·C_out·C_group_in·taps + this + co·C_group_in·taps + tap.
    expert_cols = experts_ptr + (g * C_group_out * C_group_in + ci[:, None]) * taps

    acc = tl.zeros((BLOCK_CI, BLOCK_P), dtype=ACC_DTYPE)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < R
        co = r // taps
        tap = r % taps
        w_mask = ci_ok[:, None] & r_ok[None, :]
        w_offsets = (co * C_group_in * taps + tap)[None, :]
        w = tl.zeros((BLOCK_CI, BLOCK_R), dtype=ACC_DTYPE)
        for k in range(num_experts):
            expert = tl.load(expert_cols + k * C_out * C_group_in * taps + w_offsets, mask=w_mask,
                             other=0.0)
            w += tl.load(routing_row + k).to(ACC_DTYPE) * expert.to(ACC_DTYPE)
        # Output row reaching input row ih through tap row i: (ih + p_h - i·d_h) / s_h when exact.
        oh_scaled = ih[None, :] + pad_h - (tap // kw * dil_h)[:, None]
        ow_scaled = iw[None, :] + pad_w - (tap % kw * dil_w)[:, None]
        # Clamped before dividing: negative quotients round differently in C and Python.
        oh = tl.maximum(oh_scaled, 0) // stride_h
        ow = tl.maximum(ow_scaled, 0) // stride_w
        g_mask = r_ok[:, None] & q_ok[None, :] & (oh_scaled >= 0) & (ow_scaled >= 0) & \
            (oh * stride_h == oh_scaled) & (ow * stride_w == ow_scaled) & \
            (oh < H_out) & (ow < W_out)
        grad = tl.load(grad_out_sample + (co * H_out * W_out)[:, None] + oh * W_out + ow,
                       mask=g_mask, other=0.0)
        acc = tl.dot(w.to(grad.dtype), grad, acc, input_precision="ieee")

    gx = grad_x_ptr + n.to(tl.int64) * stride_gn + \
        (g * C_group_in + ci)[:, None].to(tl.int64) * stride_gc + \
        (ih * stride_gh + iw * stride_gw)[None, :]
    tl.store(gx, acc.to(grad_x_ptr.dtype.element_ty), mask=ci_ok[:, None] & q_ok[None, :])


@triton.jit
def _dynamic_conv_weight_grad_kernel(
    grad_out_ptr, x_ptr, experts_ptr, routing_ptr,
    grad_experts_partial_ptr, grad_routing_partial_ptr, grad_out_sum_partial_ptr,
    N, C_in, H, W, C_out, H_out, W_out, C_group_in, C_group_out, num_experts,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, kh, kw, tiles_per_split,
    ACC_DTYPE: tl.constexpr, EXPERTS: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Per-program partials of the expert, routing and bias gradients.

    grad_out ``[N, C_out, H_out, W_out]``, x ``[N, C_in, H, W]``, experts
    ``[K, C_out, C_group_in, kh, kw]`` (viewed as ``[K, C_out, R]``, ``R = C_group_in·kh·kw``) and
    routing ``[N, K]``, all contiguous; ``EXPERTS`` is a power of two ≥ ``K``. Program
    ``(t, s)`` owns weight tile ``t`` (``BLOCK_CO`` channels ``c`` of group ``g`` × ``BLOCK_R``
    window entries ``r``, row-major over ``[groups, C_group_out / BLOCK_CO, R / BLOCK_R]``, ``T``
    tiles) and the output pixels of pixel tiles ``[s·tiles_per_split, (s+1)·tiles_per_split)``
    of every sample (``S`` splits). With ``gW_n^s[c, r] = Σ_{p in split s} grad_out[n, c, p] ·
    X_n[r, p]`` (``X_n`` the im2col matrix of ``x_n``, zero in the padding) it writes, in
    ``ACC_DTYPE``:

    * ``grad_experts_partial[s, k, c, r] = Σ_n routing[n, k] · gW_n^s[c, r]`` (``[S, K, C_out, R]``);
    * ``grad_routing_partial[s, t, n, k] = Σ_{tile} gW_n^s · experts[k]`` (``[S, T, N, EXPERTS]``,
      entries ``k ≥ K`` are zero);
    * ``grad_out_sum_partial[s, n, c] = Σ_{p in split s} grad_out[n, c, p]`` (``[S, N, C_out]``),
      from the programs of the first window tile only.

    Grid: ``(T, S)``.
    """
    co_tiles = tl.cdiv(C_group_out, BLOCK_CO)
    taps = kh * kw
    R = C_group_in * taps
    r_tiles = tl.cdiv(R, BLOCK_R)
    tile = tl.program_id(0)
    split = tl.program_id(1)
    g = tile // (co_tiles * r_tiles)
    co_tile = tile // r_tiles % co_tiles
    r_tile = tile % r_tiles

    co = co_tile * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < C_group_out
    c = g * C_group_out + co
    r = r_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    ci = r // taps
    i_dil = r % taps // kw * dil_h
    j_dil = r % kw * dil_w
    x_rows = (g * C_group_in + ci) * H * W
    experts_index = tl.arange(0, EXPERTS)
    experts_ok = experts_index < num_experts
    tile_mask = co_ok[:, None] & r_ok[None, :]
    expert_tiles = tl.load(
        experts_ptr + experts_index[:, None, None] * C_out * R + (c[:, None] * R + r[None, :])[None],
        mask=experts_ok[:, None, None] & tile_mask[None], other=0.0).to(ACC_DTYPE)

    pixels = H_out * W_out
    p_begin = split * tiles_per_split * BLOCK_P
    p_end = tl.minimum(p_begin + tiles_per_split * BLOCK_P, pixels)
    # Advanced by one sample per iteration: 64-bit pointers, no 32-bit offset overflow.
    grad_out_rows = grad_out_ptr + c[:, None] * pixels
    x_sample = x_ptr
    acc = tl.zeros((EXPERTS, BLOCK_CO, BLOCK_R), dtype=ACC_DTYPE)
    for n in range(N):
        grad_w = tl.zeros((BLOCK_CO, BLOCK_R), dtype=ACC_DTYPE)
        grad_sum = tl.zeros((BLOCK_CO,), dtype=ACC_DTYPE)
        for p0 in range(p_begin, p_end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            p_ok = p < p_end
            grad = tl.load(grad_out_rows + p[None, :], mask=co_ok[:, None] & p_ok[None, :],
                           other=0.0)
            grad_sum += tl.sum(grad.to(ACC_DTYPE), 1)
            ih = (p // W_out * stride_h - pad_h)[:, None] + i_dil[None, :]
            iw = (p % W_out * stride_w - pad_w)[:, None] + j_dil[None, :]
            x_mask = p_ok[:, None] & r_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            patch = tl.load(x_sample + x_rows[None, :] + ih * W + iw, mask=x_mask, other=0.0)
            grad_w = tl.dot(grad, patch, grad_w, input_precision="ieee")
        routing = tl.load(routing_ptr + n * num_experts + experts_index, mask=experts_ok,
                          other=0.0).to(ACC_DTYPE)
        acc += routing[:, None, None] * grad_w[None, :, :]
        routing_grad = tl.sum(tl.sum(expert_tiles * grad_w[None, :, :], 2), 1)
        tl.store(grad_routing_partial_ptr +
                 ((split * tl.num_programs(0) + tile) * N + n) * EXPERTS + experts_index,
                 routing_grad)
        tl.store(grad_out_sum_partial_ptr + (split * N + n) * C_out + c, grad_sum,
                 mask=co_ok & (r_tile == 0))
        grad_out_rows += C_out * pixels
        x_sample += C_in * H * W

    tl.store(grad_experts_partial_ptr + split * num_experts * C_out * R +
             experts_index[:, None, None] * C_out * R + (c[:, None] * R + r[None, :])[None],
             acc, mask=experts_ok[:, None, None] & tile_mask[None])


def _acc_dtype(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _check_config(config: tuple, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {value}")


def _geometry(x, experts, stride, padding, dilation, groups):
    N, C_in, H, W = x.shape
    K, C_out, C_group_in, kh, kw = experts.shape
    H_out = output_size(H, kh, stride[0], padding[0], dilation[0])
    W_out = output_size(W, kw, stride[1], padding[1], dilation[1])
    return (N, C_in, H, W, K, C_out, C_group_in, C_out // groups, kh, kw, H_out, W_out)


def forward(x: torch.Tensor, experts: torch.Tensor, routing: torch.Tensor,
            bias: Optional[torch.Tensor], stride: tuple[int, int], padding: tuple[int, int],
            dilation: tuple[int, int], groups: int, *,
            tiles: Optional[ConvConfig] = None) -> torch.Tensor:
    """Dynamic convolution ``y_n = conv2d(x_n, Σ_k routing[n, k] · experts[k]) + Σ_k routing[n, k]
    · bias[k]``.

    x ``[N, C_in, H, W]``; experts ``[K, C_out, C_in / groups, kh, kw]``; routing ``[N, K]``;
    bias ``[K, C_out]`` or ``None``; all of one dtype and device (checked by the caller).
    Returns ``[N, C_out, H_out, W_out]`` in ``x``'s memory format. ``tiles`` overrides
    :func:`conv_config`.
    """
    (N, C_in, H, W, K, C_out, C_group_in, C_group_out, kh, kw, H_out, W_out) = \
        _geometry(x, experts, stride, padding, dilation, groups)
    config = tiles or conv_config(C_group_out, H_out * W_out, C_group_in * kh * kw)
    _check_config(config, ("block_m", "block_p", "block_r"))
    acc_tl, _ = _acc_dtype(x.dtype)
    y = empty_like_output(x, (N, C_out, H_out, W_out))
    grid = (N * groups * triton.cdiv(H_out * W_out, config.block_p)
            * triton.cdiv(C_group_out, config.block_m),)
    launch(_dynamic_conv_forward_kernel, grid,
           x.contiguous(), experts.contiguous(), routing.contiguous(),
           bias.contiguous() if bias is not None else routing, y,
           C_in, H, W, C_out, H_out, W_out, C_group_in, C_group_out, K,
           *stride, *padding, *dilation, kh, kw, *y.stride(),
           num_warps=config.num_warps, HAS_BIAS=bias is not None, ACC_DTYPE=acc_tl,
           BLOCK_CO=config.block_m, BLOCK_P=config.block_p, BLOCK_R=config.block_r)
    return y


def backward(grad_out: torch.Tensor, x: torch.Tensor, experts: torch.Tensor,
             routing: torch.Tensor, bias: Optional[torch.Tensor], stride: tuple[int, int],
             padding: tuple[int, int], dilation: tuple[int, int], groups: int, *,
             input_grad_tiles: Optional[ConvConfig] = None,
             weight_grad_tiles: Optional[WeightGradConfig] = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`forward` given ``grad_out`` ``[N, C_out, H_out, W_out]``.

    Returns ``(grad_x, grad_experts, grad_routing, grad_bias)``: ``grad_x`` in ``x``'s shape and
    memory format, ``grad_experts`` ``[K, C_out, C_in / groups, kh, kw]``, ``grad_routing``
    ``[N, K]``, ``grad_bias`` ``[K, C_out]`` (always computed; the bias term of
    ``grad_routing`` only when ``bias`` is given), all in ``x``'s dtype. ``input_grad_tiles``
    overrides :func:`conv_config` for ``grad_x``, ``weight_grad_tiles`` :func:`weight_grad_config`.
    """
    (N, C_in, H, W, K, C_out, C_group_in, C_group_out, kh, kw, H_out, W_out) = \
        _geometry(x, experts, stride, padding, dilation, groups)
    acc_tl, acc_torch = _acc_dtype(x.dtype)
    grad_out, x = grad_out.contiguous(), x.contiguous()
    experts, routing = experts.contiguous(), routing.contiguous()
    geometry = (C_in, H, W, C_out, H_out, W_out, C_group_in, C_group_out, K,
                *stride, *padding, *dilation, kh, kw)

    config = input_grad_tiles or conv_config(C_group_in, H * W, C_group_out * kh * kw)
    _check_config(config, ("block_m", "block_p", "block_r"))
    grad_x = empty_like_output(x)
    grid = (N * groups * triton.cdiv(H * W, config.block_p) * triton.cdiv(C_group_in, config.block_m),)
    launch(_dynamic_conv_input_grad_kernel, grid,
           grad_out, experts, routing, grad_x, *geometry, *grad_x.stride(),
           num_warps=config.num_warps, ACC_DTYPE=acc_tl,
           BLOCK_CI=config.block_m, BLOCK_P=config.block_p, BLOCK_R=config.block_r)

    R = C_group_in * kh * kw
    wconfig = weight_grad_tiles or weight_grad_config(C_group_out, R, H_out * W_out, K, groups)
    _check_config(wconfig, ("block_co", "block_r", "block_p"))
    experts_pow2 = triton.next_power_of_2(K)
    tiles = groups * triton.cdiv(C_group_out, wconfig.block_co) * triton.cdiv(R, wconfig.block_r)
    pixel_tiles = triton.cdiv(H_out * W_out, wconfig.block_p)
    tiles_per_split = triton.cdiv(pixel_tiles, wconfig.pixel_splits)
    splits = triton.cdiv(pixel_tiles, tiles_per_split)
    grad_experts_partial = torch.empty(splits, K, C_out, R, dtype=acc_torch, device=x.device)
    grad_routing_partial = torch.empty(splits, tiles, N, experts_pow2, dtype=acc_torch,
                                       device=x.device)
    grad_out_sum_partial = torch.empty(splits, N, C_out, dtype=acc_torch, device=x.device)
    launch(_dynamic_conv_weight_grad_kernel, (tiles, splits),
           grad_out, x, experts, routing,
           grad_experts_partial, grad_routing_partial, grad_out_sum_partial,
           N, *geometry, tiles_per_split,
           num_warps=wconfig.num_warps, ACC_DTYPE=acc_tl, EXPERTS=experts_pow2,
           BLOCK_CO=wconfig.block_co, BLOCK_R=wconfig.block_r, BLOCK_P=wconfig.block_p)

    grad_out_sum = grad_out_sum_partial.sum(0)
    grad_routing = grad_routing_partial.sum((0, 1))[:, :K]
    if bias is not None:
        grad_routing = grad_routing + grad_out_sum @ bias.to(acc_torch).t()
    grad_bias = routing.to(acc_torch).t() @ grad_out_sum
    grad_experts = grad_experts_partial.sum(0).view(experts.shape)
    return (grad_x, grad_experts.to(x.dtype), grad_routing.to(x.dtype), grad_bias.to(x.dtype))
