// Host-side argument checks and sizes of the attention gates, shared by the CPU kernels and the
// CUDA binding (fastseg/ops/attention_gates.py checks the same with friendlier messages first).
#pragma once

#include <ATen/ATen.h>

namespace fastseg {
namespace gates {

inline void check_feature(const char* op, const char* name, const at::Tensor& t,
                          const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 4 && t.numel() > 0, op, ": ", name, " must be a non-empty [N, C, H, W], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device() == like.device(), op, ": ", name,
              " must match the input's dtype and device");
}

inline void check_matrix(const char* op, const char* name, const at::Tensor& t, int64_t rows,
                         int64_t cols, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", name,
              " must have shape [", rows, ", ", cols, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device() == like.device(), op, ": ", name,
              " must match the input's dtype and device");
}

inline void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t n,
                         const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n, "], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device() == like.device(), op, ": ", name,
              " must match the input's dtype and device");
}

// The stacked 1×1 weight [W_a; W_b; w_s] ([2·C_out + 1, C_in]) of gated_pointwise: one matrix
// product gives W_a·a, W_b·a and the attention logit.
inline at::Tensor stacked_weight(const at::Tensor& w_s, const at::Tensor& w_a, const at::Tensor& w_b) {
  return at::cat({w_a, w_b, w_s}, 0).contiguous();
}

}  // namespace gates
}  // namespace fastseg
