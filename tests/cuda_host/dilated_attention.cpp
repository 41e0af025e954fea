// C entry points to the CUDA kernels of dilated_attention2d run under tests/cuda_host/emulation.h.
// KERNEL_FILE is the kernel source with its launches rewritten (see emulation.h).
#include "emulation.h"

#include KERNEL_FILE

namespace {

fastseg::attn::cuda::AttentionShape shape_of(const int64_t* d, double scale) {
  const auto i = [](int64_t v) { return static_cast<int>(v); };
  // d: N, H, W, heads, d_qk, d_v, dilation
  return {d[0], i(d[1]), i(d[2]), i(d[3]), i(d[4]), i(d[5]), i(d[6]), scale};
}

template <typename T>
void forward(const int64_t* d, double scale, const void* q, const void* k, const void* v,
             void* out, void* lse) {
  fastseg::attn::cuda::forward(shape_of(d, scale), static_cast<const T*>(q),
                               static_cast<const T*>(k), static_cast<const T*>(v),
                               static_cast<T*>(out), static_cast<fastseg::acc_t<T>*>(lse), nullptr);
}

template <typename T>
void backward(const int64_t* d, double scale, const void* grad_out, const void* q, const void* k,
              const void* v, const void* out, const void* lse, void* delta, void* grad_q,
              void* grad_k, void* grad_v) {
  using A = fastseg::acc_t<T>;
  fastseg::attn::cuda::backward(
      shape_of(d, scale), static_cast<const T*>(grad_out), static_cast<const T*>(q),
      static_cast<const T*>(k), static_cast<const T*>(v), static_cast<const T*>(out),
      static_cast<const A*>(lse), static_cast<A*>(delta), static_cast<T*>(grad_q),
      static_cast<T*>(grad_k), static_cast<T*>(grad_v), nullptr);
}

}  // namespace

#define FASTSEG_ENTRY(T, suffix)                                                              \
  extern "C" void forward_##suffix(const int64_t* d, double scale, const void* q,            \
                                   const void* k, const void* v, void* out, void* lse) {     \
    forward<T>(d, scale, q, k, v, out, lse);                                                  \
  }                                                                                           \
  extern "C" void backward_##suffix(const int64_t* d, double scale, const void* grad_out,    \
                                    const void* q, const void* k, const void* v,             \
                                    const void* out, const void* lse, void* delta,           \
                                    void* grad_q, void* grad_k, void* grad_v) {              \
    backward<T>(d, scale, grad_out, q, k, v, out, lse, delta, grad_q, grad_k, grad_v);        \
  }
FASTSEG_ENTRY(float, float32)
FASTSEG_ENTRY(double, float64)
FASTSEG_ENTRY(__half, float16)
FASTSEG_ENTRY(__nv_bfloat16, bfloat16)
