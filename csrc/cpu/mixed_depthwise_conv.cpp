// CPU kernels of mixed_depthwise_conv2d (forward and backward).
//
// Work unit: one H×W plane (sample n, channel c), in parallel over N·C planes. The plane is
// copied into a zero-padded per-thread buffer, then each output row is computed in blocks of BW
// columns whose accumulators stay in vector registers (common/mixed_depthwise_conv.h, shared with
// the CUDA kernels). The same routine with the kernel rotated by 180° gives the input gradient;
// the weight gradient is one dot product per (row block, tap).
//
// Channels-last tensors are computed in their own layout, with no NCHW copy of the tensor (an LMS
// block's forward and backward made five): the work unit is then a block of up to kChannelBlock
// channels of one sample, whose planes are gathered into the padded buffers in one pass over the
// sample's pixels (each pixel's channels are adjacent), computed as above into per-thread planes,
// and written back in one pass (the residual added there). The extension is built for the
// machine it is installed on (-march=native, see setup.py), so these loops use its widest vectors.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/finite.h"
#include "cpu/simd.h"
#include "common/mixed_depthwise_conv.h"
#include "mixed_depthwise_conv.h"
#include "utils.h"
#include "cpu/output_cache.h"

namespace fastseg {
namespace mdc {
namespace {

// Columns per row block: four 512-bit vectors.
template <typename T>
constexpr int kBlock = 256 / sizeof(T);

// Zero-padded copy of an H×W plane: p rows/columns of zeros around it, rows widened to a whole
// number of blocks so every block reads inside the buffer.
template <typename T>
struct PaddedPlane {
  std::vector<T> data;
  int stride = 0, pad = 0;
  // all zeros, sized for an H×W plane and a k×k kernel
  void reset(int H, int W, int k) {
    pad = k / 2;
    const int width = (W + kBlock<T> - 1) / kBlock<T> * kBlock<T>;
    stride = width + 2 * pad;
    data.assign(static_cast<size_t>(H + 2 * pad) * stride, T(0));
  }
  // where the plane's row r starts
  T* row(int r) { return &data[static_cast<size_t>(r + pad) * stride + pad]; }
  const T* row(int r) const { return &data[static_cast<size_t>(r + pad) * stride + pad]; }
  void fill(const T* plane, int H, int W, int k) {
    reset(H, W, k);
    for (int r = 0; r < H; ++r) std::memcpy(row(r), plane + static_cast<int64_t>(r) * W, sizeof(T) * W);
  }
};

// Channels-last: the channels of one block that a task gathers at once (a 64-byte line of
// float32 values per pixel).
constexpr int kChannelBlock = 16;

// planes[i] = channel i of the n ≤ kChannelBlock channels at `sample` (a channels-last [H, W, C]
// image, from the block's first channel), zero-padded for kernel ks[i]: one pass over the
// pixels, each reading its n adjacent values.
template <typename T>
void gather_planes(PaddedPlane<T>* planes, const int* ks, int n, const T* sample, int64_t C, int H,
                   int W) {
  T* rows[kChannelBlock];
  for (int i = 0; i < n; ++i) planes[i].reset(H, W, ks[i]);
  for (int r = 0; r < H; ++r) {
    for (int i = 0; i < n; ++i) rows[i] = planes[i].row(r);
    const T* src = sample + static_cast<int64_t>(r) * W * C;
    int c = 0;
    if constexpr (std::is_same_v<T, float>)
      if (n == kChannelBlock)  // 16 pixels × 16 channels at a time, transposed in registers
        for (; c + 16 <= W; c += 16) {
          simd::Float32x16 v[16];
          for (int p = 0; p < 16; ++p) v[p] = simd::load16(src + (c + p) * C);
          simd::transpose16(v);
          for (int i = 0; i < 16; ++i) simd::store16(rows[i] + c, v[i]);
        }
    for (; c < W; ++c)
      for (int i = 0; i < n; ++i) rows[i][c] = src[c * C + i];
  }
}

// A channels-last task's per-thread buffers: two blocks of padded planes and one of HW-value
// output planes.
template <typename T>
struct BlockBuffers {
  std::vector<PaddedPlane<T>> a, b;
  std::vector<T> out;
  explicit BlockBuffers(int64_t HW) : a(kChannelBlock), b(kChannelBlock), out(kChannelBlock * HW) {}
};

// The channels-last tasks of an [N, C, H, W] tensor, in parallel: task(buffers, s, c0, count)
// for each block of count ≤ kChannelBlock channels from c0 of each sample s (the block's first
// value is at s·HW·C + c0, its first plane s·C + c0).
template <typename T, typename F>
void for_each_channel_block(int64_t N, int64_t C, int64_t HW, F&& task) {
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    BlockBuffers<T> buffers(HW);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c0 = t % blocks * kChannelBlock;
      task(buffers, t / blocks, c0, static_cast<int>(std::min<int64_t>(kChannelBlock, C - c0)));
    }
  });
}

