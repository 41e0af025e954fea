"""Triton kernels for the attention gates (:mod:`fastseg.ops.attention_gates`).

Two kinds of kernels:

* per-pixel gates (``spatial_gate``, ``gated_pointwise``, ``attention_gate``): a program owns
  ``BLOCK_P`` pixels of one sample and walks the channels in ``BLOCK_C`` slices, first reducing the
  per-pixel gate, then applying it. The dense 1×1 projections of ``gated_pointwise`` and
  ``attention_gate`` are torch matrix products ([W_a; W_b; w_s]·a, W_x·x + W_g·g) that the kernels
  fuse around; their weight gradients too.
* plane kernels (``channel_gate``, ``cross_gate``): a program owns a ``BLOCK_H × BLOCK_W`` tile
  of one (n, c) plane and computes the bilinear resize on the fly (:func:`_taps`, ATen's
  upsample_bilinear2d arithmetic). The resize's adjoint is a gather (:func:`_resize_adjoint`):
  each input pixel sums the outputs that read it, so no atomics are needed and results are
  deterministic. Per-plane reductions (global average, gate gradient) are per-tile partial sums
  that torch adds up.

The ×2 bilinear upsample with align_corners=False gives every input sample a total weight of
exactly 2 along each axis, so ``GAP(up(x)) = GAP(x)`` and ``up^T(1) = 4``: channel_gate's means
and its mean-gradient term need no resize at all.

Layouts: kernels read NCHW-contiguous inputs (channels-last and strided inputs are copied once
with ``.contiguous()``) and write outputs through their strides into tensors in the input's memory
format (:func:`fastseg._layout.empty_like_output`); for NCHW and channels-last alike a pixel's
offset is ``p · stride_p`` with ``p = h·W + w``. Sums accumulate in float32 (float64 for float64).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastseg._layout import empty_like_output

from ._launch import launch

__all__ = ["pixel_config", "plane_config",
           "spatial_gate_forward", "spatial_gate_backward",
           "gated_pointwise_forward", "gated_pointwise_backward",
           "channel_gate_forward", "channel_gate_backward",
           "cross_gate_forward", "cross_gate_backward",
           "attention_gate_forward", "attention_gate_backward"]


def _acc(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def pixel_config(C: int, HW: int) -> tuple[int, int, int]:
    """``(BLOCK_C, BLOCK_P, num_warps)`` of the per-pixel kernels for ``C`` channels, ``HW`` pixels.

    A 32 × 128 slice (less for fewer channels or pixels) at 4 warps: 32 values per thread per
    loaded slice, within 128 registers for every config the models launch (gpu-report).
    """
    block_c = min(32, triton.next_power_of_2(C))
    block_p = min(128, triton.next_power_of_2(HW))
    return block_c, block_p, max(1, min(4, block_c * block_p // 256))


def plane_config(H: int, W: int) -> tuple[int, int, int]:
    """``(BLOCK_H, BLOCK_W, num_warps)`` of the plane kernels: tiles of up to 16 × 64 pixels,
    about 8 per thread."""
    block_h = min(16, triton.next_power_of_2(H))
    block_w = min(64, triton.next_power_of_2(W))
    return block_h, block_w, max(1, min(4, block_h * block_w // 256))


def _chosen(default, blocks):
    chosen = tuple(b or d for b, d in zip(blocks, default))
    for name, value in zip(("first block", "second block", "num_warps"), chosen):
        if value <= 0 or value & (value - 1):
            raise ValueError(f"{name} must be a positive power of two, got {value}")
    return chosen


def _pixel_blocks(C, HW, blocks):
    return _chosen(pixel_config(C, HW), blocks)


def _plane_blocks(H, W, blocks):
    return _chosen(plane_config(H, W), blocks)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


# --- spatial_gate ------------------------------------------------------------------------------

@triton.jit
def _spatial_gate_kernel(x_ptr, w_ptr, b_ptr, out_ptr, gz_ptr, gy_ptr,
                         C, HW, stride_on, stride_oc, stride_op,
                         BACKWARD: tl.constexpr, ACC: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """``y = x ⊙ σ(w·x + b)``, or with ``BACKWARD`` its input gradient and the gate's.

    x, gy ``[N, C, HW]`` contiguous; w ``[C]``; b ``[1]``; out ``[N, C, HW]`` with strides
    ``stride_o*`` (y, or grad_x ``= gy·s + gz·w``); gz ``[N, HW]`` (backward only:
    ``gz = σ'·Σ_c gy·x``, the logit's gradient). Program ``(n, pb)`` owns pixels
    ``pb·BLOCK_P ...``. Grid: ``(N, cdiv(HW, BLOCK_P))``.
    """
    n = tl.program_id(0)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < HW
    base = n.to(tl.int64) * C * HW
    z = tl.zeros((BLOCK_P,), dtype=ACC) + tl.load(b_ptr).to(ACC)
    gs = tl.zeros((BLOCK_P,), dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c < C)[:, None] & p_ok[None, :]
        offs = base + c[:, None] * HW + p[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        w = tl.load(w_ptr + c, mask=c < C, other=0.0).to(ACC)
        z += tl.sum(x * w[:, None], 0)
        if BACKWARD:
            gs += tl.sum(x * tl.load(gy_ptr + offs, mask=mask, other=0.0).to(ACC), 0)
    s = _sigmoid(z)
    gz = gs * s * (1.0 - s)
    if BACKWARD:
        tl.store(gz_ptr + n.to(tl.int64) * HW + p, gz, mask=p_ok)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c < C)[:, None] & p_ok[None, :]
        offs = base + c[:, None] * HW + p[None, :]
        out = (out_ptr + n.to(tl.int64) * stride_on + c[:, None].to(tl.int64) * stride_oc
               + p[None, :] * stride_op)
        if BACKWARD:
            w = tl.load(w_ptr + c, mask=c < C, other=0.0).to(ACC)
            gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(ACC)
            tl.store(out, (gy * s[None, :] + gz[None, :] * w[:, None]).to(out_ptr.dtype.element_ty),
                     mask=mask)
        else:
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            tl.store(out, (x * s[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


def _spatial_gate(x, w, b, gy, blocks):
    N, C, H, W = x.shape
    block_c, block_p, warps = _pixel_blocks(C, H * W, blocks)
    out = empty_like_output(x)
    x, w = x.contiguous(), w.contiguous()
    acc_tl, acc_torch = _acc(x.dtype)
    gz = torch.empty(N, H * W, dtype=acc_torch, device=x.device) if gy is not None else x
    launch(_spatial_gate_kernel, (N, triton.cdiv(H * W, block_p)),
           x, w, b, out, gz, gy.contiguous() if gy is not None else x,
           C, H * W, out.stride(0), out.stride(1), out.stride(3),
           BACKWARD=gy is not None, ACC=acc_tl, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps)
    return out, gz


def spatial_gate_forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, *,
                         block_c: Optional[int] = None, block_p: Optional[int] = None,
                         num_warps: Optional[int] = None) -> torch.Tensor:
    """``x ⊙ σ(w·x + b)``: x ``[N, C, H, W]``, w ``[1, C]``, b ``[1]`` → ``[N, C, H, W]``."""
    return _spatial_gate(x, w, b, None, (block_c, block_p, num_warps))[0]


def spatial_gate_backward(grad_out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, *,
                          block_c: Optional[int] = None, block_p: Optional[int] = None,
                          num_warps: Optional[int] = None):
    """``(grad_x [N, C, H, W], grad_w [1, C], grad_b [1])`` of :func:`spatial_gate_forward`."""
    grad_x, gz = _spatial_gate(x, w, b, grad_out, (block_c, block_p, num_warps))
    N, C = x.shape[:2]
    xs = x.reshape(N, C, -1).to(gz.dtype)
    grad_w = torch.bmm(xs, gz.unsqueeze(2)).sum(0).view(1, C)
    return grad_x, grad_w.to(w.dtype), gz.sum().view(1).to(b.dtype)


# --- gated_pointwise ---------------------------------------------------------------------------

@triton.jit
def _gated_pointwise_kernel(prod_ptr, b_s_ptr, bias_ptr, gy_ptr, out_ptr,
                            C_out, HW, stride_on, stride_oc, stride_op,
                            BACKWARD: tl.constexpr, ACC: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The gating around ``prod = [W_a; W_b; w_s]·a`` (``[N, 2·C_out + 1, HW]`` contiguous).

    Forward: ``out[n, o] = prod[n, o] + s·prod[n, C_out + o] + bias[o]`` with
    ``s = σ(prod[n, 2·C_out] + b_s)``, out ``[N, C_out, HW]`` with strides ``stride_o*``.
    Backward (gy ``[N, C_out, HW]`` contiguous): out (contiguous like prod) receives the gradient
    of prod, ``[gy; s·gy; σ'·Σ_o gy·prod[C_out + o]]``. Program ``(n, pb)`` owns ``BLOCK_P`` pixels.
    Grid: ``(N, cdiv(HW, BLOCK_P))``.
    """
    n = tl.program_id(0)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < HW
    prod = prod_ptr + n.to(tl.int64) * (2 * C_out + 1) * HW
    s = _sigmoid(tl.load(prod + 2 * C_out * HW + p, mask=p_ok, other=0.0).to(ACC)
                 + tl.load(b_s_ptr).to(ACC))
    gs = tl.zeros((BLOCK_P,), dtype=ACC)
    for c0 in range(0, C_out, BLOCK_C):
        o = c0 + tl.arange(0, BLOCK_C)
        mask = (o < C_out)[:, None] & p_ok[None, :]
        u_offs = o[:, None] * HW + p[None, :]
        v = tl.load(prod + C_out * HW + u_offs, mask=mask, other=0.0).to(ACC)
        if BACKWARD:
            gy = tl.load(gy_ptr + n.to(tl.int64) * C_out * HW + u_offs, mask=mask, other=0.0).to(ACC)
            gs += tl.sum(gy * v, 0)
            grad = out_ptr + n.to(tl.int64) * (2 * C_out + 1) * HW
            tl.store(grad + u_offs, gy.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(grad + C_out * HW + u_offs, (gy * s[None, :]).to(out_ptr.dtype.element_ty),
                     mask=mask)
        else:
            u = tl.load(prod + u_offs, mask=mask, other=0.0).to(ACC)
            bias = tl.load(bias_ptr + o, mask=o < C_out, other=0.0).to(ACC)
            y = u + s[None, :] * v + bias[:, None]
            out = (out_ptr + n.to(tl.int64) * stride_on + o[:, None].to(tl.int64) * stride_oc
                   + p[None, :] * stride_op)
            tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)
    if BACKWARD:
        grad = out_ptr + n.to(tl.int64) * (2 * C_out + 1) * HW
        tl.store(grad + 2 * C_out * HW + p, (gs * s * (1.0 - s)).to(out_ptr.dtype.element_ty),
                 mask=p_ok)


