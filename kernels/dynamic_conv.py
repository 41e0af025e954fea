"""Triton kernels for the dynamic (mixture-of-experts) convolution (:mod:`fastseg.ops.dynamic_conv`).

Sample ``n`` is convolved with its own kernel ``W_n = Σ_k routing[n, k] · experts[k]``. No kernel
ever stores ``W_n``: each program mixes the tile of it that it needs from the ``K`` expert tiles
and the sample's routing row, in registers, right before using it.

All three kernels are implicit GEMMs that walk the kernel window tap by tap: for tap ``(i, j)``
the operand gathered from an activation is a ``[channels, pixels]`` tile shifted by
``(i·d_h, j·d_w)`` (strided by the conv stride), whose out-of-image part is masked to zero, so
padding, stride, dilation and non-square kernels need no copies and no special cases. The
kernels read the experts with the input channels last (``[K, C_out, kh, kw, C_in / groups]``, a
copy made per call: the channel tile of one tap is then contiguous).

* :func:`forward`: ``y_n[co, p] = Σ_tap Σ_ci W_n[co, ci, tap] · x_n[ci, shifted_tap(p)]``.
* :func:`backward`:

  - ``grad_x``: the transposed product, gathered over output positions: input pixel ``q``
    receives tap ``(i, j)`` of output ``o`` where ``o·stride = q + pad - tap·dilation``.
  - ``grad_experts``, ``grad_routing``: a program owns a tile of the weight (output channels ×
    input channels of one tap) and loops over the samples; per sample it computes that tile of
    the per-sample weight gradient ``gW_n = gy_n · X_nᵀ`` and folds it at once into
    ``Σ_n routing[n, k] · gW_n`` for every expert (added into the program's own entries of a
    partial buffer, so registers hold one tile, not ``K``) and into ``⟨gW_n, experts[k]⟩`` (a
    partial of ``grad_routing``): no per-sample weight or gradient is ever stored. Large images
    are also split over pixels, for enough programs to fill the GPU. Partials are reduced by
    torch afterwards: deterministic, no atomics. The bias terms need only ``Σ_hw gy_n``, which
    torch sums.

Layouts: the kernels read NCHW-contiguous ``x`` and ``grad_out`` (a channels-last or non-contiguous
one is copied once with ``.contiguous()``) and write ``y`` / ``grad_x`` through their strides
straight into a tensor in ``x``'s memory format. Products run on ``tl.dot``, on tensor cores:
float16/bfloat16 natively; float32 operands are split into a TF32 part and the remainder and
multiplied as three TF32 products (float32 accuracy; IEEE float32 products would take the FMA
path, which holds whole operand rows in registers). They accumulate in float32, or in float64
for float64 inputs (interpreter only). The mixed kernel tile is rounded to the input dtype before the product, as a conv
with a stored ``W_n`` would round it. Every block size is a power of two ≥ 16 (``tl.dot``'s
minimum); channel counts below it (``C_out = 1``, depthwise groups) are masked.

Launch configurations come from :func:`conv_config` and :func:`weight_grad_config`; tests pass
their own (small tiles) through the keyword arguments of :func:`forward` and :func:`backward`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from fastseg._layout import empty_like_output

from ._dot import dot, dot_precision
from ._launch import launch

__all__ = ["forward", "backward", "ConvConfig", "WeightGradConfig", "conv_config",
           "weight_grad_config", "output_size"]


class ConvConfig(NamedTuple):
    """Tiles of the forward or ``grad_x`` launch: a program computes ``block_m`` channels
    (output channels in the forward, input channels for ``grad_x``) × ``block_p`` pixels, and
    reduces over the other side's channels ``block_k`` at a time."""
    block_m: int
    block_p: int
    block_k: int
    num_warps: int


