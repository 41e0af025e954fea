// Host-side argument checks and channel→group tables of mixed_depthwise_conv2d, shared by the
// CPU kernels and the CUDA binding.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace fastseg {
namespace mdc {

// One channel group: channels [begin, begin + count) use the odd k×k kernel `weight`
// ([count, 1, k, k], contiguous).
struct Group {
  int64_t begin, count;
  int k;
  at::Tensor weight;
};

inline std::vector<Group> check_and_group(const at::Tensor& x, at::TensorList weights) {
  TORCH_CHECK(x.dim() == 4, "mixed_depthwise_conv2d: x must be [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(!weights.empty(), "mixed_depthwise_conv2d: weights must hold at least one group");
  std::vector<Group> groups;
  int64_t begin = 0;
  for (size_t g = 0; g < weights.size(); ++g) {
    const auto& w = weights[g];
    TORCH_CHECK(w.dim() == 4 && w.size(1) == 1 && w.size(2) == w.size(3) && w.size(2) % 2 == 1,
                "mixed_depthwise_conv2d: weights[", g, "] must be [C_g, 1, k, k] with odd k, got ",
                w.sizes());
    TORCH_CHECK(w.scalar_type() == x.scalar_type() && w.device() == x.device(),
                "mixed_depthwise_conv2d: weights[", g, "] must match x's dtype and device");
    groups.push_back({begin, w.size(0), static_cast<int>(w.size(2)), w.contiguous()});
    begin += w.size(0);
  }
  TORCH_CHECK(begin == x.size(1), "mixed_depthwise_conv2d: weights cover ", begin,
              " channels but x has C=", x.size(1));
  return groups;
}

// Per-group weight gradients [C_g, 1, k_g, k_g] (in `dtype`) from packed per-channel sums
// `packed` [C, kmax²] whose row c holds channel c's k_g² taps first.
inline std::vector<at::Tensor> split_weight_grads(const at::Tensor& packed,
                                                  const std::vector<Group>& groups,
                                                  at::ScalarType dtype) {
  std::vector<at::Tensor> grads;
  for (const auto& g : groups)
    grads.push_back(packed.narrow(0, g.begin, g.count)
                        .narrow(1, 0, g.k * g.k)
                        .reshape({g.count, 1, g.k, g.k})
                        .to(dtype)
                        .contiguous());
  return grads;
}

}  // namespace mdc
}  // namespace fastseg
