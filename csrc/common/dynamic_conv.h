// Per-element math of dynamic_conv2d, shared by csrc/cpu and csrc/cuda.
//
// Sample n's kernel is W_n = Σ_k routing[n, k] · experts[k] and its bias b_n = Σ_k routing[n, k] ·
// bias[k]. With gW_n the gradient of sample n's kernel, the expert gradients are
// Σ_n routing[n, k] · gW_n and the routing gradients ⟨gW_n, experts[k]⟩ (plus the bias terms).
// The convolution geometry (stride, padding, dilation) is PyTorch's conv2d's. The CPU kernels use
// these helpers on blocks of BW consecutive kernel elements (fixed-size loops that vectorise), the
// CUDA kernels per thread (BW = 1 or a few elements).
#pragma once

#include "common/macros.h"

namespace fastseg {
namespace dyconv {

// Element i of a sample's mixed kernel (or mixed bias): Σ_k routing[k] · experts[k · stride + i],
// where `routing` points at the sample's K routing weights and `stride` is the distance between
// two experts' copies of element i.
template <typename A, typename T>
FASTSEG_HD A mixed_weight(const T* routing, int K, const T* experts, int64_t stride, int64_t i) {
  A w = 0;
  for (int k = 0; k < K; ++k) w += static_cast<A>(routing[k]) * static_cast<A>(experts[k * stride + i]);
  return w;
}

// acc[k][t] += Σ_n routing[n·routing_stride + k] · grad_weight[n·stride + t] for k < KC, t < BW:
// the expert gradients Σ_n routing[n, k] · gW_n at BW consecutive kernel elements, given the
// samples' weight gradients gW_n (rows `stride` apart) and routing rows `routing_stride` apart.
template <int BW, int KC, typename A, typename T>
FASTSEG_HD void expert_grad_block(const T* routing, int64_t routing_stride, int samples,
                                  const T* grad_weight, int64_t stride, A (&acc)[KC][BW]) {
  for (int n = 0; n < samples; ++n) {
    for (int k = 0; k < KC; ++k) {
      const A r = static_cast<A>(routing[n * routing_stride + k]);
      const T* g = grad_weight + n * stride;
      FASTSEG_VECTOR_LOOP
      for (int t = 0; t < BW; ++t) acc[k][t] += r * static_cast<A>(g[t]);
    }
  }
}

// acc[k][t] += grad_weight[t] · experts[k·stride + t] for k < KC, t < BW: partial sums of one
// sample's routing gradient ⟨gW_n, experts[k]⟩ over BW consecutive kernel elements.
template <int BW, int KC, typename A, typename T>
FASTSEG_HD void routing_grad_block(const T* grad_weight, const T* experts, int64_t stride,
                                   A (&acc)[KC][BW]) {
  for (int k = 0; k < KC; ++k) {
    const T* e = experts + k * stride;
    FASTSEG_VECTOR_LOOP
    for (int t = 0; t < BW; ++t) acc[k][t] += static_cast<A>(grad_weight[t]) * static_cast<A>(e[t]);
  }
}

// Input coordinate that output coordinate `out` reads through kernel tap `tap` along one
// dimension; outside [0, size) it reads the zero padding.
FASTSEG_HD int64_t input_coord(int64_t out, int64_t tap, int64_t stride, int64_t padding,
                               int64_t dilation) {
  return out * stride - padding + tap * dilation;
}

// The outputs [first, end) along one dimension whose input_coord for `tap` lies inside [0, size)
// (empty when first >= end): the rest read padding.
FASTSEG_HD int64_t first_inside(int64_t tap, int64_t stride, int64_t padding, int64_t dilation) {
  const int64_t lead = padding - tap * dilation;  // input_coord(out) >= 0  ⇔  out·stride >= lead
  return lead <= 0 ? 0 : (lead + stride - 1) / stride;
}
FASTSEG_HD int64_t end_inside(int64_t tap, int64_t size, int64_t outputs, int64_t stride,
                              int64_t padding, int64_t dilation) {
  const int64_t room = size - 1 + padding - tap * dilation;  // input_coord(out) <= size - 1
  if (room < 0) return 0;
  const int64_t end = room / stride + 1;
  return end < outputs ? end : outputs;
}

}  // namespace dyconv
}  // namespace fastseg