class WeightGradConfig(NamedTuple):
    """Tiles of the weight/routing gradient launch: a ``block_co × block_ci`` weight tile (one
    tap) per program, output pixels ``block_p`` at a time, the pixel tiles of each sample split
    into ``pixel_splits`` contiguous ranges (one program each)."""
    block_co: int
    block_ci: int
    block_p: int
    pixel_splits: int
    num_warps: int


# Enough programs to keep every SM of a large GPU busy with a few resident programs each.
_TARGET_PROGRAMS = 1024

# (pixels per program, num_warps) of the forward and input-gradient launches, by kernel, by
# whether the operands are 4-byte (float32: three TF32 products per product, more registers) and
# by the channel tile. Every entry compiles without spills in ≤ 128 registers per thread on sm_80
# and sm_90 at the models' shapes (`python -m fastseg gpu-report`); ptxas's choices do not follow
# a simple rule (a few tiles spill at 64-80 registers), so this is a table of checked tiles.
_CONV_TILES = {
    "forward": {(False, 16): (128, 4), (False, 32): (128, 8), (False, 64): (64, 8),
                (True, 16): (128, 4), (True, 32): (128, 8), (True, 64): (32, 4)},
    "input_grad": {(False, 16): (256, 4), (False, 32): (128, 8), (False, 64): (64, 4),
                   (True, 16): (256, 8), (True, 32): (128, 8), (True, 64): (32, 4)},
}


def _tile(size: int, largest: int) -> int:
    """The smallest power of two ≥ 16 covering ``size``, at most ``largest``."""
    return max(16, min(largest, triton.next_power_of_2(size)))


def _four_byte(dtype: torch.dtype) -> bool:
    """Whether products take the register-hungry float32 path (float64 is interpreter-only)."""
    return dtype in (torch.float32, torch.float64)


def conv_config(kernel: str, channels: int, reduction_channels: int, pixels: int,
                dtype: torch.dtype) -> ConvConfig:
    """Tiles of the ``"forward"`` (``channels`` = output channels per group, reduced over the input
    channels, ``pixels`` = output pixels per sample) or ``"input_grad"`` (the other way round)
    launch."""
    block_m = _tile(channels, 64)
    block_k = 16 if _four_byte(dtype) or block_m == 16 else _tile(reduction_channels, 32)
    block_p, num_warps = _CONV_TILES[kernel][_four_byte(dtype), block_m]
    return ConvConfig(block_m, _tile(pixels, block_p), block_k, num_warps)