def _stacked_product(a, w_s, w_a, w_b):
    N, C_in, H, W = a.shape
    weight = torch.cat([w_a, w_b, w_s], 0)
    return weight, a.contiguous().view(N, C_in, H * W), torch.matmul(weight, a.contiguous().view(N, C_in, H * W))


def gated_pointwise_forward(a, w_s, b_s, w_a, w_b, bias, *, block_c: Optional[int] = None,
                            block_p: Optional[int] = None, num_warps: Optional[int] = None):
    """``W_a·a + σ(w_s·a + b_s) ⊙ (W_b·a) + bias``: a ``[N, C_in, H, W]``, w_s ``[1, C_in]``,
    b_s ``[1]``, w_a/w_b ``[C_out, C_in]``, bias ``[C_out]`` → ``[N, C_out, H, W]``."""
    N, C_in, H, W = a.shape
    C_out = w_a.shape[0]
    block_c, block_p, warps = _pixel_blocks(C_out, H * W, (block_c, block_p, num_warps))
    _, _, prod = _stacked_product(a, w_s, w_a, w_b)
    out = empty_like_output(a, (N, C_out, H, W))
    launch(_gated_pointwise_kernel, (N, triton.cdiv(H * W, block_p)),
           prod, b_s, bias.contiguous(), prod, out, C_out, H * W,
           out.stride(0), out.stride(1), out.stride(3),
           BACKWARD=False, ACC=_acc(a.dtype)[0], BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps)
    return out


