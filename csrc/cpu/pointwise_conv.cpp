// 1×1 convolution of NCHW tensors (CPU only; fastseg/ops/pointwise.py), forward and backward:
// y_n = W · x_n + b with W [C_out, C_in] and x_n [C_in, H·W].
//
// The forward and the input gradient (grad_x_n = Wᵀ · grad_y_n, the same product with the
// transposed weights) run pointwise::product, register-blocked, on tasks of one sample's block of
// pixels; the weight gradient Σ_n grad_y_n · x_nᵀ, a reduction over the pixels, runs through
// BLAS, one product per sample accumulated in sample order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "cpu/pointwise.h"
#include "cpu/output_cache.h"

namespace fastseg {
namespace pointwise {
namespace {

// Tasks per call at least (where the output channels allow; see apply).
constexpr int64_t kMinTasks = 8;

void check_args(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be [N, C_in, H, W], got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), op, " (cpu): inputs must be CPU tensors");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                    " (cpu): x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(2) == 1 &&
                        weight.size(3) == 1,
                    op, ": weight must be [C_out, ", x.size(1), ", 1, 1], got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type(), op, ": weight must be ",
                    x.scalar_type(), " like x, got ", weight.scalar_type());
}

// out_n [C_out, HW] = w [C_out, C_in] · in_n [C_in, HW] (+ b) for every sample, w packed by
// pack_weights, in parallel over
// tasks of (sample, block of pixels, group of output channels). Where the blocks of pixels are
// few (small images: 128 → 512 channels at 16² is 3 blocks), the output channels are split into
// groups too, so that both threads have work and a task's weights are fewer.
template <typename T>
void apply(const T* in, int64_t C_in, const std::vector<T>& packed, int64_t C_out, const T* b,
           T* out, int64_t N, int64_t HW) {
  const int64_t B = block_pixels<T>(C_in, HW);
  const int64_t blocks = (HW + B - 1) / B;
  constexpr int64_t CB = kChannelBlock;
  const int64_t channel_blocks = (C_out + CB - 1) / CB;
  const int64_t groups = std::clamp<int64_t>(kMinTasks / (N * blocks), 1, channel_blocks);
  const int64_t per_group = (channel_blocks + groups - 1) / groups * CB;  // channels
  at::parallel_for(0, N * blocks * groups, 1, [&](int64_t begin, int64_t end) {
    Panel<T> panel;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task % groups, pair = task / groups;
      const int64_t n = pair / blocks, q0 = pair % blocks * B;
      const int64_t co0 = group * per_group, count = std::min(per_group, C_out - co0);
      if (count <= 0) continue;
      product<T>(in + n * C_in * HW + q0, HW, C_in, packed.data() + co0 * C_in, count,
                 b ? b + co0 : nullptr, out + (n * C_out + co0) * HW + q0, HW,
                 std::min(B, HW - q0), panel);
    }
  });
}

// y [N, C_out, H, W] (NCHW-contiguous) = conv1x1(x, weight) + bias
at::Tensor pointwise_conv2d_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                                const std::optional<at::Tensor>& bias_in) {
  constexpr const char* op = "pointwise_conv2d";
  check_args(op, x_in, weight_in);
  const int64_t N = x_in.size(0), C_in = x_in.size(1), C_out = weight_in.size(0);
  const int64_t HW = x_in.size(2) * x_in.size(3);
  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = bias_in->contiguous();
    TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == C_out &&
                          bias.scalar_type() == x_in.scalar_type(),
                      op, ": bias must be [", C_out, "] of x's dtype, got ", bias.sizes(), " ",
                      bias.scalar_type());
  }
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor y = cpu::empty_output({N, C_out, x.size(2), x.size(3)}, x.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pointwise_conv2d_cpu", [&] {
    using T = scalar_t;
    apply<T>(x.data_ptr<T>(), C_in, pack_weights<T>(weight.data_ptr<T>(), C_in, 1, C_out, C_in),
             C_out, bias.defined() ? bias.data_ptr<T>() : nullptr, y.data_ptr<T>(), N, HW);
  });
  return y;
}

// (grad_x [N, C_in, H, W], grad_weight [C_out, C_in, 1, 1], grad_bias [C_out])
std::tuple<at::Tensor, at::Tensor, at::Tensor> pointwise_conv2d_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& weight_in) {
  constexpr const char* op = "pointwise_conv2d_backward";
  check_args(op, x_in, weight_in);
  const int64_t N = x_in.size(0), C_in = x_in.size(1), C_out = weight_in.size(0);
  const int64_t HW = x_in.size(2) * x_in.size(3);
  TORCH_CHECK_VALUE(grad_in.dim() == 4 && grad_in.size(0) == N && grad_in.size(1) == C_out &&
                        grad_in.size(2) == x_in.size(2) && grad_in.size(3) == x_in.size(3) &&
                        grad_in.scalar_type() == x_in.scalar_type(),
                    op, ": grad_out must be [", N, ", ", C_out, ", ", x_in.size(2), ", ",
                    x_in.size(3), "] of x's dtype, got ", grad_in.sizes());
  const at::Tensor x = x_in.contiguous(), gy = grad_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor gx = cpu::empty_output({N, C_in, x.size(2), x.size(3)}, x.options());
  at::Tensor gw = at::zeros({C_out, C_in}, x.options());
  if (gx.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pointwise_conv2d_backward_cpu", [&] {
      using T = scalar_t;
      // grad_x_n = Wᵀ · grad_y_n: W [C_out, C_in] read transposed
      apply<T>(gy.data_ptr<T>(), C_out, pack_weights<T>(weight.data_ptr<T>(), 1, C_in, C_in, C_out),
               C_in, nullptr, gx.data_ptr<T>(), N, HW);
    });
  }
  for (int64_t n = 0; n < N; ++n) {
    gw.addmm_(gy.select(0, n).view({C_out, HW}), x.select(0, n).view({C_in, HW}).t());
  }
  return {gx, gw.view({C_out, C_in, 1, 1}), gy.sum({0, 2, 3})};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("pointwise_conv2d", &pointwise_conv2d_cpu);
  m.impl("pointwise_conv2d_backward", &pointwise_conv2d_backward_cpu);
}

}  // namespace pointwise
}  // namespace fastseg
