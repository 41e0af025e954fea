// Host-side helpers of the torch bindings of the CUDA kernels (csrc/cuda/*_binding.cpp).
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastseg {

// The kernels take CUDA's own half types; at::Half and at::BFloat16 share their bit layout.
template <typename T> struct cuda_scalar { using type = T; };
template <> struct cuda_scalar<at::Half> { using type = __half; };
template <> struct cuda_scalar<at::BFloat16> { using type = __nv_bfloat16; };

template <typename T>
typename cuda_scalar<T>::type* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<typename cuda_scalar<T>::type*>(t.data_ptr<T>());
}

}  // namespace fastseg
