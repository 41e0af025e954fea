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

inline void check_gated_pointwise(const char* op, const at::Tensor& a, const at::Tensor& w_s,
                           const at::Tensor& b_s, const at::Tensor& w_a, const at::Tensor& w_b) {
  check_feature(op, "a", a, a);
  const int64_t C_in = a.size(1), C_out = w_a.size(0);
  check_matrix(op, "w_s", w_s, 1, C_in, a);
  check_vector(op, "b_s", b_s, 1, a);
  check_matrix(op, "w_a", w_a, C_out, C_in, a);
  check_matrix(op, "w_b", w_b, C_out, C_in, a);
}

struct ChannelGateShape {
  int64_t N, C, h, w, H, W;
};

inline ChannelGateShape check_channel_gate(const char* op, const at::Tensor& x, const at::Tensor& w1,
                                    const at::Tensor& w2, bool upsample) {
  check_feature(op, "x", x, x);
  const int64_t C = x.size(1), C_r = w1.size(0);
  check_matrix(op, "w1", w1, C_r, C, x);
  check_matrix(op, "w2", w2, C, C_r, x);
  const int64_t f = upsample ? 2 : 1;
  return {x.size(0), C, x.size(2), x.size(3), f * x.size(2), f * x.size(3)};
}

inline void check_cross_gate(const char* op, const at::Tensor& a, const at::Tensor& b) {
  check_feature(op, "a", a, a);
  check_feature(op, "b", b, a);
  TORCH_CHECK(b.size(0) == a.size(0) && b.size(1) == a.size(1), op,
              ": b must have a's batch and channels");
}

inline void check_attention_gate(const char* op, const at::Tensor& x, const at::Tensor& g,
                          const at::Tensor& w_x, const at::Tensor& w_g, const at::Tensor& b,
                          const at::Tensor& psi_w, const at::Tensor& psi_b) {
  check_feature(op, "x", x, x);
  check_feature(op, "g", g, x);
  TORCH_CHECK(g.size(0) == x.size(0) && g.size(2) == x.size(2) && g.size(3) == x.size(3), op,
              ": g must have x's batch and H, W");
  const int64_t C_i = w_x.size(0);
  check_matrix(op, "w_x", w_x, C_i, x.size(1), x);
  check_matrix(op, "w_g", w_g, C_i, g.size(1), x);
  check_vector(op, "b", b, C_i, x);
  check_matrix(op, "psi_w", psi_w, 1, C_i, x);
  check_vector(op, "psi_b", psi_b, 1, x);
}

}  // namespace gates
}  // namespace fastseg
