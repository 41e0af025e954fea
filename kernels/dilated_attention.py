"""Triton kernels for attention inside the parity groups of a pixel grid
(:mod:`fastseg.ops.dilated_attention`), flash-style.

Problem ``p`` of ``N·s²·heads`` is ``(n, a, b, h)``: sample, row and column offset of the parity
group, head (the same order as the C++ kernels, ``csrc/common/dilated_attention.h``). Token ``t``
of a group is its pixel ``(a + s·(t // W/s), b + s·(t % W/s))``; the kernels gather tokens through
the input's strides, so ``[N, H, W, heads, d]`` views (e.g. slices of one qkv ``Linear`` output)
are read in place (only a last dimension with a stride other than 1 is copied).

* :func:`forward`: one program per (problem, ``BLOCK_M`` queries, ``BLOCK_DV`` value columns),
  an online softmax over ``BLOCK_N``-key tiles; it writes the output and (the programs of the
  first value chunk) the log-sum-exp of each query's scores.
* :func:`backward`: ``delta = Σ dO·O`` per query, then three kernels that recompute the
  probabilities ``P = exp(scale·q·k − lse)`` tile by tile: ``dV`` per (problem, key tile, value
  chunk), ``dK`` per (problem, key tile) and ``dQ`` per (problem, query tile). No score tensor is
  stored, and no atomics are used (deterministic).

Products run on ``tl.dot`` (every tile dimension ≥ 16: LGMSNet's head width 8 is padded with
masked zeros); float32 at float32 accuracy (:func:`fastseg.kernels._dot.dot`), float16 and
bfloat16 products with float32 accumulation. Outputs are contiguous.
"""
from __future__ import annotations

import struct
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._dot import dot
from ._launch import launch

__all__ = ["AttentionConfig", "attention_config", "forward", "backward"]


class AttentionConfig(NamedTuple):
    """Tiles: ``block_m`` queries × ``block_n`` keys per score tile, ``block_d`` ≥ d_qk,
    ``block_dv`` value columns per chunk."""
    block_m: int
    block_n: int
    block_d: int
    block_dv: int
    num_warps: int


def _tile(size: int, largest: int) -> int:
    """The smallest power of two ≥ 16 covering ``size``, at most ``largest``."""
    return max(16, min(largest, triton.next_power_of_2(size)))


def attention_config(tokens: int, d_qk: int, d_v: int, dtype: torch.dtype) -> AttentionConfig:
    """Tiles for groups of ``tokens`` tokens with head widths ``d_qk`` and ``d_v``.

    32 × 32 score tiles, the query/key width in one tile (up to 128), values in chunks of up to
    32: the backward's gradient kernels hold several score-sized tiles at once (scores,
    probabilities, their gradients, and for float32 the three TF32 operand pairs of each
    product), which larger tiles would spill.
    """
    block_d = max(16, triton.next_power_of_2(d_qk))
    if block_d > 128:
        raise ValueError(f"the Triton kernels take d_qk ≤ 128, got {d_qk}")
    return AttentionConfig(_tile(tokens, 32), _tile(tokens, 32), block_d, _tile(d_v, 32), 4)


@triton.jit
def _problem(p, s, heads):
    """``(n, a, b, h)`` of problem ``p``."""
    h = p % heads
    p = p // heads
    b = p % s
    p = p // s
    return p // s, p % s, b, h