def gated_pointwise_backward(grad_out, a, w_s, b_s, w_a, w_b, *, block_c: Optional[int] = None,
                             block_p: Optional[int] = None, num_warps: Optional[int] = None):
    """``(grad_a, grad_w_s, grad_b_s, grad_w_a, grad_w_b, grad_bias)`` of
    :func:`gated_pointwise_forward`; the product is recomputed, not stored."""
    N, C_in, H, W = a.shape
    C_out = w_a.shape[0]
    block_c, block_p, warps = _pixel_blocks(C_out, H * W, (block_c, block_p, num_warps))
    weight, a_flat, prod = _stacked_product(a, w_s, w_a, w_b)
    grad = torch.empty_like(prod)
    launch(_gated_pointwise_kernel, (N, triton.cdiv(H * W, block_p)),
           prod, b_s, b_s, grad_out.contiguous(), grad, C_out, H * W, 0, 0, 0,
           BACKWARD=True, ACC=_acc(a.dtype)[0], BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps)
    grad_a = empty_like_output(a)
    grad_a.copy_(torch.matmul(weight.t(), grad).view(N, C_in, H, W))
    grad_w = torch.matmul(grad, a_flat.transpose(1, 2)).sum(0)
    grad_sums = grad.sum((0, 2))
    # Clones: outputs of an op may not alias each other.
    return (grad_a, grad_w[2 * C_out:].clone(), grad_sums[2 * C_out:].clone(),
            grad_w[:C_out].clone(), grad_w[C_out:2 * C_out].clone(), grad_sums[:C_out].clone())


# --- bilinear resize ---------------------------------------------------------------------------

@triton.jit
def _taps(o, n_in, n_out, ALIGN: tl.constexpr, ACC: tl.constexpr):
    """Output positions ``o`` of a resize from ``n_in`` to ``n_out`` samples read inputs ``i0`` and
    ``i1`` with weights ``1 - l1`` and ``l1`` (csrc/common/attention_gates.h:resize_taps)."""
    if ALIGN:
        src = (n_in - 1).to(ACC) / tl.maximum(n_out - 1, 1).to(ACC) * o.to(ACC)
    else:
        src = tl.maximum(n_in.to(ACC) / n_out.to(ACC) * (o.to(ACC) + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), n_in - 1)
    i1 = tl.minimum(i0 + 1, n_in - 1)
    l1 = tl.minimum(tl.maximum(src - i0.to(ACC), 0.0), 1.0)
    same = n_in == n_out  # ATen copies when the size does not change
    return tl.where(same, o, i0), tl.where(same, o, i1), tl.where(same, 0.0, l1)


