// Host launchers of the CUDA kernels of the attention gates (csrc/cuda/attention_gates.cu),
// callable from host-compiled code: raw pointers and a stream, no torch types. Every tensor is
// NCHW-contiguous; sums and gate values are in acc_t<T>. The dense 1×1 products and the tiny
// excitation MLP are left to torch in the binding (csrc/cuda/attention_gates_binding.cpp).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/macros.h"

namespace fastseg {
namespace gates {
namespace cuda {

// A bilinear resize of [h, w] planes to [H, W].
struct Resize {
  int h, w, H, W;
  bool align_corners;
};

// spatial_gate on x [N, C, HW], w [C], b [1]. Forward (gy null): out = x·σ(w·x + b). Backward:
// out = grad_x = gy·s + gz·w and gz [N, HW] = σ'·Σ_c gy·x (the logit's gradient).
template <typename T>
void spatial_gate(const T* x, const T* w, const T* b, const T* gy, T* out, acc_t<T>* gz, int64_t N,
                  int64_t C, int64_t HW, cudaStream_t stream);

// The gating around prod = [W_a; W_b; w_s]·a ([N, 2·C_out + 1, HW]). Forward (gy null): out
// [N, C_out, HW] = prod[o] + s·prod[C_out + o] + bias[o], s = σ(prod[2·C_out] + b_s). Backward:
// out (prod's shape) = prod's gradient [gy; s·gy; σ'·Σ_o gy·prod[C_out + o]].
template <typename T>
void gated_pointwise(const T* prod, const T* b_s, const T* bias, const T* gy, T* out, int64_t N,
                     int64_t C_out, int64_t HW, cudaStream_t stream);

// The gating around proj = W_x·x + W_g·g ([N, C_i, HW]): α = σ(psi_w·ReLU(proj + b) + psi_b).
// Forward (gy null): out = x·α. Backward: out = gy·α (grad_x's gating term), gt [N, HW] =
// σ'·Σ_c gy·x, and proj is overwritten with its gradient psi_w·gt·[proj + b > 0].
template <typename T>
void attention_gate(const T* x, T* proj, const T* b, const T* psi_w, const T* psi_b, const T* gy,
                    T* out, acc_t<T>* gt, int64_t N, int64_t C_x, int64_t C_i, int64_t HW,
                    cudaStream_t stream);

// sums[p] over each [h, w] input plane p < planes: Σ x (gy null) or Σ x·resize^T(gy[p]).
template <typename T>
void plane_sums(const T* x, const T* gy, const Resize& r, int64_t planes, acc_t<T>* sums,
                cudaStream_t stream);

// channel_gate's output: y[p] = resize(x[p])·gate[p] (+ skip[p]), y and skip [planes, H, W].
template <typename T>
void channel_gate_apply(const T* x, const acc_t<T>* gate, const T* skip, const Resize& r,
                        int64_t planes, T* y, cudaStream_t stream);

// channel_gate's input gradient: gx[p] = gate[p]·resize^T(gy[p]) + grad_mean[p] / (h·w); the
// resize is the identity or ×2 (align_corners=False), whose adjoint of 1 is H·W / (h·w).
template <typename T>
void channel_gate_input_grad(const T* gy, const acc_t<T>* gate, const acc_t<T>* grad_mean,
                             const Resize& r, int64_t planes, T* gx, cudaStream_t stream);

// cross_gate on a [planes, H, W] and b [planes, h, w]. Forward (gy null): out = a·σ(resize(b)).
// Backward: out = grad_a = gy·σ, grad_gate [planes, H, W] = gy·a·σ'.
template <typename T>
void cross_gate(const T* a, const T* b, const T* gy, const Resize& r, int64_t planes, T* out,
                acc_t<T>* grad_gate, cudaStream_t stream);

// out [planes, h, w] = resize^T(grad [planes, H, W]), gathered per input pixel.
template <typename T>
void resize_adjoint(const acc_t<T>* grad, const Resize& r, int64_t planes, T* out,
                    cudaStream_t stream);

}  // namespace cuda
}  // namespace gates
}  // namespace fastseg