def weight_grad_config(out_channels: int, in_channels: int, taps: int, groups: int, pixels: int,
                       dtype: torch.dtype) -> WeightGradConfig:
    """Tiles of the expert/routing gradient of ``out_channels × in_channels`` (per group) weights
    of ``taps`` taps in ``groups`` groups, over ``pixels`` output pixels per sample.

    The pixel splits give about ``_TARGET_PROGRAMS`` programs, but leave each split at least four
    pixel tiles of every sample. (Tiles checked as :data:`_CONV_TILES`.)
    """
    if _four_byte(dtype):
        block_co, block_ci, block_p = 16, 16, 16
    else:
        block_co, block_ci, block_p = _tile(out_channels, 32), _tile(in_channels, 32), 32
    tiles = groups * triton.cdiv(out_channels, block_co) * taps * triton.cdiv(in_channels, block_ci)
    pixel_tiles = triton.cdiv(pixels, block_p)
    splits = max(1, min(triton.cdiv(_TARGET_PROGRAMS, tiles), pixel_tiles // 4))
    splits = triton.cdiv(pixel_tiles, triton.cdiv(pixel_tiles, splits))
    return WeightGradConfig(block_co, block_ci, block_p, splits, 4)


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output extent of a convolution along one dimension (as ``torch.nn.functional.conv2d``)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@triton.jit
def _dynamic_conv_forward_kernel(
    x_ptr, experts_ptr, routing_ptr, bias_ptr, y_ptr,
    C_in, H, W, C_out, H_out, W_out, C_group_in, C_group_out, num_experts,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, kh, kw,
    stride_yn, stride_yc, stride_yh, stride_yw,
    HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    """``y[n, c, oh, ow] = Σ_{ci, i, j} W_n[c, ci, i, j] · x[n, g·C_group_in + ci, oh·s_h - p_h +
    i·d_h, ow·s_w - p_w + j·d_w] + Σ_k routing[n, k] · bias[k, c]`` with ``g = c // C_group_out``
    and ``W_n = Σ_k routing[n, k] · experts[k]``.

    x ``[N, C_in, H, W]`` contiguous; experts ``[K, C_out, kh, kw, C_group_in]`` contiguous (the
    op's experts with the input channels last); routing ``[N, K]`` contiguous; bias ``[K, C_out]``
    contiguous (read only if ``HAS_BIAS``); y ``[N, C_out, H_out, W_out]`` with strides
    ``stride_y*``. A program computes ``BLOCK_CO`` output channels of one group × ``BLOCK_P``
    output pixels (row-major) of one sample: for each tap ``(i, j)``, ``BLOCK_CI`` input channels
    at a time, it mixes the ``[BLOCK_CO, BLOCK_CI]`` kernel tile and multiplies it with the
    shifted ``[BLOCK_CI, BLOCK_P]`` input tile (zero in the padding).
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
    ih0 = p // W_out * stride_h - pad_h
    iw0 = p % W_out * stride_w - pad_w

    taps = kh * kw
    x_sample = x_ptr + n.to(tl.int64) * C_in * H * W + g * C_group_in * H * W
    routing_row = routing_ptr + n * num_experts
    kernel_rows = experts_ptr + c[:, None] * (taps * C_group_in)

    acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=ACC_DTYPE)
    for tap in range(taps):
        ih = ih0 + tap // kw * dil_h
        iw = iw0 + tap % kw * dil_w
        pixel_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        pixels = x_sample + ih * W + iw
        for ci0 in range(0, C_group_in, BLOCK_CI):
            ci = ci0 + tl.arange(0, BLOCK_CI)
            ci_ok = ci < C_group_in
            kernel_mask = co_ok[:, None] & ci_ok[None, :]
            kernel_tile = kernel_rows + (tap * C_group_in + ci)[None, :]
            w = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=ACC_DTYPE)
            for k in range(num_experts):
                expert = tl.load(kernel_tile + k * C_out * taps * C_group_in, mask=kernel_mask,
                                 other=0.0)
                w += tl.load(routing_row + k).to(ACC_DTYPE) * expert.to(ACC_DTYPE)
            patch = tl.load(pixels[None, :] + (ci * H * W)[:, None],
                            mask=ci_ok[:, None] & pixel_ok[None, :], other=0.0)
            acc = dot(w.to(patch.dtype), patch, acc, DOT_PRECISION)

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
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """``grad_x[n, g·C_group_in + ci, ih, iw] = Σ_{co, i, j} W_n[g·C_group_out + co, ci, i, j] ·
    grad_out[n, g·C_group_out + co, oh, ow]`` over the taps with ``oh·s_h = ih + p_h - i·d_h`` and
    ``ow·s_w = iw + p_w - j·d_w`` inside the output, ``W_n = Σ_k routing[n, k] · experts[k]``.

    grad_out ``[N, C_out, H_out, W_out]`` contiguous; experts ``[K, C_out, kh, kw, C_group_in]``
    contiguous; routing ``[N, K]`` contiguous; grad_x ``[N, C_in, H, W]`` with strides
    ``stride_g*``. A program computes ``BLOCK_CI`` input channels of one group × ``BLOCK_P`` input
    pixels (row-major) of one sample: for each tap, ``BLOCK_CO`` output channels at a time, the
    mixed ``[BLOCK_CI, BLOCK_CO]`` kernel tile times the ``[BLOCK_CO, BLOCK_P]`` tile of
    ``grad_out`` gathered at the output positions the tap reaches (zero where none).
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
    grad_out_sample = grad_out_ptr + n.to(tl.int64) * C_out * H_out * W_out + \
        g * C_group_out * H_out * W_out
    routing_row = routing_ptr + n * num_experts
    kernel_cols = experts_ptr + g * C_group_out * taps * C_group_in + ci[:, None]

    acc = tl.zeros((BLOCK_CI, BLOCK_P), dtype=ACC_DTYPE)
    for tap in range(taps):
        # Tap (i, j) carries output (oh, ow) to input (ih, iw) when oh·s_h = ih + p_h - i·d_h.
        oh_scaled = ih + pad_h - tap // kw * dil_h
        ow_scaled = iw + pad_w - tap % kw * dil_w
        # Clamped before dividing: negative quotients round differently in C and Python.
        oh = tl.maximum(oh_scaled, 0) // stride_h
        ow = tl.maximum(ow_scaled, 0) // stride_w
        output_ok = q_ok & (oh_scaled >= 0) & (ow_scaled >= 0) & (oh < H_out) & (ow < W_out) & \
            (oh * stride_h == oh_scaled) & (ow * stride_w == ow_scaled)
        outputs = grad_out_sample + oh * W_out + ow
        for co0 in range(0, C_group_out, BLOCK_CO):
            co = co0 + tl.arange(0, BLOCK_CO)
            co_ok = co < C_group_out
            kernel_mask = ci_ok[:, None] & co_ok[None, :]
            kernel_tile = kernel_cols + (co * taps + tap)[None, :] * C_group_in
            w = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=ACC_DTYPE)
            for k in range(num_experts):
                expert = tl.load(kernel_tile + k * C_out * taps * C_group_in, mask=kernel_mask,
                                 other=0.0)
                w += tl.load(routing_row + k).to(ACC_DTYPE) * expert.to(ACC_DTYPE)
            grad = tl.load(outputs[None, :] + (co * H_out * W_out)[:, None],
                           mask=co_ok[:, None] & output_ok[None, :], other=0.0)
            acc = dot(w.to(grad.dtype), grad, acc, DOT_PRECISION)

    gx = grad_x_ptr + n.to(tl.int64) * stride_gn + \
        (g * C_group_in + ci)[:, None].to(tl.int64) * stride_gc + \
        (ih * stride_gh + iw * stride_gw)[None, :]
    tl.store(gx, acc.to(grad_x_ptr.dtype.element_ty), mask=ci_ok[:, None] & q_ok[None, :])


@triton.jit
def _dynamic_conv_weight_grad_kernel(
    grad_out_ptr, x_ptr, experts_ptr, routing_ptr,
    grad_experts_partial_ptr, grad_routing_partial_ptr,
    N, C_in, H, W, C_out, H_out, W_out, C_group_in, C_group_out, num_experts,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, kh, kw, tiles_per_split,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, EXPERTS: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Partials of the expert and routing gradients.

    grad_out ``[N, C_out, H_out, W_out]``, x ``[N, C_in, H, W]``, experts
    ``[K, C_out, kh, kw, C_group_in]`` and routing ``[N, K]``, all contiguous; ``EXPERTS`` is a
    power of two ≥ ``K``. Program ``(t, s)`` owns weight tile ``t``: ``BLOCK_CO`` output channels
    ``c`` of group ``g`` × ``BLOCK_CI`` input channels ``ci`` of one tap ``(i, j)``, tiles
    row-major over ``[groups, C_group_out / BLOCK_CO, kh·kw, C_group_in / BLOCK_CI]`` (``T`` in
    all); and the output pixels of pixel tiles ``[s·tiles_per_split, (s+1)·tiles_per_split)`` of
    every sample (``S`` splits). With ``gW_n^s[c, ci] = Σ_{p in split s} grad_out[n, c, p] ·
    x[n, g·C_group_in + ci, oh·s_h - p_h + i·d_h, ow·s_w - p_w + j·d_w]`` (zero in the padding)
    it writes, in ``ACC_DTYPE``:

    * ``grad_experts_partial[s, k, c, i, j, ci] = Σ_n routing[n, k] · gW_n^s[c, ci]``
      (``[S, K, C_out, kh, kw, C_group_in]``), accumulated sample by sample in the program's own
      entries of the buffer: only ``gW_n^s`` (one tile) is held in registers, not ``K`` of them;
    * ``grad_routing_partial[s, t, n, k] = Σ_{tile} gW_n^s · experts[k]`` (``[S, T, N, K]``).

    Grid: ``(T, S)``.
    """
    co_tiles = tl.cdiv(C_group_out, BLOCK_CO)
    ci_tiles = tl.cdiv(C_group_in, BLOCK_CI)
    taps = kh * kw
    tile = tl.program_id(0)
    split = tl.program_id(1)
    g = tile // (co_tiles * taps * ci_tiles)
    co_tile = tile // (taps * ci_tiles) % co_tiles
    tap = tile // ci_tiles % taps
    ci_tile = tile % ci_tiles

    co = co_tile * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < C_group_out
    c = g * C_group_out + co
    ci = ci_tile * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = ci < C_group_in
    x_channels = (g * C_group_in + ci) * H * W
    kernel_offsets = (c[:, None] * taps + tap) * C_group_in + ci[None, :]
    kernel_mask = co_ok[:, None] & ci_ok[None, :]
    expert_size = C_out * taps * C_group_in
    experts_index = tl.arange(0, EXPERTS)
    experts_ok = experts_index < num_experts

    pixels = H_out * W_out
    p_begin = split * tiles_per_split * BLOCK_P
    p_end = tl.minimum(p_begin + tiles_per_split * BLOCK_P, pixels)
    expert_tiles = grad_experts_partial_ptr + (split * num_experts + experts_index[:, None, None]) * \
        expert_size + kernel_offsets[None, :, :]
    expert_tiles_mask = experts_ok[:, None, None] & kernel_mask[None, :, :]
    # Advanced by one sample per iteration: 64-bit pointers, no 32-bit offset overflow.
    grad_out_rows = grad_out_ptr + c[:, None] * pixels
    x_sample = x_ptr
    routing_row = routing_ptr
    grad_routing_partial = grad_routing_partial_ptr + \
        (split * tl.num_programs(0) + tile) * N * num_experts
    for n in range(N):
        grad_w = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=ACC_DTYPE)
        for p0 in range(p_begin, p_end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            p_ok = p < p_end
            grad = tl.load(grad_out_rows + p[None, :], mask=co_ok[:, None] & p_ok[None, :],
                           other=0.0)
            ih = p // W_out * stride_h - pad_h + tap // kw * dil_h
            iw = p % W_out * stride_w - pad_w + tap % kw * dil_w
            pixel_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            patch = tl.load(x_sample + (ih * W + iw)[:, None] + x_channels[None, :],
                            mask=pixel_ok[:, None] & ci_ok[None, :], other=0.0)
            grad_w = dot(grad, patch, grad_w, DOT_PRECISION)

        routing = tl.load(routing_row + experts_index, mask=experts_ok, other=0.0).to(ACC_DTYPE)
        # Uninitialised before the first sample: the buffer needs no zero-filling.
        summed = tl.load(expert_tiles, mask=expert_tiles_mask & (n > 0), other=0.0)
        tl.store(expert_tiles, summed + routing[:, None, None] * grad_w[None, :, :],
                 mask=expert_tiles_mask)
        # The next sample's load sees this store whichever thread of the program made it.
        tl.debug_barrier()
        for k in range(num_experts):
            expert = tl.load(experts_ptr + k * expert_size + kernel_offsets, mask=kernel_mask,
                             other=0.0)
            tl.store(grad_routing_partial + k, tl.sum(tl.sum(expert.to(ACC_DTYPE) * grad_w, 1), 0))
        grad_out_rows += C_out * pixels
        x_sample += C_in * H * W
        routing_row += num_experts
        grad_routing_partial += num_experts


def _acc_dtype(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _check_blocks(config: tuple, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {value}")


def _experts_by_tap(experts: torch.Tensor) -> torch.Tensor:
    """``[K, C_out, C_in / groups, kh, kw]`` → ``[K, C_out, kh, kw, C_in / groups]``, contiguous."""
    return experts.permute(0, 1, 3, 4, 2).contiguous()


def _shape(x: torch.Tensor, experts: torch.Tensor, stride, padding, dilation, groups: int):
    """``(C_in, H, W, C_out, H_out, W_out, C_in/groups, C_out/groups, K, *stride, *padding,
    *dilation, kh, kw)``: the geometry arguments every kernel takes, in their order."""
    _, C_in, H, W = x.shape
    K, C_out, C_group_in, kh, kw = experts.shape
    H_out = output_size(H, kh, stride[0], padding[0], dilation[0])
    W_out = output_size(W, kw, stride[1], padding[1], dilation[1])
    return (C_in, H, W, C_out, H_out, W_out, C_group_in, C_out // groups, K,
            *stride, *padding, *dilation, kh, kw)


def forward(x: torch.Tensor, experts: torch.Tensor, routing: torch.Tensor,
            bias: Optional[torch.Tensor], stride: tuple[int, int], padding: tuple[int, int],
            dilation: tuple[int, int], groups: int, *,
            tiles: Optional[ConvConfig] = None) -> torch.Tensor:
    """Dynamic convolution ``y_n = conv2d(x_n, Σ_k routing[n, k] · experts[k]) + Σ_k routing[n, k]
    · bias[k]``.

    x ``[N, C_in, H, W]``; experts ``[K, C_out, C_in / groups, kh, kw]``; routing ``[N, K]``;
    bias ``[K, C_out]`` or ``None``; all of one dtype and device, shapes and conv parameters
    valid (checked by the caller). Returns ``[N, C_out, H_out, W_out]`` in ``x``'s memory format.
    ``tiles`` overrides :func:`conv_config`.
    """
    shape = _shape(x, experts, stride, padding, dilation, groups)
    C_in, H, W, C_out, H_out, W_out, C_group_in, C_group_out = shape[:8]
    N = x.shape[0]
    config = tiles or conv_config("forward", C_group_out, C_group_in, H_out * W_out, x.dtype)
    _check_blocks(config, ("block_m", "block_p", "block_k"))
    y = empty_like_output(x, (N, C_out, H_out, W_out))
    grid = (N * groups * triton.cdiv(H_out * W_out, config.block_p)
            * triton.cdiv(C_group_out, config.block_m),)
    launch(_dynamic_conv_forward_kernel, grid,
           x.contiguous(), _experts_by_tap(experts), routing.contiguous(),
           bias.contiguous() if bias is not None else routing, y, *shape, *y.stride(),
           num_warps=config.num_warps, HAS_BIAS=bias is not None,
           ACC_DTYPE=_acc_dtype(x.dtype)[0], DOT_PRECISION=dot_precision(x.dtype),
           BLOCK_CO=config.block_m, BLOCK_P=config.block_p, BLOCK_CI=config.block_k)
    return y


def backward(grad_out: torch.Tensor, x: torch.Tensor, experts: torch.Tensor,
             routing: torch.Tensor, bias: Optional[torch.Tensor], stride: tuple[int, int],
             padding: tuple[int, int], dilation: tuple[int, int], groups: int, *,
             input_grad_tiles: Optional[ConvConfig] = None,
             weight_grad_tiles: Optional[WeightGradConfig] = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`forward` given ``grad_out`` ``[N, C_out, H_out, W_out]``.

    Returns ``(grad_x, grad_experts, grad_routing, grad_bias)``: ``grad_x`` in ``x``'s shape and
    memory format, ``grad_experts`` ``[K, C_out, C_in / groups, kh, kw]`` contiguous,
    ``grad_routing`` ``[N, K]``, ``grad_bias`` ``[K, C_out]`` (always computed; the bias term of
    ``grad_routing`` only when ``bias`` is given), all in ``x``'s dtype. ``input_grad_tiles``
    overrides :func:`conv_config` for ``grad_x``, ``weight_grad_tiles``
    :func:`weight_grad_config`.
    """
    shape = _shape(x, experts, stride, padding, dilation, groups)
    C_in, H, W, C_out, H_out, W_out, C_group_in, C_group_out, K = shape[:9]
    kh, kw = experts.shape[-2:]
    N = x.shape[0]
    acc_tl, acc_torch = _acc_dtype(x.dtype)
    grad_x = empty_like_output(x)
    grad_out, x = grad_out.contiguous(), x.contiguous()
    experts_by_tap, routing = _experts_by_tap(experts), routing.contiguous()

    config = input_grad_tiles or conv_config("input_grad", C_group_in, C_group_out, H * W,
                                             x.dtype)
    _check_blocks(config, ("block_m", "block_p", "block_k"))
    grid = (N * groups * triton.cdiv(H * W, config.block_p) * triton.cdiv(C_group_in, config.block_m),)
    launch(_dynamic_conv_input_grad_kernel, grid,
           grad_out, experts_by_tap, routing, grad_x, *shape, *grad_x.stride(),
           num_warps=config.num_warps, ACC_DTYPE=acc_tl, DOT_PRECISION=dot_precision(x.dtype),
           BLOCK_CI=config.block_m, BLOCK_P=config.block_p, BLOCK_CO=config.block_k)

    wconfig = weight_grad_tiles or weight_grad_config(
        C_group_out, C_group_in, kh * kw, groups, H_out * W_out, x.dtype)
    _check_blocks(wconfig, ("block_co", "block_ci", "block_p"))
    experts_pow2 = triton.next_power_of_2(K)
    tiles = groups * triton.cdiv(C_group_out, wconfig.block_co) * kh * kw * \
        triton.cdiv(C_group_in, wconfig.block_ci)
    pixel_tiles = triton.cdiv(H_out * W_out, wconfig.block_p)
    tiles_per_split = triton.cdiv(pixel_tiles, wconfig.pixel_splits)
    splits = triton.cdiv(pixel_tiles, tiles_per_split)
    grad_experts_partial = torch.empty(splits, K, C_out, kh, kw, C_group_in, dtype=acc_torch,
                                       device=x.device)
    grad_routing_partial = torch.empty(splits, tiles, N, K, dtype=acc_torch, device=x.device)
    launch(_dynamic_conv_weight_grad_kernel, (tiles, splits),
           grad_out, x, experts_by_tap, routing, grad_experts_partial, grad_routing_partial,
           N, *shape, tiles_per_split,
           num_warps=wconfig.num_warps, ACC_DTYPE=acc_tl, DOT_PRECISION=dot_precision(x.dtype),
           EXPERTS=experts_pow2, BLOCK_CO=wconfig.block_co, BLOCK_CI=wconfig.block_ci,
           BLOCK_P=wconfig.block_p)

    grad_out_sum = grad_out.sum((2, 3), dtype=acc_torch)
    grad_routing = grad_routing_partial.sum((0, 1))
    if bias is not None:
        grad_routing = grad_routing + grad_out_sum @ bias.to(acc_torch).t()
    grad_bias = routing.to(acc_torch).t() @ grad_out_sum
    grad_experts = grad_experts_partial.sum(0).permute(0, 1, 4, 2, 3).contiguous()
    return grad_x, grad_experts.to(x.dtype), grad_routing.to(x.dtype), grad_bias.to(x.dtype)
