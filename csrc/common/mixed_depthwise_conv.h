// Per-element math of the 'same'-padded depthwise convolution, shared by csrc/cpu and csrc/cuda.
//
// Both backends first copy an input plane (or a tile of it) into a zero-padded buffer, so that a
// k×k tap (i, j) of output pixel (r, c) reads buffer[(r + i) * stride + c + j] with no bounds
// test. They then compute BW consecutive outputs of a row at a time with these helpers: the CPU
// with BW = 64 (the fixed-size loops vectorise), the CUDA kernels with BW = 4 per thread.
#pragma once

#include "common/macros.h"

namespace fastseg {
namespace mdc {

// Index of tap (i, j) in a row-major k×k kernel; `flip` rotates the kernel by 180°, which turns
// the forward correlation into the input gradient (a transposed convolution with stride 1).
FASTSEG_HD int tap_index(int i, int j, int k, bool flip) {
  return flip ? (k - 1 - i) * k + (k - 1 - j) : i * k + j;
}

// acc[t] += Σ_{i,j} kernel[tap_index(i, j)] · window[i * stride + j + t], t < BW.
// `window` points at the padded buffer's element for output (r, c0): row r, column c0.
template <int BW, typename A, typename T, typename W>
FASTSEG_HD void conv_row_block(const T* window, int stride, const W* kernel, int k, bool flip,
                               A* acc) {
  for (int i = 0; i < k; ++i) {
    for (int j = 0; j < k; ++j) {
      const T* src = window + i * stride + j;  // one pointer per tap keeps the loads contiguous
      const A w = static_cast<A>(kernel[tap_index(i, j, k, flip)]);
      FASTSEG_VECTOR_LOOP
      for (int t = 0; t < BW; ++t) acc[t] += w * static_cast<A>(src[t]);
    }
  }
}

// grad_kernel[i·k + j] += Σ_t grad_out[t] · window[i * stride + j + t], t < BW: the weight
// gradient contributed by BW consecutive outputs of one row (grad_out zero past the image).
template <int BW, typename A, typename T>
FASTSEG_HD void weight_grad_row_block(const T* window, int stride, const T* grad_out, int k,
                                      A* grad_kernel) {
  for (int i = 0; i < k; ++i) {
    for (int j = 0; j < k; ++j) {
      const T* src = window + i * stride + j;
      A dot = 0;
      FASTSEG_VECTOR_SUM(dot)
      for (int t = 0; t < BW; ++t) dot += static_cast<A>(grad_out[t]) * static_cast<A>(src[t]);
      grad_kernel[i * k + j] += dot;
    }
  }
}

}  // namespace mdc
}  // namespace fastseg
