// Torch binding of the CUDA kernels of the attention gates: argument checks, layouts, launches,
// and what is left to torch: the dense 1×1 products (cuBLAS), the tiny excitation MLP on [N, C]
// and the weight-gradient reductions.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "attention_gates.h"
#include "cuda/attention_gates.cuh"
#include "cuda/binding.h"
#include "utils.h"

namespace fastseg {
namespace gates {
namespace {

void check_cuda(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), op, " (cuda): inputs must be CUDA tensors");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, " (cuda): inputs must be float16, bfloat16, float32 or float64, got ", dtype);
}

at::ScalarType acc_dtype(const at::Tensor& x) { return at::toOpMathType(x.scalar_type()); }

// [N, C, HW] view of an NCHW-contiguous tensor.
at::Tensor flat(const at::Tensor& t) { return t.view({t.size(0), t.size(1), -1}); }

#define FASTSEG_DISPATCH(x, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), name, __VA_ARGS__)

// --- spatial_gate ------------------------------------------------------------------------------

at::Tensor spatial_gate_cuda(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& b) {
  constexpr const char* op = "spatial_gate";
  check_cuda(op, x_in);
  check_feature(op, "x", x_in, x_in);
  check_matrix(op, "w", w, 1, x_in.size(1), x_in);
  check_vector(op, "b", b, 1, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), wc = w.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  FASTSEG_DISPATCH(x, "spatial_gate_cuda", [&] {
    using T = typename cuda_scalar<scalar_t>::type;
    cuda::spatial_gate<T>(cuda_ptr<scalar_t>(x), cuda_ptr<scalar_t>(wc), cuda_ptr<scalar_t>(b), nullptr,
                       cuda_ptr<scalar_t>(y), static_cast<at::opmath_type<scalar_t>*>(nullptr),
                       x.size(0), x.size(1), x.size(2) * x.size(3),
                       at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return to_output_layout(y, x_in);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_gate_backward_cuda(
    const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& b) {
  constexpr const char* op = "spatial_gate_backward";
  check_cuda(op, x_in);
  check_feature(op, "grad_out", gy_in, x_in);
  TORCH_CHECK(gy_in.sizes() == x_in.sizes(), op, ": grad_out must have x's shape");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), gy = gy_in.contiguous(), wc = w.contiguous();
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor gz = at::empty({N, HW}, x.options().dtype(acc_dtype(x)));
  FASTSEG_DISPATCH(x, "spatial_gate_backward_cuda", [&] {
    using T = typename cuda_scalar<scalar_t>::type;
    cuda::spatial_gate<T>(cuda_ptr<scalar_t>(x), cuda_ptr<scalar_t>(wc), cuda_ptr<scalar_t>(b),
                       cuda_ptr<scalar_t>(gy), cuda_ptr<scalar_t>(gx),
                       gz.data_ptr<at::opmath_type<scalar_t>>(), N, C, HW,
                       at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const at::Tensor gw = at::bmm(flat(x).to(gz.scalar_type()), gz.unsqueeze(2)).sum(0).view({1, C});
  return {to_output_layout(gx, x_in), gw.to(x.scalar_type()), gz.sum().view({1}).to(x.scalar_type())};
}

// --- gated_pointwise ---------------------------------------------------------------------------

at::Tensor gated_pointwise_cuda(const at::Tensor& a_in, const at::Tensor& w_s, const at::Tensor& b_s,
                                const at::Tensor& w_a, const at::Tensor& w_b, const at::Tensor& bias) {
  constexpr const char* op = "gated_pointwise";
  check_cuda(op, a_in);
  check_gated_pointwise(op, a_in, w_s, b_s, w_a, w_b);
  const int64_t N = a_in.size(0), C_out = w_a.size(0);
  check_vector(op, "bias", bias, C_out, a_in);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous(), bias_c = bias.contiguous();
  const at::Tensor prod = at::matmul(stacked_weight(w_s, w_a, w_b), flat(a)).contiguous();
  at::Tensor y = at::empty({N, C_out, a.size(2), a.size(3)}, a.options());
  FASTSEG_DISPATCH(a, "gated_pointwise_cuda", [&] {
    using T = typename cuda_scalar<scalar_t>::type;
    cuda::gated_pointwise<T>(cuda_ptr<scalar_t>(prod), cuda_ptr<scalar_t>(b_s), cuda_ptr<scalar_t>(bias_c),
                          nullptr, cuda_ptr<scalar_t>(y), N, C_out, a.size(2) * a.size(3),
                          at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return to_output_layout(y, a_in);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_pointwise_backward_cuda(const at::Tensor& gy_in, const at::Tensor& a_in, const at::Tensor& w_s,
                              const at::Tensor& b_s, const at::Tensor& w_a, const at::Tensor& w_b) {
  constexpr const char* op = "gated_pointwise_backward";
  check_cuda(op, a_in);
  check_gated_pointwise(op, a_in, w_s, b_s, w_a, w_b);
  check_feature(op, "grad_out", gy_in, a_in);
  const int64_t N = a_in.size(0), C_out = w_a.size(0);
  TORCH_CHECK(gy_in.size(0) == N && gy_in.size(1) == C_out && gy_in.size(2) == a_in.size(2) &&
                  gy_in.size(3) == a_in.size(3), op, ": grad_out must be [N, C_out, H, W]");
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous(), gy = gy_in.contiguous();
  const at::Tensor weight = stacked_weight(w_s, w_a, w_b);
  const at::Tensor prod = at::matmul(weight, flat(a)).contiguous();
  at::Tensor grad = at::empty_like(prod);
  FASTSEG_DISPATCH(a, "gated_pointwise_backward_cuda", [&] {
    using T = typename cuda_scalar<scalar_t>::type;
    cuda::gated_pointwise<T>(cuda_ptr<scalar_t>(prod), cuda_ptr<scalar_t>(b_s), nullptr,
                          cuda_ptr<scalar_t>(gy), cuda_ptr<scalar_t>(grad), N, C_out,
                          a.size(2) * a.size(3), at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const at::Tensor ga = at::matmul(weight.t(), grad).view(a.sizes());
  const at::Tensor gw = at::matmul(grad, flat(a).transpose(1, 2)).sum(0);
  const at::Tensor sums = grad.sum(at::IntArrayRef{0, 2});
  return {to_output_layout(ga, a_in), gw.narrow(0, 2 * C_out, 1).clone(),
          sums.narrow(0, 2 * C_out, 1).clone(), gw.narrow(0, 0, C_out).clone(),
          gw.narrow(0, C_out, C_out).clone(), sums.narrow(0, 0, C_out).clone()};
}

// --- channel_gate ------------------------------------------------------------------------------

cuda::Resize channel_gate_resize(const ChannelGateShape& s) {
  return {static_cast<int>(s.h), static_cast<int>(s.w), static_cast<int>(s.H),
          static_cast<int>(s.W), false};
}

// Plane means of x (the ×2 upsample keeps them) and the excitation: (mean, W1·mean, gate).
std::tuple<at::Tensor, at::Tensor, at::Tensor> excitation(const at::Tensor& x, const at::Tensor& w1,
                                                          const at::Tensor& w2,
                                                          const ChannelGateShape& s) {
  at::Tensor sums = at::empty({s.N, s.C}, x.options().dtype(acc_dtype(x)));
  FASTSEG_DISPATCH(x, "channel_gate_means_cuda", [&] {
    using T = typename cuda_scalar<scalar_t>::type;
    cuda::plane_sums<T>(cuda_ptr<scalar_t>(x), nullptr,
                     cuda::Resize{static_cast<int>(s.h), static_cast<int>(s.w), static_cast<int>(s.h),
                                  static_cast<int>(s.w), false},
                     s.N * s.C, sums.data_ptr<at::opmath_type<scalar_t>>(),
                     at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const at::Tensor mean = sums / static_cast<double>(s.h * s.w);
  const at::Tensor pre = at::mm(mean, w1.t().to(mean.scalar_type()));
  return {mean, pre, at::sigmoid(at::mm(at::relu(pre), w2.t().to(mean.scalar_type()))).contiguous()};
}

at::Tensor channel_gate_cuda(const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& w2,
                             const std::optional<at::Tensor>& skip_in, bool upsample) {
  constexpr const char* op = "channel_gate";
  check_cuda(op, x_in);
  const auto s = check_channel_gate(op, x_in, w1, w2, upsample);
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor skip;
  if (skip_in.has_value()) {
    check_feature(op, "skip", *skip_in, x_in);
    TORCH_CHECK(skip_in->size(0) == s.N && skip_in->size(1) == s.C && skip_in->size(2) == s.H &&
                    skip_in->size(3) == s.W, op, ": skip must be [N, C, H, W] of the output");
    skip = skip_in->contiguous();
  }
  const at::Tensor x = x_in.contiguous();
  const at::Tensor gate = std::get<2>(excitation(x, w1, w2, s));
  at::Tensor y = at::empty({s.N, s.C, s.H, s.W}, x.options());
  FASTSEG_DISPATCH(x, "channel_gate_cuda", [&] {
    using T = typename cuda_scalar<scalar_t>::type;
    cuda::channel_gate_apply<T>(cuda_ptr<scalar_t>(x), gate.data_ptr<at::opmath_type<scalar_t>>(),
                             skip.defined() ? cuda_ptr<scalar_t>(skip) : nullptr,
                             channel_gate_resize(s), s.N * s.C, cuda_ptr<scalar_t>(y),
                             at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return to_output_layout(y, x_in);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_gate_backward_cuda(
    const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& w2,
    bool upsample) {
  constexpr const char* op = "channel_gate_backward";
  check_cuda(op, x_in);
  const auto s = check_channel_gate(op, x_in, w1, w2, upsample);
  check_feature(op, "grad_out", gy_in, x_in);
  TORCH_CHECK(gy_in.size(0) == s.N && gy_in.size(1) == s.C && gy_in.size(2) == s.H &&
                  gy_in.size(3) == s.W, op, ": grad_out must be [N, C, H, W] of the output");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), gy = gy_in.contiguous();
  const auto [mean, pre, gate] = excitation(x, w1, w2, s);
  at::Tensor grad_gate = at::empty({s.N, s.C}, mean.options());
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FASTSEG_DISPATCH(x, "channel_gate_backward_cuda", [&] {
    using T = typename cuda_scalar<scalar_t>::type;
    cuda::plane_sums<T>(cuda_ptr<scalar_t>(x), cuda_ptr<scalar_t>(gy), channel_gate_resize(s), s.N * s.C,
                     grad_gate.data_ptr<at::opmath_type<scalar_t>>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // The excitation MLP's backward on [N, C] (tiny).
  const at::Tensor grad_e = grad_gate * gate * (1 - gate);
  const at::Tensor grad_pre = at::mm(grad_e, w2.to(grad_e.scalar_type())) * (pre > 0);
  const at::Tensor grad_mean = at::mm(grad_pre, w1.to(grad_e.scalar_type())).contiguous();
  FASTSEG_DISPATCH(x, "channel_gate_backward_cuda", [&] {
    using T = typename cuda_scalar<scalar_t>::type;
    using acc = at::opmath_type<scalar_t>;
    cuda::channel_gate_input_grad<T>(cuda_ptr<scalar_t>(gy), gate.data_ptr<acc>(),
                                  grad_mean.data_ptr<acc>(), channel_gate_resize(s), s.N * s.C,
                                  cuda_ptr<scalar_t>(gx), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {to_output_layout(gx, x_in), at::mm(grad_pre.t(), mean).to(w1.scalar_type()),
          at::mm(grad_e.t(), at::relu(pre)).to(w2.scalar_type())};
}

// --- cross_gate --------------------------------------------------------------------------------

cuda::Resize cross_gate_resize(const at::Tensor& a, const at::Tensor& b, bool align_corners) {
  return {static_cast<int>(b.size(2)), static_cast<int>(b.size(3)), static_cast<int>(a.size(2)),
          static_cast<int>(a.size(3)), align_corners};
}

at::Tensor cross_gate_cuda(const at::Tensor& a_in, const at::Tensor& b_in, bool align_corners) {
  constexpr const char* op = "cross_gate";
  check_cuda(op, a_in);
  check_cross_gate(op, a_in, b_in);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  at::Tensor y = at::empty_like(a, at::MemoryFormat::Contiguous);
  FASTSEG_DISPATCH(a, "cross_gate_cuda", [&] {
    using T = typename cuda_scalar<scalar_t>::type;
    cuda::cross_gate<T>(cuda_ptr<scalar_t>(a), cuda_ptr<scalar_t>(b),
                     nullptr,
                     cross_gate_resize(a, b, align_corners), a.size(0) * a.size(1),
                     cuda_ptr<scalar_t>(y), static_cast<at::opmath_type<scalar_t>*>(nullptr),
                     at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return to_output_layout(y, a_in);
}

std::tuple<at::Tensor, at::Tensor> cross_gate_backward_cuda(const at::Tensor& gy_in,
                                                            const at::Tensor& a_in,
                                                            const at::Tensor& b_in,
                                                            bool align_corners) {
  constexpr const char* op = "cross_gate_backward";
  check_cuda(op, a_in);
  check_cross_gate(op, a_in, b_in);
  check_feature(op, "grad_out", gy_in, a_in);
  TORCH_CHECK(gy_in.sizes() == a_in.sizes(), op, ": grad_out must have a's shape");
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), gy = gy_in.contiguous();
  at::Tensor ga = at::empty_like(a, at::MemoryFormat::Contiguous);
  at::Tensor gb = at::empty_like(b, at::MemoryFormat::Contiguous);
  at::Tensor grad_gate = at::empty(a.sizes(), a.options().dtype(acc_dtype(a)));
  const auto resize = cross_gate_resize(a, b, align_corners);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FASTSEG_DISPATCH(a, "cross_gate_backward_cuda", [&] {
    using T = typename cuda_scalar<scalar_t>::type;
    using acc = at::opmath_type<scalar_t>;
    cuda::cross_gate<T>(cuda_ptr<scalar_t>(a), cuda_ptr<scalar_t>(b), cuda_ptr<scalar_t>(gy), resize,
                     a.size(0) * a.size(1), cuda_ptr<scalar_t>(ga), grad_gate.data_ptr<acc>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cuda::resize_adjoint<T>(grad_gate.data_ptr<acc>(), resize, a.size(0) * a.size(1),
                         cuda_ptr<scalar_t>(gb), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {to_output_layout(ga, a_in), to_output_layout(gb, b_in)};
}

// --- attention_gate ----------------------------------------------------------------------------

at::Tensor projection(const at::Tensor& x, const at::Tensor& g, const at::Tensor& w_x,
                      const at::Tensor& w_g) {
  return (at::matmul(w_x, flat(x)) + at::matmul(w_g, flat(g))).contiguous();
}

at::Tensor attention_gate_cuda(const at::Tensor& x_in, const at::Tensor& g_in, const at::Tensor& w_x,
                               const at::Tensor& w_g, const at::Tensor& b, const at::Tensor& psi_w,
                               const at::Tensor& psi_b) {
  constexpr const char* op = "attention_gate";
  check_cuda(op, x_in);
  check_attention_gate(op, x_in, g_in, w_x, w_g, b, psi_w, psi_b);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), g = g_in.contiguous(), bc = b.contiguous(),
                   psi = psi_w.contiguous();
  at::Tensor proj = projection(x, g, w_x, w_g);
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  FASTSEG_DISPATCH(x, "attention_gate_cuda", [&] {
    using T = typename cuda_scalar<scalar_t>::type;
    cuda::attention_gate<T>(cuda_ptr<scalar_t>(x), cuda_ptr<scalar_t>(proj), cuda_ptr<scalar_t>(bc),
                         cuda_ptr<scalar_t>(psi), cuda_ptr<scalar_t>(psi_b), nullptr,
                         cuda_ptr<scalar_t>(y), static_cast<at::opmath_type<scalar_t>*>(nullptr),
                         x.size(0), x.size(1), w_x.size(0), x.size(2) * x.size(3),
                         at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return to_output_layout(y, x_in);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_gate_backward_cuda(const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& g_in,
                             const at::Tensor& w_x, const at::Tensor& w_g, const at::Tensor& b,
                             const at::Tensor& psi_w, const at::Tensor& psi_b) {
  constexpr const char* op = "attention_gate_backward";
  check_cuda(op, x_in);
  check_attention_gate(op, x_in, g_in, w_x, w_g, b, psi_w, psi_b);
  check_feature(op, "grad_out", gy_in, x_in);
  TORCH_CHECK(gy_in.sizes() == x_in.sizes(), op, ": grad_out must have x's shape");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), g = g_in.contiguous(), gy = gy_in.contiguous(),
                   bc = b.contiguous(), psi = psi_w.contiguous();
  const int64_t N = x.size(0), C_i = w_x.size(0), HW = x.size(2) * x.size(3);
  at::Tensor proj = projection(x, g, w_x, w_g);
  // psi_w's gradient needs ReLU(proj + b), which the kernel overwrites with proj's gradient.
  const at::Tensor hidden = at::relu(proj + bc.view({C_i, 1})).to(acc_dtype(x));
  at::Tensor gt = at::empty({N, HW}, x.options().dtype(acc_dtype(x)));
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  FASTSEG_DISPATCH(x, "attention_gate_backward_cuda", [&] {
    using T = typename cuda_scalar<scalar_t>::type;
    cuda::attention_gate<T>(cuda_ptr<scalar_t>(x), cuda_ptr<scalar_t>(proj), cuda_ptr<scalar_t>(bc),
                         cuda_ptr<scalar_t>(psi), cuda_ptr<scalar_t>(psi_b), cuda_ptr<scalar_t>(gy),
                         cuda_ptr<scalar_t>(gx), gt.data_ptr<at::opmath_type<scalar_t>>(), N,
                         x.size(1), C_i, HW, at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const at::Tensor& grad_proj = proj;
  flat(gx).add_(at::matmul(w_x.t(), grad_proj));
  const at::Tensor gg = at::matmul(w_g.t(), grad_proj).view(g.sizes());
  const at::Tensor grad_psi = at::bmm(hidden, gt.unsqueeze(2)).sum(0).view({1, C_i});
  return {to_output_layout(gx, x_in),
          to_output_layout(gg, g_in),
          at::matmul(grad_proj, flat(x).transpose(1, 2)).sum(0),
          at::matmul(grad_proj, flat(g).transpose(1, 2)).sum(0),
          grad_proj.sum(at::IntArrayRef{0, 2}),
          grad_psi.to(x.scalar_type()),
          gt.sum().view({1}).to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CUDA, m) {
  m.impl("spatial_gate", &spatial_gate_cuda);
  m.impl("spatial_gate_backward", &spatial_gate_backward_cuda);
  m.impl("gated_pointwise", &gated_pointwise_cuda);
  m.impl("gated_pointwise_backward", &gated_pointwise_backward_cuda);
  m.impl("channel_gate", &channel_gate_cuda);
  m.impl("channel_gate_backward", &channel_gate_backward_cuda);
  m.impl("cross_gate", &cross_gate_cuda);
  m.impl("cross_gate_backward", &cross_gate_backward_cuda);
  m.impl("attention_gate", &attention_gate_cuda);
  m.impl("attention_gate_backward", &attention_gate_backward_cuda);
}

}  // namespace gates
}  // namespace fastseg
