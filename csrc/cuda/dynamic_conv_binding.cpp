// Torch binding of the CUDA kernels of dynamic_conv2d: argument checks, layouts, launches, and the
// reductions left to torch (the weight-gradient partials over pixel splits and tiles, the bias
// terms from Σ_hw grad_out).
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "cuda/binding.h"
#include "cuda/dynamic_conv.cuh"
#include "dynamic_conv.h"
#include "utils.h"

namespace fastseg {
namespace dyconv {
namespace {

constexpr int64_t kMaxInt = std::numeric_limits<int>::max();

// Checks what the CUDA kernels need beyond check_dynamic_conv and returns the call's geometry.
cuda::ConvShape check_cuda(const at::Tensor& x, const at::Tensor& experts,
                           const at::Tensor& routing, const std::optional<at::Tensor>& bias,
                           at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups) {
  check_dynamic_conv(x, experts, routing, bias, stride, padding, dilation, groups);
  TORCH_CHECK(x.is_cuda(), "dynamic_conv2d (cuda): x must be a CUDA tensor");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "dynamic_conv2d (cuda): x must be float16, bfloat16, float32 or float64, got ", dtype);
  const int64_t H_out = conv_output_size(x.size(2), experts.size(3), stride[0], padding[0],
                                         dilation[0]);
  const int64_t W_out = conv_output_size(x.size(3), experts.size(4), stride[1], padding[1],
                                         dilation[1]);
  // The kernels index within a sample, and within one expert, with 32-bit ints.
  TORCH_CHECK(x.size(1) * x.size(2) * x.size(3) <= kMaxInt &&
                  experts.size(1) * H_out * W_out <= kMaxInt &&
                  experts[0].numel() <= kMaxInt &&
                  stride[0] <= kMaxInt && stride[1] <= kMaxInt && padding[0] <= kMaxInt &&
                  padding[1] <= kMaxInt && dilation[0] <= kMaxInt && dilation[1] <= kMaxInt,
              "dynamic_conv2d (cuda): x of shape ", x.sizes(), " with experts of shape ",
              experts.sizes(), " is too large for the CUDA kernels");
  const auto i = [](int64_t v) { return static_cast<int>(v); };
  const cuda::ConvShape s{x.size(0),      i(x.size(1)),       i(x.size(2)),       i(x.size(3)),
                          i(experts.size(1)), i(H_out),       i(W_out),           i(groups),
                          i(experts.size(0)), i(experts.size(3)), i(experts.size(4)),
                          i(stride[0]),   i(stride[1]),       i(padding[0]),      i(padding[1]),
                          i(dilation[0]), i(dilation[1])};
  const cuda::WeightGradGrid grid = cuda::weight_grad_grid(s);
  TORCH_CHECK(cuda::forward_blocks(s) <= kMaxInt && cuda::input_grad_blocks(s) <= kMaxInt &&
                  grid.tiles <= kMaxInt,
              "dynamic_conv2d (cuda): x of shape ", x.sizes(),
              " needs more thread blocks than one launch allows");
  return s;
}

at::Tensor forward_cuda(const at::Tensor& x_in, const at::Tensor& experts_in,
                        const at::Tensor& routing_in, const std::optional<at::Tensor>& bias_in,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                        int64_t groups) {
  const cuda::ConvShape s =
      check_cuda(x_in, experts_in, routing_in, bias_in, stride, padding, dilation, groups);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), experts = experts_in.contiguous();
  const at::Tensor routing = routing_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  at::Tensor y = at::empty({s.N, s.C_out, s.H_out, s.W_out}, x.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dynamic_conv2d_cuda",
                                  [&] {
    cuda::forward(s, cuda_ptr<scalar_t>(x), cuda_ptr<scalar_t>(experts),
                  cuda_ptr<scalar_t>(routing), bias.defined() ? cuda_ptr<scalar_t>(bias) : nullptr,
                  cuda_ptr<scalar_t>(y), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return to_output_layout(y, x_in);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& experts_in,
    const at::Tensor& routing_in, const std::optional<at::Tensor>& bias_in,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const cuda::ConvShape s =
      check_cuda(x_in, experts_in, routing_in, bias_in, stride, padding, dilation, groups);
  TORCH_CHECK_VALUE(grad_out_in.dim() == 4 && grad_out_in.size(0) == s.N &&
                        grad_out_in.size(1) == s.C_out && grad_out_in.size(2) == s.H_out &&
                        grad_out_in.size(3) == s.W_out,
                    "dynamic_conv2d_backward: grad_out must be [", s.N, ", ", s.C_out, ", ",
                    s.H_out, ", ", s.W_out, "], got ", grad_out_in.sizes());
  TORCH_CHECK_VALUE(grad_out_in.scalar_type() == x_in.scalar_type() &&
                        grad_out_in.device() == x_in.device(),
                    "dynamic_conv2d_backward: grad_out must match x's dtype and device");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), grad_out = grad_out_in.contiguous();
  const at::Tensor experts = experts_in.contiguous(), routing = routing_in.contiguous();
  const auto acc_type = at::toOpMathType(x.scalar_type());
  const auto acc_options = x.options().dtype(acc_type);
  const cuda::WeightGradGrid grid = cuda::weight_grad_grid(s);
  at::Tensor grad_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  // Every element of both partial buffers is written by the kernel.
  at::Tensor grad_experts_partial =
      at::empty({grid.splits, s.K, s.C_out, experts[0][0].numel()}, acc_options);
  at::Tensor grad_routing_partial = at::empty({grid.splits, grid.tiles, s.N, s.K}, acc_options);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "dynamic_conv2d_backward_cuda", [&] {
    using acc_scalar_t = at::opmath_type<scalar_t>;
    cuda::input_grad(s, cuda_ptr<scalar_t>(grad_out), cuda_ptr<scalar_t>(experts),
                     cuda_ptr<scalar_t>(routing), cuda_ptr<scalar_t>(grad_x), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cuda::weight_grad(s, cuda_ptr<scalar_t>(grad_out), cuda_ptr<scalar_t>(x),
                      cuda_ptr<scalar_t>(experts), cuda_ptr<scalar_t>(routing),
                      grad_experts_partial.data_ptr<acc_scalar_t>(),
                      grad_routing_partial.data_ptr<acc_scalar_t>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // Bias terms: with gsum[n, c] = Σ_hw grad_out[n, c], grad_bias = routingᵀ · gsum and
  // grad_routing gains gsum · biasᵀ.
  const at::Tensor grad_out_sum = grad_out.sum({2, 3}, false, acc_type);
  at::Tensor grad_routing = grad_routing_partial.sum(at::IntArrayRef{0, 1});
  if (bias_in.has_value()) grad_routing = grad_routing + grad_out_sum.mm(bias_in->to(acc_type).t());
  const at::Tensor grad_bias = routing.to(acc_type).t().mm(grad_out_sum);
  const auto dtype = x.scalar_type();
  return {to_output_layout(grad_x, x_in),
          grad_experts_partial.sum(0).view(experts.sizes()).to(dtype), grad_routing.to(dtype),
          grad_bias.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CUDA, m) {
  m.impl("dynamic_conv2d", &forward_cuda);
  m.impl("dynamic_conv2d_backward", &backward_cuda);
}

}  // namespace dyconv
}  // namespace fastseg
