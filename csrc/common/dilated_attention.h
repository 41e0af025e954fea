// Per-element math of dilated_attention2d shared by the CPU (host compiler) and CUDA (nvcc)
// kernels, so that the CPU tests exercise what the GPU computes.
//
// Problem decomposition: with dilation s, the pixels of an H×W image fall into s² parity groups
// (r mod s, c mod s) of (H/s)·(W/s) tokens each, and attention runs independently inside each
// group and head. Problem p (of N·s²·heads) is (n, a, b, h) = sample, row offset, column offset,
// head, in that (row-major) order; token t of a group is its t-th pixel in row-major order.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace fastseg {
namespace attn {

struct Problem {
  int64_t n;
  int a, b, h;
};

FASTSEG_HD Problem problem_of(int64_t p, int s, int heads) {
  Problem pr;
  pr.h = static_cast<int>(p % heads);
  p /= heads;
  pr.b = static_cast<int>(p % s);
  p /= s;
  pr.a = static_cast<int>(p % s);
  pr.n = p / s;
  return pr;
}

// Pixel index (r·W + c) within its image of token t of group (a, b); Wg = W / s.
FASTSEG_HD int64_t group_pixel(int64_t t, int a, int b, int s, int64_t Wg, int64_t W) {
  return (a + s * (t / Wg)) * W + b + s * (t % Wg);
}

// Gradient of a softmax input: dS = P ⊙ (dP − D), with D = Σ_c dO·O of the query's row
// (= Σ_j P·dP, the row's expectation of dP).
template <typename A>
FASTSEG_HD A softmax_input_grad(A p, A dp, A delta) {
  return p * (dp - delta);
}

}  // namespace attn
}  // namespace fastseg
