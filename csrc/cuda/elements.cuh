// Conversions between storage and accumulation types in device code, shared by the CUDA kernels
// (the build defines __CUDA_NO_HALF_CONVERSIONS__, so half/bfloat16 convert only explicitly).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastseg {

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

__device__ __forceinline__ void store(__half* dst, float v) { *dst = __float2half(v); }
__device__ __forceinline__ void store(__nv_bfloat16* dst, float v) { *dst = __float2bfloat16(v); }
__device__ __forceinline__ void store(float* dst, float v) { *dst = v; }
__device__ __forceinline__ void store(double* dst, double v) { *dst = v; }

}  // namespace fastseg