// out[q·C + i] = planes[i·HW + q] (+ addend[q·C + i]) for the HW pixels q of a channels-last
// image and the block's n channels (out and addend from the block's first channel): the block's
// computed planes written back in one pass.
template <typename T>
void scatter_planes(const T* planes, int n, int64_t HW, const T* addend, T* out, int64_t C) {
  int64_t q = 0;
  if constexpr (std::is_same_v<T, float>)
    if (n == kChannelBlock)  // 16 pixels × 16 channels at a time, transposed in registers
      for (; q + 16 <= HW; q += 16) {
        simd::Float32x16 v[16];
        for (int i = 0; i < 16; ++i) v[i] = simd::load16(planes + i * HW + q);
        simd::transpose16(v);
        for (int p = 0; p < 16; ++p) {
          if (addend) v[p] += simd::load16(addend + (q + p) * C);
          simd::store16(out + (q + p) * C, v[p]);
        }
      }
  for (; q < HW; ++q) {
    T* dst = out + q * C;
    if (addend)
      for (int i = 0; i < n; ++i) dst[i] = planes[i * HW + q] + addend[q * C + i];
    else
      for (int i = 0; i < n; ++i) dst[i] = planes[i * HW + q];
  }
}

// out = correlate(padded, kernel) + bias (+ addend) over one plane; `flip` for the input grad.
template <typename T>
FASTSEG_HD void conv_plane(const PaddedPlane<T>& in, const T* kernel, int k, bool flip, T bias,
                           const T* addend, int H, int W, T* out) {
  using A = acc_t<T>;
  constexpr int BW = kBlock<T>;
  for (int r = 0; r < H; ++r) {
    for (int c0 = 0; c0 < W; c0 += BW) {
      A acc[BW];
      for (int t = 0; t < BW; ++t) acc[t] = static_cast<A>(bias);
      conv_row_block<BW>(in.data.data() + static_cast<size_t>(r) * in.stride + c0, in.stride,
                         kernel, k, flip, acc);
      const int n = std::min(BW, W - c0);
      T* dst = out + static_cast<int64_t>(r) * W + c0;
      const T* add = addend ? addend + static_cast<int64_t>(r) * W + c0 : nullptr;
      for (int t = 0; t < n; ++t) dst[t] = static_cast<T>(add ? acc[t] + static_cast<A>(add[t]) : acc[t]);
    }
  }
}

// grad_kernel[i·k + j] = Σ_{r,c} grad_out[r, c] · x[r + i - p, c + j - p]; returns Σ grad_out.
// grad_out's row r starts at grad_out + r·row_stride.
template <typename T>
FASTSEG_HD acc_t<T> weight_grad_plane(const PaddedPlane<T>& x, const T* grad_out, int64_t row_stride,
                                      int k, int H, int W, acc_t<T>* grad_kernel) {
  using A = acc_t<T>;
  constexpr int BW = kBlock<T>;
  A grad_bias = 0;
  T row_block[BW];
  for (int r = 0; r < H; ++r) {
    for (int c0 = 0; c0 < W; c0 += BW) {
      const int n = std::min(BW, W - c0);
      const T* gy = grad_out + static_cast<int64_t>(r) * row_stride + c0;
      if (n < BW) {  // the row's tail: zeros past the image contribute nothing
        std::fill(row_block, row_block + BW, T(0));
        std::copy(gy, gy + n, row_block);
        gy = row_block;
      }
      for (int t = 0; t < BW; ++t) grad_bias += static_cast<A>(gy[t]);
      weight_grad_row_block<BW>(x.data.data() + static_cast<size_t>(r) * x.stride + c0, x.stride,
                                gy, k, grad_kernel);
    }
  }
  return grad_bias;
}

