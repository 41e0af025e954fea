// Host launchers of the CUDA kernels of dynamic_conv2d (csrc/cuda/dynamic_conv.cu), callable from
// host-compiled code: raw pointers and a stream, no torch types.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/macros.h"

namespace fastseg {
namespace dyconv {
namespace cuda {

// One dynamic_conv2d call: x [N, C_in, H, W], experts [K, C_out, C_in / groups, kh, kw],
// routing [N, K], output [N, C_out, H_out, W_out], all NCHW-contiguous. Per-sample sizes
// (C·H·W of x and of the output, C_out·(C_in / groups)·kh·kw of an expert) fit in an int.
struct ConvShape {
  int64_t N;
  int C_in, H, W, C_out, H_out, W_out, groups, K, kh, kw;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
};

// Thread blocks of the forward and input-gradient launches (the binding checks them against the
// grid limit).
int64_t forward_blocks(const ConvShape& s);
int64_t input_grad_blocks(const ConvShape& s);

// The weight-gradient launch: `tiles` weight tiles × `splits` ranges of output pixels, one block
// each; the sizes of the partial buffers below.
struct WeightGradGrid {
  int64_t tiles, splits;
};
WeightGradGrid weight_grad_grid(const ConvShape& s);

// y[n] = conv2d(x[n], Σ_k routing[n, k] · experts[k]) + Σ_k routing[n, k] · bias[k].
// bias: [K, C_out] or null. T: float, double, __half, __nv_bfloat16 (accumulates in acc_t<T>).
template <typename T>
void forward(const ConvShape& s, const T* x, const T* experts, const T* routing, const T* bias,
             T* y, cudaStream_t stream);

// grad_x[n] = conv2d's input gradient of grad_out[n] with sample n's mixed kernel.
template <typename T>
void input_grad(const ConvShape& s, const T* grad_out, const T* experts, const T* routing,
                T* grad_x, cudaStream_t stream);

// Partials of the expert and routing gradients, summed by the caller over their first dimension
// (and the routing partial over its second): with gW_n^s the weight gradient of sample n from the
// output pixels of split s,
//   grad_experts_partial [splits, K, C_out, C_in / groups · kh · kw] = Σ_n routing[n, k] · gW_n^s,
//   grad_routing_partial [splits, tiles, N, K] = ⟨gW_n^s, experts[k]⟩ over one weight tile.
// Every element is written (no zero-filling needed).
template <typename T>
void weight_grad(const ConvShape& s, const T* grad_out, const T* x, const T* experts,
                 const T* routing, acc_t<T>* grad_experts_partial, acc_t<T>* grad_routing_partial,
                 cudaStream_t stream);

}  // namespace cuda
}  // namespace dyconv
}  // namespace fastseg
