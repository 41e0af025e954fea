// CUDA kernels of the attention gates (forward and backward) on NCHW-contiguous raw pointers.
//
// Per-pixel gates (spatial_gate, gated_pointwise, attention_gate): one thread per pixel walks
// the channels; neighbouring threads read neighbouring pixels of a channel plane, so every load
// is coalesced. Plane gates (channel_gate, cross_gate): one thread per output (or, for the
// resize's adjoint, per input) pixel, resizing on the fly with the per-element math shared with
// the CPU kernels (common/attention_gates.h). The adjoint gathers, so no atomics are needed and
// results are deterministic. Plane reductions: one block per plane.
#include "cuda/attention_gates.cuh"

#include "common/attention_gates.h"
#include "cuda/elements.cuh"

namespace fastseg {
namespace gates {
namespace cuda {
namespace {

constexpr int kThreads = 256;

int64_t grid_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

__device__ __forceinline__ int64_t thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    spatial_gate_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                        const T* __restrict__ gy, T* __restrict__ out, acc_t<T>* __restrict__ gz,
                        int64_t N, int64_t C, int64_t HW) {
  using A = acc_t<T>;
  const int64_t e = thread_index();
  if (e >= N * HW) return;
  const int64_t base = e / HW * C * HW + e % HW;
  A z = to_acc(b[0]), gs = 0;
  for (int64_t c = 0; c < C; ++c) {
    const A xv = to_acc(x[base + c * HW]);
    z += to_acc(w[c]) * xv;
    if (gy) gs += to_acc(gy[base + c * HW]) * xv;
  }
  const A s = sigmoid(z);
  if (gy) {
    const A g = gs * s * (A(1) - s);
    gz[e] = g;
    for (int64_t c = 0; c < C; ++c)
      store(out + base + c * HW, to_acc(gy[base + c * HW]) * s + g * to_acc(w[c]));
  } else {
    for (int64_t c = 0; c < C; ++c) store(out + base + c * HW, to_acc(x[base + c * HW]) * s);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gated_pointwise_kernel(const T* __restrict__ prod, const T* __restrict__ b_s,
                           const T* __restrict__ bias, const T* __restrict__ gy,
                           T* __restrict__ out, int64_t N, int64_t C_out, int64_t HW) {
  using A = acc_t<T>;
  const int64_t e = thread_index();
  if (e >= N * HW) return;
  const int64_t n = e / HW, p = e % HW;
  const T* pr = prod + n * (2 * C_out + 1) * HW + p;
  const A s = sigmoid(to_acc(pr[2 * C_out * HW]) + to_acc(b_s[0]));
  if (gy) {
    T* grad = out + n * (2 * C_out + 1) * HW + p;
    A gs = 0;
    for (int64_t o = 0; o < C_out; ++o) {
      const A g = to_acc(gy[(n * C_out + o) * HW + p]);
      gs += g * to_acc(pr[(C_out + o) * HW]);
      store(grad + o * HW, g);
      store(grad + (C_out + o) * HW, s * g);
    }
    store(grad + 2 * C_out * HW, gs * s * (A(1) - s));
  } else {
    for (int64_t o = 0; o < C_out; ++o)
      store(out + (n * C_out + o) * HW + p,
            to_acc(pr[o * HW]) + s * to_acc(pr[(C_out + o) * HW]) + to_acc(bias[o]));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    attention_gate_kernel(const T* __restrict__ x, T* __restrict__ proj, const T* __restrict__ b,
                          const T* __restrict__ psi_w, const T* __restrict__ psi_b,
                          const T* __restrict__ gy, T* __restrict__ out, acc_t<T>* __restrict__ gt,
                          int64_t N, int64_t C_x, int64_t C_i, int64_t HW) {
  using A = acc_t<T>;
  const int64_t e = thread_index();
  if (e >= N * HW) return;
  const int64_t n = e / HW, p = e % HW;
  T* pr = proj + n * C_i * HW + p;
  A logit = to_acc(psi_b[0]);
  for (int64_t i = 0; i < C_i; ++i)
    logit += to_acc(psi_w[i]) * imax(to_acc(pr[i * HW]) + to_acc(b[i]), A(0));
  const A alpha = sigmoid(logit);
  const int64_t base = n * C_x * HW + p;
  if (!gy) {
    for (int64_t c = 0; c < C_x; ++c) store(out + base + c * HW, to_acc(x[base + c * HW]) * alpha);
    return;
  }
  A ga = 0;
  for (int64_t c = 0; c < C_x; ++c) {
    const A g = to_acc(gy[base + c * HW]);
    ga += g * to_acc(x[base + c * HW]);
    store(out + base + c * HW, g * alpha);
  }
  const A grad_logit = ga * alpha * (A(1) - alpha);
  gt[e] = grad_logit;
  for (int64_t i = 0; i < C_i; ++i) {
    const A q = to_acc(pr[i * HW]) + to_acc(b[i]);
    store(pr + i * HW, q > A(0) ? to_acc(psi_w[i]) * grad_logit : A(0));
  }
}

// The [h, w] plane resized to [H, W], at output pixel (r, c).
template <typename A, typename T>
__device__ A resize_at(const T* __restrict__ plane, int r, int c, const Resize& z) {
  const Taps<A> tr = resize_taps<A>(r, z.h, z.H, resize_scale<A>(z.h, z.H, z.align_corners),
                                    z.align_corners);
  const Taps<A> tc = resize_taps<A>(c, z.w, z.W, resize_scale<A>(z.w, z.W, z.align_corners),
                                    z.align_corners);
  const T *top = plane + static_cast<int64_t>(tr.i0) * z.w,
          *bottom = plane + static_cast<int64_t>(tr.i1) * z.w;
  return tr.l0 * (tc.l0 * to_acc(top[tc.i0]) + tc.l1 * to_acc(top[tc.i1])) +
         tr.l1 * (tc.l0 * to_acc(bottom[tc.i0]) + tc.l1 * to_acc(bottom[tc.i1]));
}

// resize^T of the [H, W] plane `grad` at input pixel (i, j), gathered from the outputs that read it.
template <typename A, typename G>
__device__ A adjoint_at(const G* __restrict__ grad, int i, int j, const Resize& z) {
  const A sh = resize_scale<A>(z.h, z.H, z.align_corners), sw = resize_scale<A>(z.w, z.W, z.align_corners);
  const Range rows = adjoint_range<A>(i, z.h, z.H, sh, z.align_corners);
  const Range cols = adjoint_range<A>(j, z.w, z.W, sw, z.align_corners);
  A acc = 0;
  for (int r = rows.lo; r <= rows.hi; ++r) {
    const A wr = tap_weight(resize_taps<A>(r, z.h, z.H, sh, z.align_corners), i);
    if (wr == A(0)) continue;
    for (int c = cols.lo; c <= cols.hi; ++c)
      acc += wr * tap_weight(resize_taps<A>(c, z.w, z.W, sw, z.align_corners), j) *
             to_acc(grad[static_cast<int64_t>(r) * z.W + c]);
  }
  return acc;
}

// One block per input plane: Σ x, or Σ x·resize^T(gy).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    plane_sums_kernel(const T* __restrict__ x, const T* __restrict__ gy, Resize z,
                      acc_t<T>* __restrict__ sums) {
  using A = acc_t<T>;
  __shared__ A partial[kThreads];
  const int64_t plane = blockIdx.x, in_plane = static_cast<int64_t>(z.h) * z.w;
  const T* xp = x + plane * in_plane;
  const T* gp = gy ? gy + plane * static_cast<int64_t>(z.H) * z.W : nullptr;
  A acc = 0;
  for (int64_t e = threadIdx.x; e < in_plane; e += blockDim.x) {
    const int i = static_cast<int>(e / z.w), j = static_cast<int>(e % z.w);
    acc += to_acc(xp[e]) * (gp ? adjoint_at<A>(gp, i, j, z) : A(1));
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) sums[plane] = partial[0];
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    channel_gate_apply_kernel(const T* __restrict__ x, const acc_t<T>* __restrict__ gate,
                              const T* __restrict__ skip, Resize z, int64_t planes,
                              T* __restrict__ y) {
  using A = acc_t<T>;
  const int64_t e = thread_index(), out_plane = static_cast<int64_t>(z.H) * z.W;
  if (e >= planes * out_plane) return;
  const int64_t plane = e / out_plane, o = e % out_plane;
  const A v = resize_at<A>(x + plane * z.h * z.w, static_cast<int>(o / z.W),
                           static_cast<int>(o % z.W), z) * gate[plane];
  store(y + e, skip ? v + to_acc(skip[e]) : v);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    channel_gate_input_grad_kernel(const T* __restrict__ gy, const acc_t<T>* __restrict__ gate,
                                   const acc_t<T>* __restrict__ grad_mean, Resize z,
                                   int64_t planes, T* __restrict__ gx) {
  using A = acc_t<T>;
  const int64_t e = thread_index(), in_plane = static_cast<int64_t>(z.h) * z.w;
  if (e >= planes * in_plane) return;
  const int64_t plane = e / in_plane, i = e % in_plane;
  const A u = adjoint_at<A>(gy + plane * z.H * z.W, static_cast<int>(i / z.w),
                            static_cast<int>(i % z.w), z);
  store(gx + e, gate[plane] * u + grad_mean[plane] / static_cast<A>(in_plane));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    cross_gate_kernel(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ gy,
                      Resize z, int64_t planes, T* __restrict__ out,
                      acc_t<T>* __restrict__ grad_gate) {
  using A = acc_t<T>;
  const int64_t e = thread_index(), out_plane = static_cast<int64_t>(z.H) * z.W;
  if (e >= planes * out_plane) return;
  const int64_t plane = e / out_plane, o = e % out_plane;
  const A s = sigmoid(resize_at<A>(b + plane * z.h * z.w, static_cast<int>(o / z.W),
                                   static_cast<int>(o % z.W), z));
  if (gy) {
    const A g = to_acc(gy[e]);
    store(out + e, g * s);
    grad_gate[e] = g * to_acc(a[e]) * s * (A(1) - s);
  } else {
    store(out + e, to_acc(a[e]) * s);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    resize_adjoint_kernel(const acc_t<T>* __restrict__ grad, Resize z, int64_t planes,
                          T* __restrict__ out) {
  using A = acc_t<T>;
  const int64_t e = thread_index(), in_plane = static_cast<int64_t>(z.h) * z.w;
  if (e >= planes * in_plane) return;
  const int64_t plane = e / in_plane, i = e % in_plane;
  store(out + e, adjoint_at<A>(grad + plane * z.H * z.W, static_cast<int>(i / z.w),
                               static_cast<int>(i % z.w), z));
}

}  // namespace

template <typename T>
void spatial_gate(const T* x, const T* w, const T* b, const T* gy, T* out, acc_t<T>* gz, int64_t N,
                  int64_t C, int64_t HW, cudaStream_t stream) {
  spatial_gate_kernel<T><<<grid_for(N * HW), kThreads, 0, stream>>>(x, w, b, gy, out, gz, N, C, HW);
}

template <typename T>
void gated_pointwise(const T* prod, const T* b_s, const T* bias, const T* gy, T* out, int64_t N,
                     int64_t C_out, int64_t HW, cudaStream_t stream) {
  gated_pointwise_kernel<T><<<grid_for(N * HW), kThreads, 0, stream>>>(prod, b_s, bias, gy, out, N,
                                                                      C_out, HW);
}

template <typename T>
void attention_gate(const T* x, T* proj, const T* b, const T* psi_w, const T* psi_b, const T* gy,
                    T* out, acc_t<T>* gt, int64_t N, int64_t C_x, int64_t C_i, int64_t HW,
                    cudaStream_t stream) {
  attention_gate_kernel<T><<<grid_for(N * HW), kThreads, 0, stream>>>(x, proj, b, psi_w, psi_b, gy,
                                                                     out, gt, N, C_x, C_i, HW);
}

template <typename T>
void plane_sums(const T* x, const T* gy, const Resize& r, int64_t planes, acc_t<T>* sums,
                cudaStream_t stream) {
  plane_sums_kernel<T><<<planes, kThreads, 0, stream>>>(x, gy, r, sums);
}

template <typename T>
void channel_gate_apply(const T* x, const acc_t<T>* gate, const T* skip, const Resize& r,
                        int64_t planes, T* y, cudaStream_t stream) {
  channel_gate_apply_kernel<T><<<grid_for(planes * r.H * r.W), kThreads, 0, stream>>>(
      x, gate, skip, r, planes, y);
}

template <typename T>
void channel_gate_input_grad(const T* gy, const acc_t<T>* gate, const acc_t<T>* grad_mean,
                             const Resize& r, int64_t planes, T* gx, cudaStream_t stream) {
  channel_gate_input_grad_kernel<T><<<grid_for(planes * r.h * r.w), kThreads, 0, stream>>>(
      gy, gate, grad_mean, r, planes, gx);
}

template <typename T>
void cross_gate(const T* a, const T* b, const T* gy, const Resize& r, int64_t planes, T* out,
                acc_t<T>* grad_gate, cudaStream_t stream) {
  cross_gate_kernel<T><<<grid_for(planes * r.H * r.W), kThreads, 0, stream>>>(a, b, gy, r, planes,
                                                                             out, grad_gate);
}

template <typename T>
void resize_adjoint(const acc_t<T>* grad, const Resize& r, int64_t planes, T* out,
                    cudaStream_t stream) {
  resize_adjoint_kernel<T><<<grid_for(planes * r.h * r.w), kThreads, 0, stream>>>(grad, r, planes,
                                                                                 out);
}

#define FASTSEG_INSTANTIATE(T)                                                                  \
  template void spatial_gate<T>(const T*, const T*, const T*, const T*, T*, acc_t<T>*, int64_t, \
                                int64_t, int64_t, cudaStream_t);                                \
  template void gated_pointwise<T>(const T*, const T*, const T*, const T*, T*, int64_t, int64_t, \
                                   int64_t, cudaStream_t);                                      \
  template void attention_gate<T>(const T*, T*, const T*, const T*, const T*, const T*, T*,     \
                                  acc_t<T>*, int64_t, int64_t, int64_t, int64_t, cudaStream_t); \
  template void plane_sums<T>(const T*, const T*, const Resize&, int64_t, acc_t<T>*,            \
                              cudaStream_t);                                                    \
  template void channel_gate_apply<T>(const T*, const acc_t<T>*, const T*, const Resize&,       \
                                      int64_t, T*, cudaStream_t);                               \
  template void channel_gate_input_grad<T>(const T*, const acc_t<T>*, const acc_t<T>*,          \
                                           const Resize&, int64_t, T*, cudaStream_t);           \
  template void cross_gate<T>(const T*, const T*, const T*, const Resize&, int64_t, T*,         \
                              acc_t<T>*, cudaStream_t);                                         \
  template void resize_adjoint<T>(const acc_t<T>*, const Resize&, int64_t, T*, cudaStream_t);
FASTSEG_INSTANTIATE(float)
FASTSEG_INSTANTIATE(double)
FASTSEG_INSTANTIATE(__half)
FASTSEG_INSTANTIATE(__nv_bfloat16)
#undef FASTSEG_INSTANTIATE

}  // namespace cuda
}  // namespace gates
}  // namespace fastseg