void conv_plane_simd(const PaddedPlane<float>& in, const float* kernel, int k,
                                         bool flip, float bias, const float* addend, int H, int W,
                                         float* out) {
  conv_plane(in, kernel, k, flip, bias, addend, H, W, out);
}
void conv_plane_simd(const PaddedPlane<double>& in, const double* kernel,
                                         int k, bool flip, double bias, const double* addend,
                                         int H, int W, double* out) {
  conv_plane(in, kernel, k, flip, bias, addend, H, W, out);
}
float weight_grad_plane_simd(const PaddedPlane<float>& x, const float* gy, int64_t row_stride, int k,
                             int H, int W, float* grad_kernel) {
  return weight_grad_plane(x, gy, row_stride, k, H, W, grad_kernel);
}
double weight_grad_plane_simd(const PaddedPlane<double>& x, const double* gy, int64_t row_stride,
                              int k, int H, int W, double* grad_kernel) {
  return weight_grad_plane(x, gy, row_stride, k, H, W, grad_kernel);
}

// Per-channel view of the groups: kernel size and pointer to the channel's k×k kernel.
template <typename T>
struct ChannelTable {
  std::vector<int> k;
  std::vector<const T*> kernel;
  explicit ChannelTable(const std::vector<Group>& groups) {
    for (const auto& g : groups)
      for (int64_t c = 0; c < g.count; ++c) {
        k.push_back(g.k);
        kernel.push_back(g.weight.data_ptr<T>() + c * g.k * g.k);
      }
  }
};

void check_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "mixed_depthwise_conv2d (cpu): x must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "mixed_depthwise_conv2d (cpu): x must be float32 or float64, got ", x.scalar_type());
}