@triton.jit
def _tap_weight(o, i, n_in, n_out, ALIGN: tl.constexpr, ACC: tl.constexpr):
    """The weight with which output ``o`` reads input ``i``."""
    i0, i1, l1 = _taps(o, n_in, n_out, ALIGN, ACC)
    return tl.where(i0 == i, 1.0 - l1, 0.0) + tl.where(i1 == i, l1, 0.0)


@triton.jit
def _first_reader(i, n_in, n_out, ALIGN: tl.constexpr, ACC: tl.constexpr):
    """The first output that may read input ``i`` (outputs whose source lies in (i - 1, i + 1))."""
    if ALIGN:
        first = (i - 1).to(ACC) * tl.maximum(n_out - 1, 1).to(ACC) / tl.maximum(n_in - 1, 1).to(ACC)
    else:
        first = ((i - 1).to(ACC) + 0.5) * n_out.to(ACC) / n_in.to(ACC) - 0.5
    lo = tl.maximum(tl.floor(first).to(tl.int32), 0)
    lo = tl.where(n_in == 1, 0, lo)
    return tl.where(n_in == n_out, i, lo)


@triton.jit
def _resize(plane, rows, cols, h, w, H, W, ALIGN: tl.constexpr, ACC: tl.constexpr):
    """The ``[h, w]`` plane at ``plane`` (contiguous) resized to ``H × W``, at ``rows × cols``
    (``[BH, 1]`` and ``[1, BW]`` output coordinates; positions outside read clamped inputs)."""
    r0, r1, lr = _taps(tl.minimum(rows, H - 1), h, H, ALIGN, ACC)
    c0, c1, lc = _taps(tl.minimum(cols, W - 1), w, W, ALIGN, ACC)
    top = (1.0 - lc) * tl.load(plane + r0 * w + c0).to(ACC) + lc * tl.load(plane + r0 * w + c1).to(ACC)
    bottom = (1.0 - lc) * tl.load(plane + r1 * w + c0).to(ACC) + lc * tl.load(plane + r1 * w + c1).to(ACC)
    return (1.0 - lr) * top + lr * bottom


