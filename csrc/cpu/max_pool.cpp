// 2×2 max pooling with stride 2 (F.max_pool2d(x, 2)) on NCHW tensors, CPU (fastseg/ops/pool.py).
//
// ATen's NCHW max_pool2d walks each window with a generic loop (batch 1, 16 channels at 256²:
// 4.7 ms forward; this kernel 0.2 ms). Here the forward keeps, per output value, which of the four
// window positions won (one byte: 0 = (0, 0), 1 = (0, 1), 2 = (1, 0), 3 = (1, 1)), chosen as ATen
// chooses it: the first maximum in that order, and a NaN wins over numbers (the last NaN if
// several). Windows do not overlap, so the backward writes every input position once: the output
// gradient where it won, 0 elsewhere (an odd last row or column, outside every window, gets 0).
// Channels-last tensors take ATen's kernel, which is fast in that layout.
//
// The loop over a row's outputs reads every other value; GCC vectorises it only from 32 outputs
// a row on, and shorter rows ran its scalar remainder, with a branch per window position (8×64×32²:
// 1.1 ms forward against 0.16 ms at 8×32×64², the same number of rows of twice the length).
// Rows shorter than kShortRow therefore go through per-thread block buffers: a block's top and
// bottom input rows are copied one after another, and one flat loop runs over the whole block
// (8×64×32²: 0.09 ms forward; the backward likewise, 0.14–0.17 ms).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu/output_cache.h"

namespace fastseg {
namespace pool {
namespace {

// which of a, b, c, d (window order) max_pool2d picks, and its value
template <typename T>
inline void pick(T a, T b, T c, T d, T& m, uint8_t& k) {
  m = a;
  k = 0;
  if (b > m || b != b) { m = b; k = 1; }
  if (c > m || c != c) { m = c; k = 2; }
  if (d > m || d != d) { m = d; k = 3; }
}

constexpr int64_t kShortRow = 32;         // output rows shorter than this take the block buffers
constexpr int64_t kBlockOutputs = 1024;  // outputs per block of short rows

// The window's input rows 2·oh and 2·oh + 1 of output row r (over all planes): the top one's start.
template <typename T>
inline T* top_row(T* xs, int64_t r, int64_t OH, int64_t H, int64_t W) {
  return xs + ((r / OH) * H + 2 * (r % OH)) * W;
}

// Short rows (OW < kShortRow) in blocks of kBlockOutputs / OW output rows, blocks in parallel:
// f(r0, count, top, bottom) for output rows [r0, r0 + count), with per-thread buffers of
// 2·kBlockOutputs values for their top and bottom input rows (2·OW values a row, back to back).
template <typename T, typename F>
void for_each_short_block(int64_t rows, int64_t OW, F&& f) {
  const int64_t block = kBlockOutputs / OW;
  at::parallel_for(0, at::divup(rows, block), 1, [&](int64_t begin, int64_t end) {
    alignas(64) T top[2 * kBlockOutputs], bottom[2 * kBlockOutputs];
    for (int64_t b = begin; b < end; ++b)
      f(b * block, std::min(block, rows - b * block), top, bottom);
  });
}

// Short rows: a block's top and bottom input rows gathered into the buffers, then one flat loop.
template <typename T>
void forward_short(const T* xs, T* ys, uint8_t* ks, int64_t rows, int64_t H, int64_t W) {
  const int64_t OH = H / 2, OW = W / 2;
  for_each_short_block<T>(rows, OW, [&](int64_t r0, int64_t count, T* top, T* bottom) {
    const int64_t n = count * OW;
    for (int64_t i = 0; i < count; ++i) {
      const T* src = top_row(xs, r0 + i, OH, H, W);
      std::copy(src, src + 2 * OW, top + i * 2 * OW);
      std::copy(src + W, src + W + 2 * OW, bottom + i * 2 * OW);
    }
    T* out = ys + r0 * OW;
    uint8_t* k = ks + r0 * OW;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j)
      pick(top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1], out[j], k[j]);
  });
}

// one output row per task: input rows 2·oh and 2·oh + 1 of its plane
template <typename T>
void forward_kernel(const T* xs, T* ys, uint8_t* ks, int64_t planes, int64_t H, int64_t W) {
  const int64_t OH = H / 2, OW = W / 2;
  if (OW < kShortRow) return forward_short(xs, ys, ks, planes * OH, H, W);
  at::parallel_for(0, planes * OH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* top = top_row(xs, r, OH, H, W);
      const T* bottom = top + W;
      T* out = ys + r * OW;
      uint8_t* k = ks + r * OW;
#pragma omp simd
      for (int64_t ow = 0; ow < OW; ++ow)
        pick(top[2 * ow], top[2 * ow + 1], bottom[2 * ow], bottom[2 * ow + 1], out[ow], k[ow]);
    }
  });
}

