// Host launchers of the CUDA kernels of mixed_depthwise_conv2d (csrc/cuda/mixed_depthwise_conv.cu),
// callable from host-compiled code: raw pointers and a stream, no torch types.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/macros.h"

namespace fastseg {
namespace mdc {
namespace cuda {

// Kernel sizes are template parameters of the kernels (1, 3, ..., kMaxKernelSize).
inline constexpr int kMaxKernelSize = 15;

// Channels [c_begin, c_begin + c_count) of an NCHW-contiguous [N, C, H, W] tensor, each convolved
// with its own k×k kernel.
struct GroupShape {
  int64_t N, C, c_begin, c_count;
  int H, W, k;
};

// Output tiles per H×W plane of each kernel: N·C·tiles thread blocks per launch (at most), and
// the rows of the weight-gradient partial buffer.
int64_t conv_tiles(int H, int W);
int64_t weight_grad_tiles(int H, int W);

// out[n, c] = correlate_same(in[n, c], weight[c - c_begin]) + bias[c] (+ addend[n, c]) for the
// group's channels; `flip` rotates the kernels by 180° (input gradient: in = grad_out).
// weight: [c_count, k, k]; bias: [C] or null; addend: like `in`, or null.
// T: float, double, __half, __nv_bfloat16 (accumulates in acc_t<T>).
template <typename T>
void depthwise_conv(const GroupShape& s, const T* in, const T* weight, const T* bias,
                    const T* addend, bool flip, T* out, cudaStream_t stream);

// partial[(n·C + c)·tiles + tile, i·k + j] = the weight gradient of tap (i, j) of channel c from
// the outputs of one tile of plane (n, c), tiles = weight_grad_tiles(H, W); the caller sums over
// n and tile. Row stride `partial_stride` ≥ k².
template <typename T>
void depthwise_conv_weight_grad(const GroupShape& s, const T* x, const T* grad_out,
                                int partial_stride, acc_t<T>* partial, cudaStream_t stream);

}  // namespace cuda
}  // namespace mdc
}  // namespace fastseg