at::Tensor forward_cpu(const at::Tensor& x_in, at::TensorList weights,
                       const std::optional<at::Tensor>& bias_in, bool residual) {
  check_cpu(x_in);
  const auto groups = check_and_group(x_in, weights);
  // computed in x's output layout (csrc/utils.h): channels-last or NCHW
  const at::MemoryFormat format = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(format);
  const int64_t N = x.size(0), C = x.size(1);
  const int H = static_cast<int>(x.size(2)), W = static_cast<int>(x.size(3));
  at::Tensor y = cpu::empty_output(x.sizes(), x.options(), format);
  at::Tensor bias;
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->numel() == C, "mixed_depthwise_conv2d: bias must have C=", C, " entries");
    bias = bias_in->contiguous();
  }
  std::atomic<bool> non_finite{false};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mixed_depthwise_conv2d_cpu", [&] {
    const ChannelTable<scalar_t> table(groups);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t plane = static_cast<int64_t>(H) * W;
    if (format == at::MemoryFormat::ChannelsLast) {
      for_each_channel_block<scalar_t>(N, C, plane, [&](BlockBuffers<scalar_t>& buf, int64_t sample,
                                                        int64_t c0, int n) {
        const int64_t start = sample * plane * C + c0;
        gather_planes(buf.a.data(), &table.k[c0], n, xp + start, C, H, W);
        for (int i = 0; i < n; ++i) {
          // the plane as copied (its zero border adds nothing)
          if (!all_finite(buf.a[i].data.data(), static_cast<int64_t>(buf.a[i].data.size())))
            non_finite = true;
          conv_plane_simd(buf.a[i], table.kernel[c0 + i], table.k[c0 + i], false,
                          bp ? bp[c0 + i] : scalar_t(0), nullptr, H, W, buf.out.data() + i * plane);
        }
        scatter_planes(buf.out.data(), n, plane, residual ? xp + start : nullptr, yp + start, C);
      });
      return;
    }
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      PaddedPlane<scalar_t> padded;
      for (int64_t nc = begin; nc < end; ++nc) {
        const int64_t c = nc % C;
        padded.fill(xp + nc * plane, H, W, table.k[c]);
        if (!all_finite(xp + nc * plane, plane)) non_finite = true;
        conv_plane_simd(padded, table.kernel[c], table.k[c], false, bp ? bp[c] : scalar_t(0),
                        residual ? xp + nc * plane : nullptr, H, W, yp + nc * plane);
      }
    });
  });
  TORCH_CHECK_VALUE(!non_finite, "mixed_depthwise_conv2d: x contains NaN or inf");
  return y;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, at::TensorList weights, bool residual) {
  check_cpu(x_in);
  const auto groups = check_and_group(x_in, weights);
  TORCH_CHECK(grad_out_in.sizes() == x_in.sizes() && grad_out_in.scalar_type() == x_in.scalar_type(),
              "mixed_depthwise_conv2d_backward: grad_out must match x in shape and dtype");
  // computed in x's output layout (csrc/utils.h); grad_out is brought to it
  const at::MemoryFormat format = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(format);
  const at::Tensor gy = grad_out_in.contiguous(format);
  const int64_t N = x.size(0), C = x.size(1);
  const int H = static_cast<int>(x.size(2)), W = static_cast<int>(x.size(3));
  const int kmax = [&] { int m = 0; for (const auto& g : groups) m = imax(m, g.k); return m; }();
  at::Tensor gx = cpu::empty_output(x.sizes(), x.options(), format);
  // Per-plane partial weight/bias gradients, reduced over the batch afterwards: deterministic.
  auto acc_dtype = x.scalar_type();
  at::Tensor gk_partial = at::zeros({N, C, kmax * kmax}, x.options().dtype(acc_dtype));
  at::Tensor gb_partial = at::empty({N, C}, x.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mixed_depthwise_conv2d_backward_cpu", [&] {
    const ChannelTable<scalar_t> table(groups);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gyp = gy.data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    scalar_t* gkp = gk_partial.data_ptr<scalar_t>();
    scalar_t* gbp = gb_partial.data_ptr<scalar_t>();
    const int64_t plane = static_cast<int64_t>(H) * W;
    if (format == at::MemoryFormat::ChannelsLast) {
      // buffers: a the planes of grad_out, b those of x
      for_each_channel_block<scalar_t>(N, C, plane, [&](BlockBuffers<scalar_t>& buf, int64_t sample,
                                                        int64_t c0, int n) {
        const int64_t start = sample * plane * C + c0, nc0 = sample * C + c0;  // first value, plane
        gather_planes(buf.a.data(), &table.k[c0], n, gyp + start, C, H, W);
        gather_planes(buf.b.data(), &table.k[c0], n, xp + start, C, H, W);
        for (int i = 0; i < n; ++i) {
          const int k = table.k[c0 + i];
          conv_plane_simd(buf.a[i], table.kernel[c0 + i], k, true, scalar_t(0), nullptr, H, W,
                          buf.out.data() + i * plane);
          gbp[nc0 + i] = weight_grad_plane_simd(buf.b[i], buf.a[i].row(0), buf.a[i].stride, k, H, W,
                                                gkp + (nc0 + i) * kmax * kmax);
        }
        scatter_planes(buf.out.data(), n, plane, residual ? gyp + start : nullptr, gxp + start, C);
      });
      return;
    }
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      PaddedPlane<scalar_t> padded;
      for (int64_t nc = begin; nc < end; ++nc) {
        const int64_t c = nc % C;
        const int k = table.k[c];
        padded.fill(gyp + nc * plane, H, W, k);
        conv_plane_simd(padded, table.kernel[c], k, true, scalar_t(0),
                        residual ? gyp + nc * plane : nullptr, H, W, gxp + nc * plane);
        padded.fill(xp + nc * plane, H, W, k);
        gbp[nc] = weight_grad_plane_simd(padded, gyp + nc * plane, W, k, H, W, gkp + nc * kmax * kmax);
      }
    });
  });
  return {gx, split_weight_grads(gk_partial.sum(0), groups, x.scalar_type()),
          gb_partial.sum(0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("mixed_depthwise_conv2d", &forward_cpu);
  m.impl("mixed_depthwise_conv2d_backward", &backward_cpu);
}

}  // namespace mdc
}  // namespace fastseg
