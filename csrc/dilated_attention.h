// Host-side argument checks of dilated_attention2d, shared by the CPU kernels and the CUDA binding.
#pragma once

#include <ATen/ATen.h>

namespace fastseg {

// Checks q, k, v (and the dilation) of dilated_attention2d; messages name the argument.
// Device-specific checks (CPU vs CUDA tensors, supported dtypes) stay with each backend.
//   q [N, H, W, heads, d_qk]   k [N, H, W, heads, d_qk]   v [N, H, W, heads, d_v]
inline void check_dilated_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    int64_t dilation) {
  TORCH_CHECK_VALUE(q.dim() == 5, "dilated_attention2d: q must be [N, H, W, heads, d_qk], got ",
                    q.sizes());
  TORCH_CHECK_VALUE(q.numel() > 0, "dilated_attention2d: q must be non-empty, got ", q.sizes());
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), "dilated_attention2d: k must have q's shape ",
                    q.sizes(), ", got ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == 5 && v.size(0) == q.size(0) && v.size(1) == q.size(1) &&
                        v.size(2) == q.size(2) && v.size(3) == q.size(3) && v.size(4) > 0,
                    "dilated_attention2d: v must be [N, H, W, heads, d_v] with q's N, H, W, heads ",
                    q.sizes().slice(0, 4), ", got ", v.sizes());
  TORCH_CHECK_VALUE(dilation > 0, "dilated_attention2d: dilation must be positive, got ", dilation);
  TORCH_CHECK_VALUE(q.size(1) % dilation == 0 && q.size(2) % dilation == 0,
                    "dilated_attention2d: H=", q.size(1), " and W=", q.size(2),
                    " must be divisible by dilation=", dilation);
  for (const auto& [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    TORCH_CHECK_VALUE(t->scalar_type() == q.scalar_type(), "dilated_attention2d: ", name,
                      " has dtype ", t->scalar_type(), " but q has ", q.scalar_type());
    TORCH_CHECK_VALUE(t->device() == q.device(), "dilated_attention2d: ", name, " is on ",
                      t->device(), " but q is on ", q.device());
  }
}

// Checks the extra inputs of dilated_attention2d_backward against the forward's.
inline void check_dilated_attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                             const at::Tensor& v, const at::Tensor& out,
                                             const at::Tensor& lse) {
  TORCH_CHECK_VALUE(grad_out.sizes() == v.sizes() && out.sizes() == v.sizes(),
                    "dilated_attention2d_backward: grad_out and out must have v's shape ",
                    v.sizes(), ", got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK_VALUE(lse.sizes() == q.sizes().slice(0, 4),
                    "dilated_attention2d_backward: lse must be [N, H, W, heads] = ",
                    q.sizes().slice(0, 4), ", got ", lse.sizes());
  TORCH_CHECK_VALUE(grad_out.scalar_type() == q.scalar_type() &&
                        out.scalar_type() == q.scalar_type(),
                    "dilated_attention2d_backward: grad_out and out must have q's dtype ",
                    q.scalar_type());
  TORCH_CHECK_VALUE(lse.scalar_type() == (q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat),
                    "dilated_attention2d_backward: lse must be float64 for float64 inputs, "
                    "float32 otherwise, got ", lse.scalar_type());
  for (const auto* t : {&grad_out, &out, &lse})
    TORCH_CHECK_VALUE(t->device() == q.device(),
                      "dilated_attention2d_backward: grad_out, out and lse must be on q's device");
}

}  // namespace fastseg