@triton.jit
def _token_offsets(t, a, b, s, Wg, stride_r, stride_c):
    """Offsets (within a sample and head) of the tokens ``t`` of parity group ``(a, b)``."""
    return (a + s * (t // Wg)) * stride_r + (b + s * (t % Wg)) * stride_c


@triton.jit
def _scaled(x, scale, scale_rest, ACC_DTYPE: tl.constexpr):
    """``x · scale`` for the float ``scale + scale_rest`` split in two float32 parts (float
    arguments reach a kernel as float32): for a float64 ``ACC_DTYPE`` both parts, 48 bits of the
    scale (1/√8 in float32 alone is 3e-8 off), else ``scale`` alone."""
    if ACC_DTYPE == tl.float64:
        return x * scale + x * scale_rest
    else:
        return x * scale


@triton.jit
def _dilated_attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    s, heads, Wg, L, D, DV, scale, scale_rest,
    sq_n, sq_r, sq_c, sq_h, sk_n, sk_r, sk_c, sk_h, sv_n, sv_r, sv_c, sv_h,
    so_n, so_r, so_c, so_h, sl_n, sl_r, sl_c, sl_h,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """``out = softmax(scale · q kᵀ) v`` and ``lse`` for one query tile and value chunk.

    q, k ``[N, H, W, heads, D]``, v ``[N, H, W, heads, DV]`` (strides ``s*_``, last dim dense);
    out ``[N, H, W, heads, DV]``, lse ``[N, H, W, heads]`` (``ACC_DTYPE``).
    Grid: ``(N·s²·heads, cdiv(L, BLOCK_M), cdiv(DV, BLOCK_DV))``, ``L = (H/s)·(W/s)``.
    """
    n, a, b, h = _problem(tl.program_id(0), s, heads)
    n = n.to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < L
    dims = tl.arange(0, BLOCK_D)
    cols = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    col_ok = cols < DV
    q_rows = q_ptr + n * sq_n + h * sq_h + _token_offsets(rows, a, b, s, Wg, sq_r, sq_c)
    q = tl.load(q_rows[:, None] + dims[None, :], mask=row_ok[:, None] & (dims < D)[None, :],
                other=0.0)
    k_base = k_ptr + n * sk_n + h * sk_h
    v_base = v_ptr + n * sv_n + h * sv_h
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    l_i = tl.zeros((BLOCK_M,), ACC_DTYPE)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), ACC_DTYPE)
    for k0 in range(0, L, BLOCK_N):
        keys = k0 + tl.arange(0, BLOCK_N)
        key_ok = keys < L
        k_cols = k_base + _token_offsets(keys, a, b, s, Wg, sk_r, sk_c)
        kt = tl.load(k_cols[None, :] + dims[:, None], mask=(dims < D)[:, None] & key_ok[None, :],
                     other=0.0)
        scores = _scaled(dot(q, kt, tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE), DOT_PRECISION),
                         scale, scale_rest, ACC_DTYPE)
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        probs = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(probs, 1)
        v_rows = v_base + _token_offsets(keys, a, b, s, Wg, sv_r, sv_c)
        v = tl.load(v_rows[:, None] + cols[None, :], mask=key_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc = dot(probs.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
        m_i = m_new
    out_rows = out_ptr + n * so_n + h * so_h + _token_offsets(rows, a, b, s, Wg, so_r, so_c)
    tl.store(out_rows[:, None] + cols[None, :], (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
    if tl.program_id(2) == 0:
        lse_rows = lse_ptr + n * sl_n + h * sl_h + _token_offsets(rows, a, b, s, Wg, sl_r, sl_c)
        tl.store(lse_rows, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _probabilities(q, kt, lse, key_ok, scale, scale_rest, ACC_DTYPE: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """``P = exp(scale · q kᵀ − lse)`` of a ``[M, N]`` tile, 0 for keys out of range (and for
    queries out of range, whose ``lse`` is +inf)."""
    scores = _scaled(dot(q, kt, tl.zeros((q.shape[0], kt.shape[1]), ACC_DTYPE), DOT_PRECISION),
                     scale, scale_rest, ACC_DTYPE)
    return tl.where(key_ok[None, :], tl.exp(scores - lse[:, None]), 0.0)


@triton.jit
def _grad_probs(do_rows, row_ok, v_cols, key_ok, DV, acc,
                DOT_PRECISION: tl.constexpr, BLOCK_DV: tl.constexpr):
    """``acc + dO vᵀ`` of a ``[M, N]`` tile, over every value column in ``BLOCK_DV`` chunks.
    ``do_rows``/``v_cols`` point at each query's/key's row of dO/v."""
    for c0 in range(0, DV, BLOCK_DV):
        cols = c0 + tl.arange(0, BLOCK_DV)
        col_ok = cols < DV
        do = tl.load(do_rows[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                     other=0.0)
        vt = tl.load(v_cols[None, :] + cols[:, None], mask=col_ok[:, None] & key_ok[None, :],
                     other=0.0)
        acc = dot(do, vt, acc, DOT_PRECISION)
    return acc


@triton.jit
def _dilated_attention_grad_v_kernel(
    q_ptr, k_ptr, do_ptr, lse_ptr, dv_ptr,
    s, heads, Wg, L, D, DV, scale, scale_rest,
    sq_n, sq_r, sq_c, sq_h, sk_n, sk_r, sk_c, sk_h, sg_n, sg_r, sg_c, sg_h,
    sl_n, sl_r, sl_c, sl_h, sd_n, sd_r, sd_c, sd_h,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """``dV = Pᵀ dO`` for one key tile and value chunk, over every query tile.

    dO (``do``) and dV (``dv``) ``[N, H, W, heads, DV]``; lse ``[N, H, W, heads]``.
    Grid: ``(N·s²·heads, cdiv(L, BLOCK_N), cdiv(DV, BLOCK_DV))``.
    """
    n, a, b, h = _problem(tl.program_id(0), s, heads)
    n = n.to(tl.int64)
    keys = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = keys < L
    dims = tl.arange(0, BLOCK_D)
    cols = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    col_ok = cols < DV
    k_cols = k_ptr + n * sk_n + h * sk_h + _token_offsets(keys, a, b, s, Wg, sk_r, sk_c)
    kt = tl.load(k_cols[None, :] + dims[:, None], mask=(dims < D)[:, None] & key_ok[None, :],
                 other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_DV), ACC_DTYPE)
    for q0 in range(0, L, BLOCK_M):
        rows = q0 + tl.arange(0, BLOCK_M)
        row_ok = rows < L
        q_rows = q_ptr + n * sq_n + h * sq_h + _token_offsets(rows, a, b, s, Wg, sq_r, sq_c)
        q = tl.load(q_rows[:, None] + dims[None, :], mask=row_ok[:, None] & (dims < D)[None, :],
                    other=0.0)
        lse_rows = lse_ptr + n * sl_n + h * sl_h + _token_offsets(rows, a, b, s, Wg, sl_r, sl_c)
        lse = tl.load(lse_rows, mask=row_ok, other=float("inf"))
        probs = _probabilities(q, kt, lse, key_ok, scale, scale_rest, ACC_DTYPE, DOT_PRECISION)
        do_rows = do_ptr + n * sg_n + h * sg_h + _token_offsets(rows, a, b, s, Wg, sg_r, sg_c)
        do = tl.load(do_rows[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                     other=0.0)
        acc = dot(tl.trans(probs).to(do.dtype), do, acc, DOT_PRECISION)
    dv_rows = dv_ptr + n * sd_n + h * sd_h + _token_offsets(keys, a, b, s, Wg, sd_r, sd_c)
    tl.store(dv_rows[:, None] + cols[None, :], acc.to(dv_ptr.dtype.element_ty),
             mask=key_ok[:, None] & col_ok[None, :])


@triton.jit
def _dilated_attention_grad_qk_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, grad_ptr,
    s, heads, Wg, L, D, DV, scale, scale_rest,
    sq_n, sq_r, sq_c, sq_h, sk_n, sk_r, sk_c, sk_h, sv_n, sv_r, sv_c, sv_h,
    sg_n, sg_r, sg_c, sg_h, sl_n, sl_r, sl_c, sl_h, sd_n, sd_r, sd_c, sd_h,
    GRAD_K: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """``dS = P ⊙ (dO vᵀ − delta)``, then ``dK = scale · dSᵀ q`` for one key tile (``GRAD_K``,
    looping over query tiles) or ``dQ = scale · dS k`` for one query tile (looping over key
    tiles). delta and lse ``[N, H, W, heads]`` (strides ``sl_``); the gradient (``grad``)
    ``[N, H, W, heads, D]``.
    Grid: ``(N·s²·heads, cdiv(L, BLOCK_N if GRAD_K else BLOCK_M))``.
    """
    n, a, b, h = _problem(tl.program_id(0), s, heads)
    n = n.to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    q_base = q_ptr + n * sq_n + h * sq_h
    k_base = k_ptr + n * sk_n + h * sk_h
    v_base = v_ptr + n * sv_n + h * sv_h
    do_base = do_ptr + n * sg_n + h * sg_h
    lse_base = lse_ptr + n * sl_n + h * sl_h
    delta_base = delta_ptr + n * sl_n + h * sl_h
    fixed = tl.program_id(1) * (BLOCK_N if GRAD_K else BLOCK_M)
    if GRAD_K:
        acc = tl.zeros((BLOCK_N, BLOCK_D), ACC_DTYPE)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_D), ACC_DTYPE)
    for start in range(0, L, BLOCK_M if GRAD_K else BLOCK_N):
        q0 = start if GRAD_K else fixed
        k0 = fixed if GRAD_K else start
        rows = q0 + tl.arange(0, BLOCK_M)
        row_ok = rows < L
        keys = k0 + tl.arange(0, BLOCK_N)
        key_ok = keys < L
        row_offsets = _token_offsets(rows, a, b, s, Wg, sl_r, sl_c)
        q = tl.load(q_base + _token_offsets(rows, a, b, s, Wg, sq_r, sq_c)[:, None] + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        kt = tl.load(k_base + _token_offsets(keys, a, b, s, Wg, sk_r, sk_c)[None, :] + dims[:, None],
                     mask=dim_ok[:, None] & key_ok[None, :], other=0.0)
        lse = tl.load(lse_base + row_offsets, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + row_offsets, mask=row_ok, other=0.0)
        probs = _probabilities(q, kt, lse, key_ok, scale, scale_rest, ACC_DTYPE, DOT_PRECISION)
        grad_probs = _grad_probs(do_base + _token_offsets(rows, a, b, s, Wg, sg_r, sg_c), row_ok,
                                 v_base + _token_offsets(keys, a, b, s, Wg, sv_r, sv_c), key_ok,
                                 DV, tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE), DOT_PRECISION,
                                 BLOCK_DV)
        grad_scores = probs * (grad_probs - delta[:, None])
        if GRAD_K:
            acc = dot(tl.trans(grad_scores).to(q.dtype), q, acc, DOT_PRECISION)
        else:
            acc = dot(grad_scores.to(kt.dtype), tl.trans(kt), acc, DOT_PRECISION)
    tokens = fixed + tl.arange(0, BLOCK_N if GRAD_K else BLOCK_M)
    out = grad_ptr + n * sd_n + h * sd_h + _token_offsets(tokens, a, b, s, Wg, sd_r, sd_c)
    tl.store(out[:, None] + dims[None, :],
             _scaled(acc, scale, scale_rest, ACC_DTYPE).to(grad_ptr.dtype.element_ty),
             mask=(tokens < L)[:, None] & dim_ok[None, :])


def _attention_precision(dtype: torch.dtype) -> str:
    """float32 products as float32 FMAs ("ieee"): the float32-accurate three-TF32 form
    (:func:`dot_precision`) holds six operand tiles per product, which with the backward's score-
    sized tiles takes over 200 registers per thread at 32 × 32 tiles."""
    return "ieee"


def _split(scale: float) -> tuple[float, float]:
    """``scale`` as its float32 rounding and the float32 rest (:func:`_scaled`)."""
    high = struct.unpack("f", struct.pack("f", scale))[0]
    return high, scale - high


def _acc_dtype(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _dense_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if its last dimension is dense, else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _token_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Sample, row, column and head strides of ``[N, H, W, heads(, d)]``."""
    return tuple(t.stride()[:4])


def _geometry(q: torch.Tensor, dilation: int):
    N, H, W, heads, _ = q.shape
    Wg = W // dilation
    return N * dilation * dilation * heads, (dilation, heads, Wg, (H // dilation) * Wg)


def _check_config(config: AttentionConfig, d_qk: int) -> None:
    for name in ("block_m", "block_n", "block_d", "block_dv"):
        value = getattr(config, name)
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {value}")
    if config.block_d < d_qk:
        raise ValueError(f"block_d={config.block_d} must cover d_qk={d_qk}")


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dilation: int, scale: float, *,
            config: Optional[AttentionConfig] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention inside the parity groups: returns ``(out [N, H, W, heads, d_v], lse [N, H, W,
    heads])``, lse in float32 (float64 for float64 inputs).

    q, k ``[N, H, W, heads, d_qk]``, v ``[N, H, W, heads, d_v]`` of one dtype and device, shapes and
    dilation valid (checked by the caller). ``config`` overrides :func:`attention_config`.
    """
    q, k, v = _dense_last(q), _dense_last(k), _dense_last(v)
    problems, (s, heads, Wg, L) = _geometry(q, dilation)
    d_qk, d_v = q.shape[-1], v.shape[-1]
    config = config or attention_config(L, d_qk, d_v, q.dtype)
    _check_config(config, d_qk)
    acc_tl, acc_torch = _acc_dtype(q.dtype)
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    lse = torch.empty(q.shape[:4], dtype=acc_torch, device=q.device)
    grid = (problems, triton.cdiv(L, config.block_m), triton.cdiv(d_v, config.block_dv))
    launch(_dilated_attention_forward_kernel, grid,
           q, k, v, out, lse, s, heads, Wg, L, d_qk, d_v, *_split(scale),
           *_token_strides(q), *_token_strides(k), *_token_strides(v), *_token_strides(out),
           *_token_strides(lse), num_warps=config.num_warps,
           ACC_DTYPE=acc_tl, DOT_PRECISION=_attention_precision(q.dtype), BLOCK_M=config.block_m,
           BLOCK_N=config.block_n, BLOCK_D=config.block_d, BLOCK_DV=config.block_dv)
    return out, lse


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             out: torch.Tensor, lse: torch.Tensor, dilation: int, scale: float, *,
             config: Optional[AttentionConfig] = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`forward` given ``grad_out`` ``[N, H, W, heads, d_v]``,
    the forward's inputs, its ``out`` and its ``lse``. ``config`` overrides
    :func:`attention_config`."""
    q, k, v, grad_out = _dense_last(q), _dense_last(k), _dense_last(v), _dense_last(grad_out)
    problems, geometry = _geometry(q, dilation)
    L = geometry[3]
    d_qk, d_v = q.shape[-1], v.shape[-1]
    config = config or attention_config(L, d_qk, d_v, q.dtype)
    _check_config(config, d_qk)
    acc_tl, acc_torch = _acc_dtype(q.dtype)
    # delta_i = Σ dO·O = Σ_j P_ij dP_ij: one small reduction, left to torch.
    delta = (grad_out.to(acc_torch) * out.to(acc_torch)).sum(-1).contiguous()
    lse = lse.contiguous()
    grad_q, grad_k = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(
        k.shape, dtype=k.dtype, device=k.device)
    grad_v = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    scales = _split(scale)
    common = dict(num_warps=config.num_warps, ACC_DTYPE=acc_tl,
                  DOT_PRECISION=_attention_precision(q.dtype), BLOCK_M=config.block_m,
                  BLOCK_N=config.block_n, BLOCK_D=config.block_d, BLOCK_DV=config.block_dv)
    launch(_dilated_attention_grad_v_kernel,
           (problems, triton.cdiv(L, config.block_n), triton.cdiv(d_v, config.block_dv)),
           q, k, grad_out, lse, grad_v, *geometry, d_qk, d_v, *scales,
           *_token_strides(q), *_token_strides(k), *_token_strides(grad_out),
           *_token_strides(lse), *_token_strides(grad_v), **common)
    for grad, grad_k_pass, block in ((grad_k, True, config.block_n), (grad_q, False, config.block_m)):
        launch(_dilated_attention_grad_qk_kernel, (problems, triton.cdiv(L, block)),
               q, k, v, grad_out, lse, delta, grad, *geometry, d_qk, d_v, *scales,
               *_token_strides(q), *_token_strides(k), *_token_strides(v),
               *_token_strides(grad_out), *_token_strides(lse), *_token_strides(grad),
               GRAD_K=grad_k_pass, **{**common, "num_warps": 2 * config.num_warps})
    return grad_q, grad_k, grad_v