// Short rows: a block of output rows' gradients spread into `top` and `bottom` by one flat loop,
// then copied to their input rows (with the odd last column, and the odd last row of a plane, 0).
template <typename T>
void backward_short(const T* gs, const uint8_t* ks, T* gx, int64_t rows, int64_t H, int64_t W) {
  const int64_t OH = H / 2, OW = W / 2;
  for_each_short_block<T>(rows, OW, [&](int64_t r0, int64_t count, T* top, T* bottom) {
    const int64_t n = count * OW;
    const T* g = gs + r0 * OW;
    const uint8_t* k = ks + r0 * OW;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {  // (read once into locals: GCC then vectorises it)
      const T v = g[j];
      const uint8_t kj = k[j];
      top[2 * j] = kj == 0 ? v : T(0);
      top[2 * j + 1] = kj == 1 ? v : T(0);
      bottom[2 * j] = kj == 2 ? v : T(0);
      bottom[2 * j + 1] = kj == 3 ? v : T(0);
    }
    for (int64_t i = 0; i < count; ++i) {
      const int64_t r = r0 + i;
      T* dst = top_row(gx, r, OH, H, W);
      std::copy(top + i * 2 * OW, top + (i + 1) * 2 * OW, dst);
      std::copy(bottom + i * 2 * OW, bottom + (i + 1) * 2 * OW, dst + W);
      if (W % 2) dst[W - 1] = dst[2 * W - 1] = T(0);
      if (H % 2 && r % OH == OH - 1) std::fill(dst + 2 * W, dst + 3 * W, T(0));
    }
  });
}

// one input row per task
template <typename T>
void backward_kernel(const T* gs, const uint8_t* ks, T* gx, int64_t planes, int64_t H, int64_t W) {
  const int64_t OH = H / 2, OW = W / 2;
  if (OW < kShortRow) return backward_short(gs, ks, gx, planes * OH, H, W);
  at::parallel_for(0, planes * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t plane = r / H, h = r % H, oh = h / 2;
      T* row = gx + r * W;
      if (oh >= OH) {  // the odd last row
        std::fill(row, row + W, T(0));
        continue;
      }
      const uint8_t left = uint8_t(2 * (h % 2)), right = uint8_t(left + 1);
      const T* gr = gs + (plane * OH + oh) * OW;
      const uint8_t* k = ks + (plane * OH + oh) * OW;
#pragma omp simd
      for (int64_t ow = 0; ow < OW; ++ow) {
        row[2 * ow] = k[ow] == left ? gr[ow] : T(0);
        row[2 * ow + 1] = k[ow] == right ? gr[ow] : T(0);
      }
      std::fill(row + 2 * OW, row + W, T(0));  // the odd last column
    }
  });
}

// (y [N, C, H/2, W/2], index (uint8, y's shape)), NCHW-contiguous
std::tuple<at::Tensor, at::Tensor> max_pool2x2_cpu(const at::Tensor& x_in) {
  TORCH_CHECK_VALUE(x_in.dim() == 4, "max_pool2x2: x must be [N, C, H, W], got ", x_in.sizes());
  TORCH_CHECK_VALUE(x_in.size(2) >= 2 && x_in.size(3) >= 2,
                    "max_pool2x2: H and W must be at least 2, got x ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor y = cpu::empty_output({N, C, H / 2, W / 2}, x.options());
  at::Tensor index = cpu::empty_output({N, C, H / 2, W / 2}, x.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "max_pool2x2_cpu", [&] {
    forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                             index.data_ptr<uint8_t>(), N * C, H, W);
  });
  return {y, index};
}

// grad_x [N, C, H, W] = x_size (NCHW) from grad_y and the forward's index
at::Tensor max_pool2x2_backward_cpu(const at::Tensor& grad_in, const at::Tensor& index_in,
                                    at::IntArrayRef x_size) {
  TORCH_CHECK_VALUE(x_size.size() == 4, "max_pool2x2_backward: x_size must have 4 entries");
  const int64_t N = x_size[0], C = x_size[1], H = x_size[2], W = x_size[3];
  TORCH_CHECK_VALUE(grad_in.dim() == 4 && grad_in.size(0) == N && grad_in.size(1) == C &&
                        grad_in.size(2) == H / 2 && grad_in.size(3) == W / 2,
                    "max_pool2x2_backward: grad_out must be [", N, ", ", C, ", ", H / 2, ", ",
                    W / 2, "], got ", grad_in.sizes());
  TORCH_CHECK_VALUE(index_in.sizes() == grad_in.sizes() && index_in.scalar_type() == at::kByte,
                    "max_pool2x2_backward: index must be uint8 of grad_out's shape");
  const at::Tensor g = grad_in.contiguous(), index = index_in.contiguous();
  at::Tensor grad_x = cpu::empty_output(x_size, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "max_pool2x2_backward_cpu", [&] {
    backward_kernel<scalar_t>(g.data_ptr<scalar_t>(), index.data_ptr<uint8_t>(),
                              grad_x.data_ptr<scalar_t>(), N * C, H, W);
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("max_pool2x2", &max_pool2x2_cpu);
  m.impl("max_pool2x2_backward", &max_pool2x2_backward_cpu);
}

}  // namespace pool
}  // namespace fastseg
