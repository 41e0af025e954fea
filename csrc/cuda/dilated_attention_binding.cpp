// Torch binding of the CUDA kernels of dilated_attention2d: argument checks, contiguous copies of
// the inputs, output allocation and the launches.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "cuda/binding.h"
#include "cuda/dilated_attention.cuh"
#include "dilated_attention.h"

namespace fastseg {
namespace attn {
namespace {

constexpr int64_t kMaxInt = std::numeric_limits<int>::max();

// Checks what the CUDA kernels need beyond check_dilated_attention and returns the call's shape.
cuda::AttentionShape check_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                int64_t dilation, double scale) {
  check_dilated_attention(q, k, v, dilation);
  TORCH_CHECK(q.is_cuda(), "dilated_attention2d (cuda): q must be a CUDA tensor");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "dilated_attention2d (cuda): q must be float16, bfloat16, float32 or float64, got ",
              dtype);
  // The kernels index tokens within an image, heads and columns with 32-bit ints (element
  // offsets are 64-bit).
  TORCH_CHECK(q.size(1) * q.size(2) <= kMaxInt && q.size(3) <= kMaxInt && q.size(4) <= kMaxInt &&
                  v.size(4) <= kMaxInt,
              "dilated_attention2d (cuda): q of shape ", q.sizes(), " with v of shape ", v.sizes(),
              " is too large for the CUDA kernels");
  const auto i = [](int64_t value) { return static_cast<int>(value); };
  const cuda::AttentionShape s{q.size(0), i(q.size(1)), i(q.size(2)), i(q.size(3)),
                               i(q.size(4)), i(v.size(4)), i(dilation), scale};
  TORCH_CHECK(cuda::max_blocks(s) <= kMaxInt, "dilated_attention2d (cuda): q of shape ",
              q.sizes(), " needs more thread blocks than one launch allows");
  return s;
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                const at::Tensor& v_in, int64_t dilation,
                                                double scale) {
  const cuda::AttentionShape s = check_cuda(q_in, k_in, v_in, dilation, scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  at::Tensor out = at::empty(v.sizes(), q.options());
  at::Tensor lse =
      at::empty(q.sizes().slice(0, 4), q.options().dtype(at::toOpMathType(q.scalar_type())));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "dilated_attention2d_cuda", [&] {
    using acc_scalar_t = at::opmath_type<scalar_t>;
    cuda::forward(s, cuda_ptr<scalar_t>(q), cuda_ptr<scalar_t>(k), cuda_ptr<scalar_t>(v),
                  cuda_ptr<scalar_t>(out), lse.data_ptr<acc_scalar_t>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in, int64_t dilation,
    double scale) {
  const cuda::AttentionShape s = check_cuda(q_in, k_in, v_in, dilation, scale);
  check_dilated_attention_backward(grad_out_in, q_in, v_in, out_in, lse_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  // Every element of the gradients is written by the kernels; delta is their scratch.
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor grad_k = at::empty(k.sizes(), k.options());
  at::Tensor grad_v = at::empty(v.sizes(), v.options());
  at::Tensor delta = at::empty_like(lse);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "dilated_attention2d_backward_cuda", [&] {
    using acc_scalar_t = at::opmath_type<scalar_t>;
    cuda::backward(s, cuda_ptr<scalar_t>(grad_out), cuda_ptr<scalar_t>(q), cuda_ptr<scalar_t>(k),
                   cuda_ptr<scalar_t>(v), cuda_ptr<scalar_t>(out), lse.data_ptr<acc_scalar_t>(),
                   delta.data_ptr<acc_scalar_t>(), cuda_ptr<scalar_t>(grad_q),
                   cuda_ptr<scalar_t>(grad_k), cuda_ptr<scalar_t>(grad_v), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CUDA, m) {
  m.impl("dilated_attention2d", &forward_cuda);
  m.impl("dilated_attention2d_backward", &backward_cuda);
}

}  // namespace attn
}  // namespace fastseg
