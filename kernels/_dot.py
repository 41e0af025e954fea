"""Matrix products of the Triton kernels at the precision their dtype asks for.

float32 inputs would otherwise multiply in TF32 on the tensor cores (10 mantissa bits, ≈ 1e-3
relative error); :func:`dot` with ``"tf32x3"`` recovers float32 accuracy from three TF32 products.
"""
import torch
import triton
import triton.language as tl


def dot_precision(dtype: torch.dtype) -> str:
    """The ``DOT_PRECISION`` of :func:`dot` for operands of ``dtype``."""
    return "tf32x3" if dtype == torch.float32 else "ieee"


@triton.jit
def tf32_high(x):
    """``x`` rounded to TF32 (10 mantissa bits, ties away from zero), as float32."""
    return ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """``acc + a @ b``; for ``"tf32x3"`` as ``a_lo·b_hi + a_hi·b_lo + a_hi·b_hi`` in TF32 (``hi``
    rounded to TF32, ``lo`` the exact remainder, truncated to TF32 by the tensor cores): the
    float32 product to about 2⁻²⁰ relative."""
    if DOT_PRECISION == "tf32x3":
        a_high = tf32_high(a)
        b_high = tf32_high(b)
        acc = tl.dot(a - a_high, b_high, acc, input_precision="tf32")
        acc = tl.dot(a_high, b - b_high, acc, input_precision="tf32")
        acc = tl.dot(a_high, b_high, acc, input_precision="tf32")
    else:
        # out_dtype: the accumulator's (float64 products accumulate in float64; the compiler
        # rejects an accumulator of another type than out_dtype, float32 by default)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
    return acc
