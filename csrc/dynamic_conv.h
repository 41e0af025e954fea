// Host-side argument checks and output geometry of dynamic_conv2d, shared by the CPU kernels and
// the CUDA binding.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastseg {

// In namespace fastseg (not a per-op one) so that any kernel file can call it unqualified.
// Checks every argument of dynamic_conv2d / dynamic_conv2d_backward (shapes, dtypes, devices,
// conv parameters); messages name the argument. Device-specific checks (CPU vs CUDA tensors,
// supported dtypes) stay with each backend.
//   x        [N, C_in, H, W]
//   experts  [K, C_out, C_in / groups, kh, kw]
//   routing  [N, K]
//   bias     [K, C_out] or none
inline void check_dynamic_conv(const at::Tensor& x, const at::Tensor& experts,
                               const at::Tensor& routing, const std::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK_VALUE(x.dim() == 4, "dynamic_conv2d: x must be [N, C_in, H, W], got ", x.sizes());
  TORCH_CHECK_VALUE(x.size(0) > 0 && x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0,
                    "dynamic_conv2d: x must be non-empty, got ", x.sizes());
  TORCH_CHECK_VALUE(experts.dim() == 5,
                    "dynamic_conv2d: experts must be [K, C_out, C_in/groups, kh, kw], got ",
                    experts.sizes());
  TORCH_CHECK_VALUE(routing.dim() == 2, "dynamic_conv2d: routing must be [N, K], got ",
                    routing.sizes());
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "dynamic_conv2d: stride, padding and dilation must have 2 entries each");
  TORCH_CHECK_VALUE(stride[0] > 0 && stride[1] > 0, "dynamic_conv2d: stride must be positive, got ",
                    stride);
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0,
                    "dynamic_conv2d: padding must be non-negative, got ", padding);
  TORCH_CHECK_VALUE(dilation[0] > 0 && dilation[1] > 0,
                    "dynamic_conv2d: dilation must be positive, got ", dilation);
  TORCH_CHECK_VALUE(groups > 0, "dynamic_conv2d: groups must be positive, got ", groups);
  const int64_t N = x.size(0), C_in = x.size(1), K = experts.size(0), C_out = experts.size(1);
  TORCH_CHECK_VALUE(K > 0 && C_out > 0 && experts.size(3) > 0 && experts.size(4) > 0,
                    "dynamic_conv2d: experts must be non-empty, got ", experts.sizes());
  TORCH_CHECK_VALUE(C_in % groups == 0, "dynamic_conv2d: x has C_in=", C_in,
                    ", not divisible by groups=", groups);
  TORCH_CHECK_VALUE(C_out % groups == 0, "dynamic_conv2d: experts has C_out=", C_out,
                    ", not divisible by groups=", groups);
  TORCH_CHECK_VALUE(experts.size(2) == C_in / groups, "dynamic_conv2d: experts must have C_in/groups=",
                    C_in / groups, " input channels (dim 2), got ", experts.sizes());
  TORCH_CHECK_VALUE(routing.size(0) == N && routing.size(1) == K,
                    "dynamic_conv2d: routing must be [N, K] = [", N, ", ", K, "], got ",
                    routing.sizes());
  if (bias.has_value())
    TORCH_CHECK_VALUE(bias->dim() == 2 && bias->size(0) == K && bias->size(1) == C_out,
                      "dynamic_conv2d: bias must be [K, C_out] = [", K, ", ", C_out, "], got ",
                      bias->sizes());
  const auto check_like_x = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), "dynamic_conv2d: ", name, " has dtype ",
                      t.scalar_type(), " but x has ", x.scalar_type());
    TORCH_CHECK_VALUE(t.device() == x.device(), "dynamic_conv2d: ", name, " is on ", t.device(),
                      " but x is on ", x.device());
  };
  check_like_x(experts, "experts");
  check_like_x(routing, "routing");
  if (bias.has_value()) check_like_x(*bias, "bias");
  for (int d = 0; d < 2; ++d) {
    const int64_t extent = x.size(2 + d) + 2 * padding[d] - dilation[d] * (experts.size(3 + d) - 1);
    TORCH_CHECK_VALUE(extent > 0, "dynamic_conv2d: the dilated kernel (", experts.size(3),
                      "x", experts.size(4), ", dilation ", dilation,
                      ") is larger than the padded input (", x.sizes(), ", padding ", padding, ")");
  }
}

// Output size along one spatial dimension (PyTorch's conv2d formula).
inline int64_t conv_output_size(int64_t in, int64_t kernel, int64_t stride, int64_t padding,
                           int64_t dilation) {
  return (in + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1;
}

}  // namespace fastseg
