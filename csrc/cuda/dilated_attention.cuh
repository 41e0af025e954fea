// Host launchers of the CUDA kernels of dilated_attention2d (csrc/cuda/dilated_attention.cu),
// callable from host-compiled code: raw pointers and a stream, no torch types.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/macros.h"

namespace fastseg {
namespace attn {
namespace cuda {

// One dilated_attention2d call: q, k [N, H, W, heads, d_qk], v [N, H, W, heads, d_v], all
// contiguous; dilation divides H and W. H·W, heads, d_qk and d_v fit in an int.
struct AttentionShape {
  int64_t N;
  int H, W, heads, d_qk, d_v, dilation;
  double scale;
};

// The most thread blocks any single launch of the forward or the backward needs (the binding
// checks it against the grid limit).
int64_t max_blocks(const AttentionShape& s);

// out [N, H, W, heads, d_v] = Σ_j softmax_j(scale · q·k_j) · v_j over each query's parity group;
// lse [N, H, W, heads] = log Σ_j exp(scale · q·k_j), natural log.
// T: float, double, __half, __nv_bfloat16 (accumulates in acc_t<T>, which is also lse's type).
template <typename T>
void forward(const AttentionShape& s, const T* q, const T* k, const T* v, T* out, acc_t<T>* lse,
             cudaStream_t stream);

// grad_q, grad_k (like q) and grad_v (like v) from grad_out and the forward's out and lse.
// delta [N, H, W, heads] is scratch the call fills with D_i = Σ_c grad_out·out of each query.
// Every element of the three gradients is written (no zero-filling needed).
template <typename T>
void backward(const AttentionShape& s, const T* grad_out, const T* q, const T* k, const T* v,
              const T* out, const acc_t<T>* lse, acc_t<T>* delta, T* grad_q, T* grad_k, T* grad_v,
              cudaStream_t stream);

}  // namespace cuda
}  // namespace attn
}  // namespace fastseg