@triton.jit
def _resize_adjoint(plane, rows, cols, h, w, H, W, SPAN_H, SPAN_W, X2: tl.constexpr,
                    ALIGN: tl.constexpr, ACC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """The resize's adjoint applied to the ``[H, W]`` plane at ``plane`` (contiguous, ACC), at input
    coordinates ``rows × cols`` (``[BH, 1]``, ``[1, BW]``) of the ``[h, w]`` input: each input
    gathers the ``SPAN_H × SPAN_W`` outputs from its first readers on (the others weigh zero).
    ``X2``: the ×2 upsample (align_corners=False), where exactly outputs 2i - 1 ... 2i + 2 read
    input i (span 4)."""
    if X2:
        lo_r = 2 * rows - 1
        lo_c = 2 * cols - 1
    else:
        lo_r = _first_reader(rows, h, H, ALIGN, ACC)
        lo_c = _first_reader(cols, w, W, ALIGN, ACC)
    acc = tl.zeros((BH, BW), dtype=ACC)
    for dr in range(0, SPAN_H):
        r = lo_r + dr
        r_ok = (r >= 0) & (r < H)
        wr = tl.where(r_ok, _tap_weight(tl.minimum(tl.maximum(r, 0), H - 1), rows, h, H, ALIGN, ACC),
                      0.0)
        for dc in range(0, SPAN_W):
            c = lo_c + dc
            c_ok = (c >= 0) & (c < W)
            wc = tl.where(c_ok, _tap_weight(tl.minimum(tl.maximum(c, 0), W - 1), cols, w, W, ALIGN,
                                            ACC), 0.0)
            ok = r_ok & c_ok & (rows < h) & (cols < w)
            acc += wr * wc * tl.load(plane + r * W + c, mask=ok, other=0.0).to(ACC)
    return acc


def _adjoint_span(n_in: int, n_out: int, align: bool) -> int:
    """How many consecutive outputs from an input's first reader on can read it."""
    if n_in == n_out:
        return 1
    if n_in == 1:
        return n_out
    scale = (n_in - 1) / max(n_out - 1, 1) if align else n_in / n_out
    return int(2 / scale) + 3


# --- channel_gate ------------------------------------------------------------------------------

@triton.jit
def _channel_gate_kernel(x_ptr, gate_ptr, skip_ptr, out_ptr, C, h, w, H, W,
                         stride_on, stride_oc, stride_oh, stride_ow,
                         UPSAMPLE: tl.constexpr, HAS_SKIP: tl.constexpr, ACC: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """``y = z·gate[n, c] (+ skip)`` with ``z = up×2(x)`` or ``x``, on one output tile.

    x ``[N, C, h, w]``, skip ``[N, C, H, W]`` contiguous; gate ``[N, C]`` (ACC); out strided.
    Program ``(n·C + c, th, tw)``. Grid: ``(N·C, cdiv(H, BLOCK_H), cdiv(W, BLOCK_W))``.
    """
    plane = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    inside = (rows < H) & (cols < W)
    x_plane = x_ptr + plane.to(tl.int64) * h * w
    if UPSAMPLE:
        z = _resize(x_plane, rows, cols, h, w, H, W, False, ACC)
    else:
        z = tl.load(x_plane + rows * w + cols, mask=inside, other=0.0).to(ACC)
    y = z * tl.load(gate_ptr + plane)
    if HAS_SKIP:
        y += tl.load(skip_ptr + plane.to(tl.int64) * H * W + rows * W + cols, mask=inside,
                     other=0.0).to(ACC)
    n = plane // C
    out = (out_ptr + n.to(tl.int64) * stride_on + (plane - n * C).to(tl.int64) * stride_oc
           + rows * stride_oh + cols * stride_ow)
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=inside)


# Modes of _channel_gate_reduce_kernel.
MEAN, GATE_GRAD, INPUT_GRAD = 0, 1, 2


@triton.jit
def _channel_gate_reduce_kernel(gy_ptr, x_ptr, gate_ptr, grad_mean_ptr, out_ptr, C, h, w, H, W,
                                stride_on, stride_oc, stride_oh, stride_ow,
                                MODE: tl.constexpr, UPSAMPLE: tl.constexpr, ACC: tl.constexpr,
                                BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """One input tile of a channel_gate reduction, with ``u = up^T(gy)`` (``gy`` without
    upsample) recomputed by gathering:

    * ``MODE == 0``: ``out[plane, tile] = Σ_tile x`` (partials of the plane means; the ×2 upsample
      keeps the mean);
    * ``MODE == 1``: ``out[plane, tile] = Σ_tile x·u`` (partials of the gate's gradient);
    * ``MODE == 2``: ``grad_x = gate·u + grad_mean / (h·w)`` into the strided out; ``grad_mean``
      ``[N, C]`` is the gradient of the plane mean and ``up^T(1) = 4 = H·W / (h·w)``.

    gy ``[N, C, H, W]``, x ``[N, C, h, w]`` contiguous; gate, grad_mean ``[N, C]`` in ACC;
    partials ``[N·C, tiles]`` in ACC. Grid: ``(N·C, cdiv(h, BLOCK_H), cdiv(w, BLOCK_W))``.
    """
    plane = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    inside = (rows < h) & (cols < w)
    tile = plane.to(tl.int64) * tl.num_programs(1) * tl.num_programs(2) \
        + tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)
    x = tl.load(x_ptr + plane.to(tl.int64) * h * w + rows * w + cols, mask=inside, other=0.0).to(ACC)
    if MODE == 0:
        tl.store(out_ptr + tile, tl.sum(tl.sum(x, 1), 0))
    else:
        gy_plane = gy_ptr + plane.to(tl.int64) * H * W
        if UPSAMPLE:
            u = _resize_adjoint(gy_plane, rows, cols, h, w, H, W, 4, 4, True, False, ACC,
                                BLOCK_H, BLOCK_W)
        else:
            u = tl.load(gy_plane + rows * W + cols, mask=inside, other=0.0).to(ACC)
        if MODE == 1:
            tl.store(out_ptr + tile, tl.sum(tl.sum(x * u, 1), 0))
        else:
            g = tl.load(gate_ptr + plane) * u + tl.load(grad_mean_ptr + plane) / (h * w).to(ACC)
            n = plane // C
            out = (out_ptr + n.to(tl.int64) * stride_on + (plane - n * C).to(tl.int64) * stride_oc
                   + rows * stride_oh + cols * stride_ow)
            tl.store(out, g.to(out_ptr.dtype.element_ty), mask=inside)


def _channel_gate_reduce(mode, x, gy, gate, grad_mean, out, upsample, blocks):
    """Launch :func:`_channel_gate_reduce_kernel`; returns the ``[N, C]`` sums (modes 0, 1)."""
    N, C, h, w = x.shape
    acc_tl, acc_torch = _acc(x.dtype)
    block_h, block_w, warps = _plane_blocks(h, w, blocks)
    grid = (N * C, triton.cdiv(h, block_h), triton.cdiv(w, block_w))
    if mode != INPUT_GRAD:
        out = torch.empty(N * C, grid[1] * grid[2], dtype=acc_torch, device=x.device)
    H, W = (2 * h, 2 * w) if upsample else (h, w)
    strides = out.stride() if mode == INPUT_GRAD else (0, 0, 0, 0)
    launch(_channel_gate_reduce_kernel, grid, gy if gy is not None else x, x,
           gate if gate is not None else out, grad_mean if grad_mean is not None else out, out,
           C, h, w, H, W, *strides, MODE=mode, UPSAMPLE=upsample, ACC=acc_tl,
           BLOCK_H=block_h, BLOCK_W=block_w, num_warps=warps)
    return out.sum(1).view(N, C) if mode != INPUT_GRAD else out


def _excitation(mean, w1, w2):
    pre = mean @ w1.t().to(mean.dtype)
    return pre, torch.sigmoid(torch.relu(pre) @ w2.t().to(mean.dtype))


def channel_gate_forward(x, w1, w2, skip, upsample, *, block_h: Optional[int] = None,
                         block_w: Optional[int] = None, num_warps: Optional[int] = None):
    """``z ⊙ σ(W2·ReLU(W1·GAP(z))) (+ skip)``, ``z = up×2(x)`` if ``upsample`` else x.

    x ``[N, C, h, w]``; w1 ``[C_r, C]``; w2 ``[C, C_r]``; skip like z or None. Returns z's shape
    in x's memory format. Block sizes apply to the output tiles and the input tiles alike.
    """
    blocks = (block_h, block_w, num_warps)
    N, C, h, w = x.shape
    H, W = (2 * h, 2 * w) if upsample else (h, w)
    out = empty_like_output(x, (N, C, H, W))
    x = x.contiguous()
    mean = _channel_gate_reduce(MEAN, x, None, None, None, None, False, blocks) / (h * w)
    gate = _excitation(mean, w1, w2)[1].contiguous()
    block_h, block_w, warps = _plane_blocks(H, W, blocks)
    launch(_channel_gate_kernel, (N * C, triton.cdiv(H, block_h), triton.cdiv(W, block_w)),
           x, gate, skip.contiguous() if skip is not None else x, out, C, h, w, H, W, *out.stride(),
           UPSAMPLE=upsample, HAS_SKIP=skip is not None, ACC=_acc(x.dtype)[0],
           BLOCK_H=block_h, BLOCK_W=block_w, num_warps=warps)
    return out


def channel_gate_backward(grad_out, x, w1, w2, upsample, *, block_h: Optional[int] = None,
                          block_w: Optional[int] = None, num_warps: Optional[int] = None):
    """``(grad_x, grad_w1, grad_w2)`` of :func:`channel_gate_forward` (skip's gradient is
    ``grad_out`` itself, returned by the autograd glue)."""
    blocks = (block_h, block_w, num_warps)
    N, C, h, w = x.shape
    x_c, gy = x.contiguous(), grad_out.contiguous()
    mean = _channel_gate_reduce(MEAN, x_c, None, None, None, None, False, blocks) / (h * w)
    pre, gate = _excitation(mean, w1, w2)
    grad_gate = _channel_gate_reduce(GATE_GRAD, x_c, gy, None, None, None, upsample, blocks)
    grad_e = grad_gate * gate * (1 - gate)
    grad_w2 = grad_e.t() @ torch.relu(pre)
    grad_pre = (grad_e @ w2.to(grad_e.dtype)) * (pre > 0)
    grad_w1 = grad_pre.t() @ mean
    grad_mean = (grad_pre @ w1.to(grad_e.dtype)).contiguous()
    grad_x = _channel_gate_reduce(INPUT_GRAD, x_c, gy, gate.contiguous(), grad_mean,
                                  empty_like_output(x), upsample, blocks)
    return grad_x, grad_w1.to(w1.dtype), grad_w2.to(w2.dtype)


# --- cross_gate --------------------------------------------------------------------------------

@triton.jit
def _cross_gate_kernel(a_ptr, b_ptr, gy_ptr, out_ptr, grad_gate_ptr, h, w, H, W, C,
                       stride_on, stride_oc, stride_oh, stride_ow,
                       BACKWARD: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """``y = a ⊙ σ(resize(b))`` on one tile of a's plane, or with ``BACKWARD`` ``grad_a = gy·σ``
    (strided out) and ``grad_gate = gy·a·σ'`` (``[N, C, H, W]`` contiguous, ACC).

    a, gy ``[N, C, H, W]``, b ``[N, C, h, w]`` contiguous. Program ``(n·C + c, th, tw)``.
    Grid: ``(N·C, cdiv(H, BLOCK_H), cdiv(W, BLOCK_W))``.
    """
    plane = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    inside = (rows < H) & (cols < W)
    s = _sigmoid(_resize(b_ptr + plane.to(tl.int64) * h * w, rows, cols, h, w, H, W, ALIGN, ACC))
    offs = plane.to(tl.int64) * H * W + rows * W + cols
    a = tl.load(a_ptr + offs, mask=inside, other=0.0).to(ACC)
    n = plane // C
    out = (out_ptr + n.to(tl.int64) * stride_on + (plane - n * C).to(tl.int64) * stride_oc
           + rows * stride_oh + cols * stride_ow)
    if BACKWARD:
        gy = tl.load(gy_ptr + offs, mask=inside, other=0.0).to(ACC)
        tl.store(out, (gy * s).to(out_ptr.dtype.element_ty), mask=inside)
        tl.store(grad_gate_ptr + offs, gy * a * s * (1.0 - s), mask=inside)
    else:
        tl.store(out, (a * s).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _resize_adjoint_kernel(grad_ptr, out_ptr, h, w, H, W, C, SPAN_H, SPAN_W,
                           stride_on, stride_oc, stride_oh, stride_ow,
                           ALIGN: tl.constexpr, ACC: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """``out = resize^T(grad)`` on one tile of the ``[h, w]`` input plane: grad ``[N, C, H, W]``
    contiguous ACC, out ``[N, C, h, w]`` strided. Grid: ``(N·C, cdiv(h, BLOCK_H), cdiv(w, BLOCK_W))``.
    """
    plane = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    g = _resize_adjoint(grad_ptr + plane.to(tl.int64) * H * W, rows, cols, h, w, H, W,
                        SPAN_H, SPAN_W, False, ALIGN, ACC, BLOCK_H, BLOCK_W)
    n = plane // C
    out = (out_ptr + n.to(tl.int64) * stride_on + (plane - n * C).to(tl.int64) * stride_oc
           + rows * stride_oh + cols * stride_ow)
    tl.store(out, g.to(out_ptr.dtype.element_ty), mask=(rows < h) & (cols < w))


def _cross_gate(a, b, gy, align_corners, blocks):
    N, C, H, W = a.shape
    h, w = b.shape[2:]
    acc_tl, acc_torch = _acc(a.dtype)
    block_h, block_w, warps = _plane_blocks(H, W, blocks)
    out = empty_like_output(a)
    grad_gate = torch.empty(N, C, H, W, dtype=acc_torch, device=a.device) if gy is not None else out
    launch(_cross_gate_kernel, (N * C, triton.cdiv(H, block_h), triton.cdiv(W, block_w)),
           a.contiguous(), b.contiguous(), gy.contiguous() if gy is not None else out, out,
           grad_gate, h, w, H, W, C, *out.stride(), BACKWARD=gy is not None,
           ALIGN=align_corners, ACC=acc_tl, BLOCK_H=block_h, BLOCK_W=block_w, num_warps=warps)
    return out, grad_gate


def cross_gate_forward(a, b, align_corners, *, block_h: Optional[int] = None,
                       block_w: Optional[int] = None, num_warps: Optional[int] = None):
    """``a ⊙ σ(resize_bilinear(b → a's H, W))``: a ``[N, C, H, W]``, b ``[N, C, h, w]``."""
    return _cross_gate(a, b, None, align_corners, (block_h, block_w, num_warps))[0]


def cross_gate_backward(grad_out, a, b, align_corners, *, block_h: Optional[int] = None,
                        block_w: Optional[int] = None, num_warps: Optional[int] = None):
    """``(grad_a [N, C, H, W], grad_b [N, C, h, w])`` of :func:`cross_gate_forward`."""
    blocks = (block_h, block_w, num_warps)
    grad_a, grad_gate = _cross_gate(a, b, grad_out, align_corners, blocks)
    N, C, H, W = a.shape
    h, w = b.shape[2:]
    grad_b = empty_like_output(b)
    block_h, block_w, warps = _plane_blocks(h, w, blocks)
    launch(_resize_adjoint_kernel, (N * C, triton.cdiv(h, block_h), triton.cdiv(w, block_w)),
           grad_gate, grad_b, h, w, H, W, C, _adjoint_span(h, H, align_corners),
           _adjoint_span(w, W, align_corners), *grad_b.stride(), ALIGN=align_corners,
           ACC=_acc(a.dtype)[0], BLOCK_H=block_h, BLOCK_W=block_w, num_warps=warps)
    return grad_a, grad_b


# --- attention_gate ----------------------------------------------------------------------------

@triton.jit
def _attention_gate_kernel(x_ptr, proj_ptr, b_ptr, psi_w_ptr, psi_b_ptr, gy_ptr, out_ptr, gt_ptr,
                           C_x, C_i, HW, stride_on, stride_oc, stride_op,
                           BACKWARD: tl.constexpr, ACC: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The gating around ``proj = W_x·x + W_g·g`` (``[N, C_i, HW]`` contiguous):
    ``α = σ(psi_w·ReLU(proj + b) + psi_b)``, ``y = x·α`` (out strided).

    Backward (gy ``[N, C_x, HW]``): out receives ``gy·α`` (grad_x's gating term), gt ``[N, HW]``
    (ACC) ``σ'·Σ_c gy·x`` (the psi logit's gradient), and proj is overwritten in place with its
    own gradient ``psi_w·gt·[proj + b > 0]``. Grid: ``(N, cdiv(HW, BLOCK_P))``.
    """
    n = tl.program_id(0)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < HW
    proj = proj_ptr + n.to(tl.int64) * C_i * HW
    logit = tl.zeros((BLOCK_P,), dtype=ACC) + tl.load(psi_b_ptr).to(ACC)
    for c0 in range(0, C_i, BLOCK_C):
        i = c0 + tl.arange(0, BLOCK_C)
        mask = (i < C_i)[:, None] & p_ok[None, :]
        q = tl.load(proj + i[:, None] * HW + p[None, :], mask=mask, other=0.0).to(ACC) \
            + tl.load(b_ptr + i, mask=i < C_i, other=0.0).to(ACC)[:, None]
        psi = tl.load(psi_w_ptr + i, mask=i < C_i, other=0.0).to(ACC)
        logit += tl.sum(tl.maximum(q, 0.0) * psi[:, None], 0)
    alpha = _sigmoid(logit)
    ga = tl.zeros((BLOCK_P,), dtype=ACC)
    base = n.to(tl.int64) * C_x * HW
    for c0 in range(0, C_x, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c < C_x)[:, None] & p_ok[None, :]
        offs = base + c[:, None] * HW + p[None, :]
        out = (out_ptr + n.to(tl.int64) * stride_on + c[:, None].to(tl.int64) * stride_oc
               + p[None, :] * stride_op)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        if BACKWARD:
            gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(ACC)
            ga += tl.sum(gy * x, 0)
            tl.store(out, (gy * alpha[None, :]).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out, (x * alpha[None, :]).to(out_ptr.dtype.element_ty), mask=mask)
    if BACKWARD:
        gt = ga * alpha * (1.0 - alpha)
        tl.store(gt_ptr + n.to(tl.int64) * HW + p, gt, mask=p_ok)
        for c0 in range(0, C_i, BLOCK_C):
            i = c0 + tl.arange(0, BLOCK_C)
            mask = (i < C_i)[:, None] & p_ok[None, :]
            ptrs = proj + i[:, None] * HW + p[None, :]
            q = tl.load(ptrs, mask=mask, other=0.0).to(ACC) \
                + tl.load(b_ptr + i, mask=i < C_i, other=0.0).to(ACC)[:, None]
            psi = tl.load(psi_w_ptr + i, mask=i < C_i, other=0.0).to(ACC)
            grad = tl.where(q > 0, psi[:, None] * gt[None, :], 0.0)
            tl.store(ptrs, grad.to(proj_ptr.dtype.element_ty), mask=mask)


def _projection(x, g, w_x, w_g):
    N, C_x, H, W = x.shape
    x_flat = x.contiguous().view(N, C_x, H * W)
    g_flat = g.contiguous().view(N, g.shape[1], H * W)
    return x_flat, g_flat, torch.matmul(w_x, x_flat) + torch.matmul(w_g, g_flat)


def attention_gate_forward(x, g, w_x, w_g, b, psi_w, psi_b, *, block_c: Optional[int] = None,
                           block_p: Optional[int] = None, num_warps: Optional[int] = None):
    """``x ⊙ σ(psi_w·ReLU(W_x·x + W_g·g + b) + psi_b)``: x ``[N, C_x, H, W]``, g
    ``[N, C_g, H, W]``, w_x ``[C_i, C_x]``, w_g ``[C_i, C_g]``, b ``[C_i]``, psi_w ``[1, C_i]``,
    psi_b ``[1]`` → ``[N, C_x, H, W]``."""
    N, C_x, H, W = x.shape
    C_i = w_x.shape[0]
    block_c, block_p, warps = _pixel_blocks(max(C_x, C_i), H * W, (block_c, block_p, num_warps))
    x_flat, _, proj = _projection(x, g, w_x, w_g)
    out = empty_like_output(x)
    launch(_attention_gate_kernel, (N, triton.cdiv(H * W, block_p)),
           x_flat, proj, b.contiguous(), psi_w.contiguous(), psi_b, x_flat, out, out,
           C_x, C_i, H * W, out.stride(0), out.stride(1), out.stride(3),
           BACKWARD=False, ACC=_acc(x.dtype)[0], BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps)
    return out


def attention_gate_backward(grad_out, x, g, w_x, w_g, b, psi_w, psi_b, *,
                            block_c: Optional[int] = None, block_p: Optional[int] = None,
                            num_warps: Optional[int] = None):
    """``(grad_x, grad_g, grad_w_x, grad_w_g, grad_b, grad_psi_w, grad_psi_b)`` of
    :func:`attention_gate_forward`; the projection is recomputed, not stored."""
    N, C_x, H, W = x.shape
    C_i = w_x.shape[0]
    block_c, block_p, warps = _pixel_blocks(max(C_x, C_i), H * W, (block_c, block_p, num_warps))
    x_flat, g_flat, proj = _projection(x, g, w_x, w_g)
    hidden = torch.relu(proj + b[:, None])  # for psi_w's gradient, before proj becomes a gradient
    acc_torch = _acc(x.dtype)[1]
    gt = torch.empty(N, H * W, dtype=acc_torch, device=x.device)
    grad_x = empty_like_output(x)
    launch(_attention_gate_kernel, (N, triton.cdiv(H * W, block_p)),
           x_flat, proj, b.contiguous(), psi_w.contiguous(), psi_b, grad_out.contiguous(), grad_x,
           gt, C_x, C_i, H * W, grad_x.stride(0), grad_x.stride(1), grad_x.stride(3),
           BACKWARD=True, ACC=_acc(x.dtype)[0], BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps)
    grad_proj = proj
    grad_x += torch.matmul(w_x.t(), grad_proj).view(N, C_x, H, W)
    grad_g = empty_like_output(g)
    grad_g.copy_(torch.matmul(w_g.t(), grad_proj).view(g.shape))
    grad_w_x = torch.matmul(grad_proj, x_flat.transpose(1, 2)).sum(0)
    grad_w_g = torch.matmul(grad_proj, g_flat.transpose(1, 2)).sum(0)
    grad_psi_w = torch.bmm(hidden.to(acc_torch), gt.unsqueeze(2)).sum(0).view(1, C_i)
    return (grad_x, grad_g, grad_w_x, grad_w_g, grad_proj.sum((0, 2)),
            grad_psi_w.to(psi_w.dtype), gt.sum().view(1).to(psi_b.dtype))
