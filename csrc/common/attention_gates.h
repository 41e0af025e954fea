// Per-element math of the attention gates, shared by csrc/cpu and csrc/cuda: the sigmoid, and the
// bilinear resize along one axis exactly as ATen's upsample_bilinear2d computes it (source index,
// the two taps and their weights), with the pieces of its adjoint that the backward kernels need.
#pragma once

#include <math.h>

#include "common/macros.h"

namespace fastseg {
namespace gates {

FASTSEG_HD float bits_to_float(int i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  return __builtin_bit_cast(float, i);
#endif
}

FASTSEG_HD int float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  return __builtin_bit_cast(int, f);
#endif
}

// e^x in float32 without a call or a branch, so that a CPU loop around it vectorises (glibc's
// expf is a scalar call: a same-size cross_gate spent most of its time in it). x is clamped to
// [-87, 89] (e^-87 stands for anything smaller; from ≈ 88.4 on the result is inf, e^x overflowing
// at 88.7); NaN passes through. x = k·ln 2 + r with |r| ≤ ln 2 / 2 (k rounded by adding 1.5·2^23,
// ln 2 in two parts), e^r by the degree-7 polynomial of the Cephes library's expf (relative error
// ≤ 1e-7), 2^k written into the exponent bits.
FASTSEG_HD float exp_vectorisable(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 89.0f ? 89.0f : x;
  const float shifter = 12582912.0f;  // 1.5 · 2^23: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + shifter;
  const int k = float_to_bits(t) - float_to_bits(shifter);
  const float kf = t - shifter;
  float r = x - kf * 0.693359375f;
  r = r - kf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  return p * bits_to_float((k + 127) << 23);
}

FASTSEG_HD float sigmoid(float z) { return 1.0f / (1.0f + exp_vectorisable(-z)); }
FASTSEG_HD double sigmoid(double z) { return 1.0 / (1.0 + exp(-z)); }

// Output o of a resize from `in` to `out` samples reads inputs i0 and i1 with weights l0 and l1.
template <typename A>
struct Taps {
  int i0, i1;
  A l0, l1;
};

// Source step per output sample (ATen's area_pixel_compute_scale without a given scale factor;
// ×2 upsampling gives exactly 0.5 either way).
template <typename A>
FASTSEG_HD A resize_scale(int in, int out, bool align_corners) {
  if (align_corners) return out > 1 ? A(in - 1) / A(out - 1) : A(0);
  return A(in) / A(out);
}

template <typename A>
FASTSEG_HD Taps<A> resize_taps(int o, int in, int out, A scale, bool align_corners) {
  Taps<A> t;
  if (in == out) {  // ATen copies when the size does not change
    t.i0 = t.i1 = o;
    t.l0 = A(1);
    t.l1 = A(0);
    return t;
  }
  A src = align_corners ? scale * A(o) : scale * (A(o) + A(0.5)) - A(0.5);
  if (src < A(0)) src = A(0);
  t.i0 = imin(static_cast<int>(src), in - 1);
  t.i1 = t.i0 + (t.i0 < in - 1 ? 1 : 0);
  t.l1 = imin(imax(src - A(t.i0), A(0)), A(1));
  t.l0 = A(1) - t.l1;
  return t;
}

// The weight with which output `t` reads input i (both taps may be i at the border).
template <typename A>
FASTSEG_HD A tap_weight(const Taps<A>& t, int i) {
  return (t.i0 == i ? t.l0 : A(0)) + (t.i1 == i ? t.l1 : A(0));
}

// Outputs [lo, hi] that can read input i: a superset (tap_weight is zero for the extra ones), so
// that a kernel computing one input's gradient gathers instead of scattering.
struct Range {
  int lo, hi;
};

template <typename A>
FASTSEG_HD Range adjoint_range(int i, int in, int out, A scale, bool align_corners) {
  if (in == out) return {i, i};
  if (scale <= A(0)) return {0, i == 0 ? out - 1 : -1};  // a single output reads input 0
  // Output o reads input i only if its source position lies in (i - 1, i + 1).
  const A first = align_corners ? A(i - 1) / scale : (A(i - 1) + A(0.5)) / scale - A(0.5);
  const A last = align_corners ? A(i + 1) / scale : (A(i + 1) + A(0.5)) / scale - A(0.5);
  return {imax(0, static_cast<int>(imax(first, A(-1))) - 1),
          imin(out - 1, static_cast<int>(imin(last, A(out))) + 1)};
}

}  // namespace gates
}  // namespace fastseg
