// Per-element math of the attention gates, shared by csrc/cpu and csrc/cuda: the sigmoid, and the
// bilinear resize along one axis exactly as ATen's upsample_bilinear2d computes it (source index,
// the two taps and their weights), with the pieces of its adjoint that the backward kernels need.
#pragma once

#include <math.h>

#include "common/macros.h"

namespace fastseg {
namespace gates {

FASTSEG_HD float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }
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
