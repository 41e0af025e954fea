// Torch binding of the CUDA kernels of mixed_depthwise_conv2d: argument checks, layouts, one
// launch per channel group, and the reductions left to torch (weight-gradient partials over
// samples and tiles, bias gradient).
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "cuda/binding.h"
#include "cuda/mixed_depthwise_conv.cuh"
#include "mixed_depthwise_conv.h"
#include "utils.h"

namespace fastseg {
namespace mdc {
namespace {

std::vector<Group> check_cuda(const at::Tensor& x, at::TensorList weights) {
  TORCH_CHECK(x.is_cuda(), "mixed_depthwise_conv2d (cuda): x must be a CUDA tensor");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "mixed_depthwise_conv2d (cuda): x must be float16, bfloat16, float32 or float64, got ",
              dtype);
  auto groups = check_and_group(x, weights);
  for (size_t g = 0; g < groups.size(); ++g)
    TORCH_CHECK(groups[g].k <= cuda::kMaxKernelSize, "mixed_depthwise_conv2d (cuda): weights[", g,
                "] has kernel size ", groups[g].k, "; the CUDA kernels support up to ",
                cuda::kMaxKernelSize);
  constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
  TORCH_CHECK(x.size(2) <= kMaxInt && x.size(3) <= kMaxInt &&
                  x.size(0) * x.size(1) * cuda::conv_tiles(x.size(2), x.size(3)) <= kMaxInt,
              "mixed_depthwise_conv2d (cuda): x of shape ", x.sizes(),
              " needs more thread blocks than one launch allows");
  return groups;
}

cuda::GroupShape group_shape(const at::Tensor& x, const Group& g) {
  return {x.size(0), x.size(1), g.begin, g.count, static_cast<int>(x.size(2)),
          static_cast<int>(x.size(3)), g.k};
}

at::Tensor forward_cuda(const at::Tensor& x_in, at::TensorList weights,
                        const std::optional<at::Tensor>& bias_in, bool residual) {
  const auto groups = check_cuda(x_in, weights);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor bias;
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->numel() == x.size(1), "mixed_depthwise_conv2d: bias must have C=",
                x.size(1), " entries");
    TORCH_CHECK(bias_in->scalar_type() == x.scalar_type() && bias_in->device() == x.device(),
                "mixed_depthwise_conv2d: bias must match x's dtype and device");
    bias = bias_in->contiguous();
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "mixed_depthwise_conv2d_cuda", [&] {
    using T = typename cuda_scalar<scalar_t>::type;
    for (const auto& g : groups) {
      cuda::depthwise_conv<T>(group_shape(x, g), cuda_ptr<scalar_t>(x), cuda_ptr<scalar_t>(g.weight),
                           bias.defined() ? cuda_ptr<scalar_t>(bias) : nullptr,
                           residual ? cuda_ptr<scalar_t>(x) : nullptr, false,
                           cuda_ptr<scalar_t>(y), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return to_output_layout(y, x_in);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, at::TensorList weights, bool residual) {
  const auto groups = check_cuda(x_in, weights);
  TORCH_CHECK(grad_out_in.sizes() == x_in.sizes() &&
                  grad_out_in.scalar_type() == x_in.scalar_type() &&
                  grad_out_in.device() == x_in.device(),
              "mixed_depthwise_conv2d_backward: grad_out must match x in shape, dtype and device");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor gy = grad_out_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  int kmax = 0;
  for (const auto& g : groups) kmax = imax(kmax, g.k);
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  // Per-(plane, tile) weight gradients, summed by torch afterwards: deterministic, no atomics.
  at::Tensor gk_partial =
      at::zeros({N, C, cuda::weight_grad_tiles(x.size(2), x.size(3)), kmax * kmax},
                x.options().dtype(at::toOpMathType(x.scalar_type())));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "mixed_depthwise_conv2d_backward_cuda", [&] {
    using T = typename cuda_scalar<scalar_t>::type;
    for (const auto& g : groups) {
      const auto shape = group_shape(x, g);
      cuda::depthwise_conv<T>(shape, cuda_ptr<scalar_t>(gy), cuda_ptr<scalar_t>(g.weight), nullptr,
                           residual ? cuda_ptr<scalar_t>(gy) : nullptr, true,
                           cuda_ptr<scalar_t>(gx), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      cuda::depthwise_conv_weight_grad<T>(shape, cuda_ptr<scalar_t>(x), cuda_ptr<scalar_t>(gy),
                                       kmax * kmax, gk_partial.data_ptr<at::opmath_type<scalar_t>>(),
                                       stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {to_output_layout(gx, x_in),
          split_weight_grads(gk_partial.sum(at::IntArrayRef{0, 2}), groups, x.scalar_type()),
          gy.sum({0, 2, 3})};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CUDA, m) {
  m.impl("mixed_depthwise_conv2d", &forward_cuda);
  m.impl("mixed_depthwise_conv2d_backward", &backward_cuda);
}

}  // namespace mdc
}  // namespace fastseg
