// CPU kernels of the attention gates (forward and backward).
//
// Every gate is bandwidth-bound, so each kernel streams its large tensors once or twice and keeps
// intermediates in cache-sized pieces:
// * spatial_gate: blocks of pixels of one sample, ≈ 512 KB over all channels (pixel_block); the
//   per-pixel gate is reduced over the channels, then applied while the block is still in cache.
// * gated_pointwise: tasks of one sample's block of pixels, the 1×1 projections register-blocked
//   (pointwise::product) into a per-thread scratch of the block, gated from there; the backward
//   also computes the input gradient from the block's stacked gradients while they are in cache
//   (the same product with the transposed weights) and leaves the weight gradient, a sum over
//   the pixels, to one BLAS product per sample. attention_gate: tasks of one sample's block of
//   pixels, the projections by BLAS into a per-thread scratch of one block, the gating and (in the
//   backward) the products with the projections' gradient on the block while it is in L2. Below
//   8 channels on either side of the product, both run on blocks of kProjBlock pixels with the
//   projections in registers instead. Both backwards recompute the projections instead of
//   storing them.
// * channel_gate: one (n, c) plane at a time. The global average of the (upsampled) plane is a
//   weighted sum of the input plane (the resize is linear), so pass 1 reads only x; pass 2
//   writes up(x)·gate + skip once (an ×2 upsample resizes each input row horizontally once and
//   blends two such rows per output row). Backward: pass A applies the resize's adjoint to
//   grad_out (into grad_x; an ×2 upsample sums four output rows per input row first, then runs
//   the horizontal adjoint once per input row) and dots it with x; pass B rescales grad_x in
//   place.
// * cross_gate: one plane at a time, in bands of output rows (cross_gate_band): b resized into
//   an L1-sized band, then the gate applied to the band in one vectorised pass.
// Per-block (or per-task) partial sums of the weight gradients are reduced afterwards in a fixed
// order, so the results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/finite.h"
#include "attention_gates.h"
#include "cpu/blas.h"
#include "cpu/pointwise.h"
#include "cpu/simd.h"
#include "common/attention_gates.h"
#include "utils.h"
#include "cpu/output_cache.h"

namespace fastseg {
namespace gates {
namespace {

// Pixels per block of a pass that reads `tensors` [rows, HW] slices of one sample, each row at a
// stride of HW: about kBlockBytes in all, so that a second pass over the block finds it in L2, in
// multiples of 64 pixels and at least 256 where the image has them, so that every row is a run
// of ≥ 1 KB the hardware prefetcher follows (blocks of 64 pixels, 4 cache lines per row at a
// 16 KB stride, ran spatial_gate at 18 % of the bandwidth floor).
constexpr int64_t kBlockBytes = 512 * 1024;
int64_t pixel_block(int64_t rows, int64_t HW, int tensors, int64_t bytes_per_value) {
  int64_t len = kBlockBytes / std::max<int64_t>(1, rows * tensors * bytes_per_value);
  len = std::max<int64_t>(256, len / 64 * 64);
  return std::min(len, HW);
}

void check_cpu(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), op, " (cpu): inputs must be CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              " (cpu): inputs must be float32 or float64, got ", x.scalar_type());
}

// --- spatial_gate ------------------------------------------------------------------------------

at::Tensor spatial_gate_cpu(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& b_in) {
  constexpr const char* op = "spatial_gate";
  check_cpu(op, x_in);
  check_feature(op, "x", x_in, x_in);
  check_matrix(op, "w", w_in, 1, x_in.size(1), x_in);
  check_vector(op, "b", b_in, 1, x_in);
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor y = cpu::empty_output(x.sizes(), x.options());
  std::atomic<bool> non_finite{false};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spatial_gate_cpu", [&] {
    using T = scalar_t;
    const int64_t BW = pixel_block(C, HW, 1, sizeof(T));
    const T *xp = x.data_ptr<T>(), *wp = w.data_ptr<T>(), bias = b_in.item<T>();
    T* yp = y.data_ptr<T>();
    const int64_t blocks = (HW + BW - 1) / BW;
    at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> gate(BW);
      T* s = gate.data();
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / blocks, p0 = task % blocks * BW;
        const int len = static_cast<int>(std::min<int64_t>(BW, HW - p0));
        const T* xs = xp + n * C * HW + p0;
        T* ys = yp + n * C * HW + p0;
        for (int t = 0; t < len; ++t) s[t] = bias;
        for (int64_t c = 0; c < C; ++c) {
          const T* xc = xs + c * HW;
          const T wc = wp[c];
_Pragma("omp simd")
          for (int t = 0; t < len; ++t) s[t] += wc * xc[t];
        }
_Pragma("omp simd")
        for (int t = 0; t < len; ++t) s[t] = sigmoid(s[t]);
        // The NaN/inf check on the second read (from cache): Σ x·0 is 0 exactly when every x is
        // finite, and a plain sum vectorises where a short-circuit `&&` reduction did not.
        T check = 0;
        for (int64_t c = 0; c < C; ++c) {
          const T* xc = xs + c * HW;
          T* yc = ys + c * HW;
_Pragma("omp simd reduction(+ : check)")
          for (int t = 0; t < len; ++t) {
            yc[t] = xc[t] * s[t];
            check += xc[t] * T(0);
          }
        }
        if (check != T(0)) non_finite = true;
      }
    });
  });
  TORCH_CHECK_VALUE(!non_finite, "spatial_gate: x contains NaN or inf");
  return to_output_layout(y, x_in);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_gate_backward_cpu(
    const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& b_in) {
  constexpr const char* op = "spatial_gate_backward";
  check_cpu(op, x_in);
  check_feature(op, "grad_out", gy_in, x_in);
  TORCH_CHECK(gy_in.sizes() == x_in.sizes(), op, ": grad_out must have x's shape");
  const at::Tensor x = x_in.contiguous(), gy = gy_in.contiguous(), w = w_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor gx = cpu::empty_output(x.sizes(), x.options());
  at::Tensor partial;  // [tasks, C + 1]: Σ gz·x per channel, then Σ gz
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spatial_gate_backward_cpu", [&] {
    using T = scalar_t;
    const int64_t BW = pixel_block(C, HW, 2, sizeof(T));
    const T *xp = x.data_ptr<T>(), *gyp = gy.data_ptr<T>(), *wp = w.data_ptr<T>();
    const T bias = b_in.item<T>();
    T* gxp = gx.data_ptr<T>();
    const int64_t blocks = (HW + BW - 1) / BW;
    partial = at::empty({N * blocks, C + 1}, x.options());
    T* pp = partial.data_ptr<T>();
    at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> scratch(2 * BW);
      T *s = scratch.data(), *gz = s + BW;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / blocks, p0 = task % blocks * BW;
        const int len = static_cast<int>(std::min<int64_t>(BW, HW - p0));
        const int64_t base = n * C * HW + p0;
        for (int t = 0; t < len; ++t) s[t] = bias, gz[t] = 0;
        for (int64_t c = 0; c < C; ++c) {
          const T *xc = xp + base + c * HW, *gc = gyp + base + c * HW;
          const T wc = wp[c];
_Pragma("omp simd")
          for (int t = 0; t < len; ++t) {
            s[t] += wc * xc[t];
            gz[t] += gc[t] * xc[t];  // Σ_c grad_y·x: the gradient of the gate value
          }
        }
        T* part = pp + task * (C + 1);
        T gb = 0;
_Pragma("omp simd reduction(+ : gb)")
        for (int t = 0; t < len; ++t) {
          s[t] = sigmoid(s[t]);
          gz[t] *= s[t] * (T(1) - s[t]);
          gb += gz[t];
        }
        part[C] = gb;
        for (int64_t c = 0; c < C; ++c) {
          const T *xc = xp + base + c * HW, *gc = gyp + base + c * HW;
          T* gxc = gxp + base + c * HW;
          const T wc = wp[c];
          T gw = 0;
_Pragma("omp simd reduction(+ : gw)")
          for (int t = 0; t < len; ++t) {
            gxc[t] = gc[t] * s[t] + gz[t] * wc;
            gw += gz[t] * xc[t];
          }
          part[c] = gw;
        }
      }
    });
  });
  const at::Tensor sums = partial.sum(0);
  // Separate tensors: outputs of an op may not alias each other.
  return {to_output_layout(gx, x_in), sums.narrow(0, 0, C).view({1, C}).clone(),
          sums.narrow(0, C, 1).clone()};
}

// --- 1×1 projections of few channels: register-blocked loops ------------------------------------
//
// Blocks of kProjBlock pixels of one sample; a 1×1 projection of a block is, per output channel,
// a sum over input channels of a weight times a contiguous row of the block, kept in vector
// registers; no scratch tensor. Weight gradients are per-task partial sums (tasks of
// kTaskPixels pixels), reduced afterwards.

// Pixels per projection block: 32 float32 (16 float64) accumulators, four 256-bit registers.
template <typename T>
constexpr int kProjBlock = 128 / sizeof(T);
constexpr int64_t kTaskPixels = 1024;

// 256-bit vectors of T (GCC vector extensions): a whole block's accumulators are explicitly four
// such variables, so they stay in registers across the channel loop.
template <typename T>
using Vec __attribute__((vector_size(32))) = T;
template <typename T>
using UnalignedVec __attribute__((vector_size(32), aligned(sizeof(T)))) = T;
template <typename T>
constexpr int kLanes = 32 / sizeof(T);
static_assert(kProjBlock<float> == 4 * kLanes<float> && kProjBlock<double> == 4 * kLanes<double>);

template <typename T>
inline Vec<T> load_vec(const T* p) { return *reinterpret_cast<const UnalignedVec<T>*>(p); }
template <typename T>
inline void store_vec(T* p, Vec<T> v) { *reinterpret_cast<UnalignedVec<T>*>(p) = v; }

// acc[t] += Σ_c w[c] · in[c·HW + t], t < m (a whole block in registers, a partial one in memory).
template <typename T>
void project_add(const T* in, int64_t HW, int64_t C, const T* w, int m, T* acc) {
  constexpr int L = kLanes<T>;
  if (m == kProjBlock<T>) {
    Vec<T> r0 = load_vec<T>(acc), r1 = load_vec<T>(acc + L), r2 = load_vec<T>(acc + 2 * L), r3 = load_vec<T>(acc + 3 * L);
    for (int64_t c = 0; c < C; ++c) {
      const T* row = in + c * HW;
      const T wc = w[c];
      r0 += wc * load_vec<T>(row), r1 += wc * load_vec<T>(row + L), r2 += wc * load_vec<T>(row + 2 * L),
          r3 += wc * load_vec<T>(row + 3 * L);
    }
    store_vec<T>(acc, r0), store_vec<T>(acc + L, r1), store_vec<T>(acc + 2 * L, r2), store_vec<T>(acc + 3 * L, r3);
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    const T* row = in + c * HW;
    const T wc = w[c];
    _Pragma("omp simd")
    for (int t = 0; t < m; ++t) acc[t] += wc * row[t];
  }
}

// Two projections of the same block at once (each row read once): acc0 += w0·in, acc1 += w1·in.
template <typename T>
void project2_add(const T* in, int64_t HW, int64_t C, const T* w0, const T* w1, int m, T* acc0,
                  T* acc1) {
  constexpr int L = kLanes<T>;
  if (m != kProjBlock<T>) {
    project_add(in, HW, C, w0, m, acc0);
    project_add(in, HW, C, w1, m, acc1);
    return;
  }
  Vec<T> a0 = load_vec<T>(acc0), a1 = load_vec<T>(acc0 + L), a2 = load_vec<T>(acc0 + 2 * L), a3 = load_vec<T>(acc0 + 3 * L);
  Vec<T> b0 = load_vec<T>(acc1), b1 = load_vec<T>(acc1 + L), b2 = load_vec<T>(acc1 + 2 * L), b3 = load_vec<T>(acc1 + 3 * L);
  for (int64_t c = 0; c < C; ++c) {
    const T* row = in + c * HW;
    const Vec<T> x0 = load_vec<T>(row), x1 = load_vec<T>(row + L), x2 = load_vec<T>(row + 2 * L), x3 = load_vec<T>(row + 3 * L);
    const T u = w0[c], v = w1[c];
    a0 += u * x0, a1 += u * x1, a2 += u * x2, a3 += u * x3;
    b0 += v * x0, b1 += v * x1, b2 += v * x2, b3 += v * x3;
  }
  store_vec<T>(acc0, a0), store_vec<T>(acc0 + L, a1), store_vec<T>(acc0 + 2 * L, a2), store_vec<T>(acc0 + 3 * L, a3);
  store_vec<T>(acc1, b0), store_vec<T>(acc1 + L, b1), store_vec<T>(acc1 + 2 * L, b2), store_vec<T>(acc1 + 3 * L, b3);
}

template <typename T>
FASTSEG_HD T dot(const T* a, const T* b, int m) {
  T acc = 0;
  _Pragma("omp simd reduction(+ : acc)")
  for (int t = 0; t < m; ++t) acc += a[t] * b[t];
  return acc;
}

template <typename T>
FASTSEG_HD T block_sum(const T* a, int m) {
  T acc = 0;
  _Pragma("omp simd reduction(+ : acc)")
  for (int t = 0; t < m; ++t) acc += a[t];
  return acc;
}

// Calls fn(n, p0, m, task) for every block of every task, tasks in parallel.
template <typename F>
void for_pixel_blocks(int64_t N, int64_t HW, int block, const F& fn) {
  const int64_t per_sample = (HW + kTaskPixels - 1) / kTaskPixels;
  at::parallel_for(0, N * per_sample, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / per_sample, q0 = task % per_sample * kTaskPixels;
      const int64_t q1 = std::min(HW, q0 + kTaskPixels);
      for (int64_t p0 = q0; p0 < q1; p0 += block)
        fn(n, p0, static_cast<int>(std::min<int64_t>(block, q1 - p0)), task);
    }
  });
}

int64_t pixel_tasks(int64_t N, int64_t HW) { return N * ((HW + kTaskPixels - 1) / kTaskPixels); }

// --- 1×1 projections through ATen's GEMM -----------------------------------------------------------
//
// With a few channels on each side the products are cheap and the register-blocked loops below
// win (BLAS runs such degenerate shapes at a fraction of its speed: LightAWNet's first block,
// 4 → 2·1 + 1 rows, spent 59 ms in 64 `mm` calls on 0.35 MB operands). From kGemmChannels on,
// BLAS wins (one thread, min of 7: gated_pointwise 8×64×128² → 16 forward 10.7 against 26.9 ms,
// backward 42.8 against 165; attention_gate 8×16×256², C_i = 8, 37 against 62 and 101 against
// 174): per sample, one product of the stacked weights into a scratch of one sample's rows, the
// gating fused around it, the backward recomputing the product (attention_gate runs these
// products on blocks of pixels, see attention_gate_blocked).
// gated_pointwise runs its products register-blocked on blocks of pixels instead
// (pointwise::product; side by side with the per-sample BLAS products in one process, alternating
// rounds: forward 1.1–2.4× faster at LightAWNet's batch-1 shapes, 1.3–1.8× at batch 8; forward +
// backward 1.14–1.55× at batch 8).

// Whether the GEMM path runs: at least kGemmChannels channels on both sides of the product.
constexpr int64_t kGemmChannels = 8;
bool use_gemm(int64_t c_in, int64_t rows) { return c_in >= kGemmChannels && rows >= kGemmChannels; }

// [C, HW] view of sample n of an NCHW-contiguous tensor.
at::Tensor sample_matrix(const at::Tensor& t, int64_t n) {
  return t.select(0, n).view({t.size(1), -1});
}

at::Tensor gated_pointwise_gemm(const at::Tensor& a_in, const at::Tensor& w_s, const at::Tensor& b_s,
                               const at::Tensor& w_a, const at::Tensor& w_b, const at::Tensor& bias_in) {
  constexpr const char* op = "gated_pointwise";
  check_cpu(op, a_in);
  check_gated_pointwise(op, a_in, w_s, b_s, w_a, w_b);
  const int64_t N = a_in.size(0), C_out = w_a.size(0), H = a_in.size(2), W = a_in.size(3), HW = H * W;
  check_vector(op, "bias", bias_in, C_out, a_in);
  const at::Tensor a = a_in.contiguous(), bias = bias_in.contiguous();
  const at::Tensor weight = stacked_weight(w_s, w_a, w_b);
  const int64_t rows = 2 * C_out + 1;
  at::Tensor y = cpu::empty_output({N, C_out, H, W}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "gated_pointwise_cpu", [&] {
    using T = scalar_t;
    const int64_t C_in = a.size(1);
    const std::vector<T> packed =
        pointwise::pack_weights<T>(weight.data_ptr<T>(), C_in, 1, rows, C_in);
    const int64_t B = pointwise::block_pixels<T>(C_in, HW);
    const int64_t blocks = (HW + B - 1) / B;
    const T *ap = a.data_ptr<T>(), *bp = bias.data_ptr<T>(), b_att = b_s.item<T>();
    T* yp = y.data_ptr<T>();
    // Tasks: one block of one sample's pixels; its [W_a·a; W_b·a; w_s·a] into a per-thread
    // scratch of the block, gated from there while it is in cache.
    at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
      pointwise::Panel<T> panel;
      std::vector<T> scratch(rows * B);
      T* pp = scratch.data();
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / blocks, q0 = task % blocks * B;
        const int m = static_cast<int>(std::min(B, HW - q0));
        pointwise::product<T>(ap + n * C_in * HW + q0, HW, C_in, packed.data(), rows, nullptr, pp,
                              B, m, panel);
        T* s = pp + 2 * C_out * B;  // the gate's logits, turned into the gate in place
_Pragma("omp simd")
        for (int t = 0; t < m; ++t) s[t] = sigmoid(s[t] + b_att);
        for (int64_t o = 0; o < C_out; ++o) {
          const T *u = pp + o * B, *v = pp + (C_out + o) * B;
          T* yo = yp + (n * C_out + o) * HW + q0;
          const T bo = bp[o];
_Pragma("omp simd")
          for (int t = 0; t < m; ++t) yo[t] = u[t] + s[t] * v[t] + bo;
        }
      }
    });
  });
  return to_output_layout(y, a_in);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_pointwise_backward_gemm(const at::Tensor& gy_in, const at::Tensor& a_in, const at::Tensor& w_s,
                             const at::Tensor& b_s, const at::Tensor& w_a, const at::Tensor& w_b) {
  constexpr const char* op = "gated_pointwise_backward";
  check_cpu(op, a_in);
  check_gated_pointwise(op, a_in, w_s, b_s, w_a, w_b);
  const int64_t N = a_in.size(0), C_in = a_in.size(1), C_out = w_a.size(0);
  const int64_t HW = a_in.size(2) * a_in.size(3), rows = 2 * C_out + 1;
  check_feature(op, "grad_out", gy_in, a_in);
  TORCH_CHECK(gy_in.size(0) == N && gy_in.size(1) == C_out && gy_in.size(2) * gy_in.size(3) == HW,
              op, ": grad_out must be [N, C_out, H, W]");
  const at::Tensor a = a_in.contiguous(), gy = gy_in.contiguous();
  const at::Tensor weight = stacked_weight(w_s, w_a, w_b);
  at::Tensor ga = cpu::empty_output(a.sizes(), a.options());
  at::Tensor gw = at::zeros({rows, C_in}, a.options());       // d/d[W_a; W_b; w_s]
  at::Tensor gbias = at::zeros({rows}, a.options());          // Σ over pixels of the stacked grads
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "gated_pointwise_backward_cpu", [&] {
    using T = scalar_t;
    // [W_a; W_b; w_s] and its transpose, packed for pointwise::product
    const T* wp = weight.data_ptr<T>();
    const std::vector<T> packed = pointwise::pack_weights<T>(wp, C_in, 1, rows, C_in);
    const std::vector<T> packed_t = pointwise::pack_weights<T>(wp, 1, C_in, C_in, rows);
    const int64_t B = pointwise::block_pixels<T>(std::max(C_in, rows), HW);
    const int64_t blocks = (HW + B - 1) / B;
    at::Tensor grad = at::empty({rows, HW}, a.options());  // one sample's stacked gradients
    const T *ap = a.data_ptr<T>(), b_att = b_s.item<T>();
    T *gp = grad.data_ptr<T>(), *gap = ga.data_ptr<T>();
    for (int64_t n = 0; n < N; ++n) {
      const T* gyp = gy.data_ptr<T>() + n * C_out * HW;
      // Per block: the products again, the stacked gradients [grad_y; s·grad_y; d logit] into
      // `grad`, and grad_a = [W_a; W_b; w_s]ᵀ · grad while the block is in cache.
      at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        pointwise::Panel<T> panel;
        std::vector<T> scratch((rows + 1) * B);
        T *pp = scratch.data(), *gs = pp + rows * B;
        for (int64_t blk = begin; blk < end; ++blk) {
          const int64_t q0 = blk * B;
          const int m = static_cast<int>(std::min(B, HW - q0));
          pointwise::product<T>(ap + n * C_in * HW + q0, HW, C_in, packed.data(), rows, nullptr,
                                pp, B, m, panel);
          T* s = pp + 2 * C_out * B;  // the logits, turned into the gate in place
_Pragma("omp simd")
          for (int t = 0; t < m; ++t) s[t] = sigmoid(s[t] + b_att), gs[t] = 0;
          for (int64_t o = 0; o < C_out; ++o) {
            const T *v = pp + (C_out + o) * B, *g = gyp + o * HW + q0;
            T *gu = gp + o * HW + q0, *gv = gp + (C_out + o) * HW + q0;
_Pragma("omp simd")
            for (int t = 0; t < m; ++t) {
              gu[t] = g[t];
              gv[t] = s[t] * g[t];
              gs[t] += g[t] * v[t];
            }
          }
          T* gl = gp + 2 * C_out * HW + q0;
_Pragma("omp simd")
          for (int t = 0; t < m; ++t) gl[t] = gs[t] * s[t] * (T(1) - s[t]);
          pointwise::product<T>(gp + q0, HW, rows, packed_t.data(), C_in, nullptr,
                                gap + n * C_in * HW + q0, HW, m, panel);
        }
      });
      gw.addmm_(grad, sample_matrix(a, n).t());
      gbias.add_(grad.sum(1));
    }
  });
  return {to_output_layout(ga, a_in), gw.narrow(0, 2 * C_out, 1).clone(),
          gbias.narrow(0, 2 * C_out, 1).clone(), gw.narrow(0, 0, C_out).clone(),
          gw.narrow(0, C_out, C_out).clone(), gbias.narrow(0, 0, C_out).clone()};
}

at::Tensor gated_pointwise_cpu(const at::Tensor& a_in, const at::Tensor& w_s, const at::Tensor& b_s,
                               const at::Tensor& w_a, const at::Tensor& w_b, const at::Tensor& bias_in) {
  constexpr const char* op = "gated_pointwise";
  check_cpu(op, a_in);
  check_gated_pointwise(op, a_in, w_s, b_s, w_a, w_b);
  const int64_t N = a_in.size(0), C_in = a_in.size(1), C_out = w_a.size(0), H = a_in.size(2),
                W = a_in.size(3), HW = H * W;
  check_vector(op, "bias", bias_in, C_out, a_in);
  if (use_gemm(C_in, 2 * C_out + 1)) return gated_pointwise_gemm(a_in, w_s, b_s, w_a, w_b, bias_in);
  const at::Tensor a = a_in.contiguous(), bias = bias_in.contiguous();
  const at::Tensor weight = stacked_weight(w_s, w_a, w_b);  // [W_a; W_b; w_s]
  at::Tensor y = cpu::empty_output({N, C_out, H, W}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "gated_pointwise_cpu", [&] {
    using T = scalar_t;
    constexpr int BW = kProjBlock<T>;
    const T *ap = a.data_ptr<T>(), *wp = weight.data_ptr<T>(), *bp = bias.data_ptr<T>();
    const T b_att = b_s.item<T>();
    T* yp = y.data_ptr<T>();
    for_pixel_blocks(N, HW, BW, [&](int64_t n, int64_t p0, int m, int64_t) {
      T s[BW], u[BW], v[BW];
      const T* block = ap + n * C_in * HW + p0;
      std::fill(s, s + BW, b_att);
      project_add(block, HW, C_in, wp + 2 * C_out * C_in, m, s);
_Pragma("omp simd")
      for (int t = 0; t < m; ++t) s[t] = sigmoid(s[t]);
      for (int64_t o = 0; o < C_out; ++o) {
        std::fill(u, u + BW, bp[o]);
        std::fill(v, v + BW, T(0));
        project2_add(block, HW, C_in, wp + o * C_in, wp + (C_out + o) * C_in, m, u, v);
        T* yo = yp + (n * C_out + o) * HW + p0;
        _Pragma("omp simd")
        for (int t = 0; t < m; ++t) yo[t] = u[t] + s[t] * v[t];
      }
    });
  });
  return to_output_layout(y, a_in);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_pointwise_backward_cpu(const at::Tensor& gy_in, const at::Tensor& a_in, const at::Tensor& w_s,
                             const at::Tensor& b_s, const at::Tensor& w_a, const at::Tensor& w_b) {
  constexpr const char* op = "gated_pointwise_backward";
  check_cpu(op, a_in);
  check_gated_pointwise(op, a_in, w_s, b_s, w_a, w_b);
  const int64_t N = a_in.size(0), C_in = a_in.size(1), C_out = w_a.size(0);
  const int64_t HW = a_in.size(2) * a_in.size(3), rows = 2 * C_out + 1;
  check_feature(op, "grad_out", gy_in, a_in);
  TORCH_CHECK(gy_in.size(0) == N && gy_in.size(1) == C_out && gy_in.size(2) * gy_in.size(3) == HW,
              op, ": grad_out must be [N, C_out, H, W]");
  if (use_gemm(C_in, rows)) return gated_pointwise_backward_gemm(gy_in, a_in, w_s, b_s, w_a, w_b);
  const at::Tensor a = a_in.contiguous(), gy = gy_in.contiguous();
  const at::Tensor weight = stacked_weight(w_s, w_a, w_b);
  const at::Tensor weight_t = weight.t().contiguous();  // [C_in, rows]: a channel's weights together
  at::Tensor ga = cpu::empty_output(a.sizes(), a.options());
  // Per task: d[W_a; W_b; w_s] ([rows, C_in]), then Σ over pixels of d[W_a·a; W_b·a; w_s·a].
  at::Tensor partial = at::zeros({pixel_tasks(N, HW), rows * C_in + rows}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "gated_pointwise_backward_cpu", [&] {
    using T = scalar_t;
    constexpr int BW = kProjBlock<T>;
    const T *ap = a.data_ptr<T>(), *gyp = gy.data_ptr<T>(), *wp = weight.data_ptr<T>(),
            *wtp = weight_t.data_ptr<T>();
    const T b_att = b_s.item<T>();
    T *gap = ga.data_ptr<T>(), *pp = partial.data_ptr<T>();
    for_pixel_blocks(N, HW, BW, [&](int64_t n, int64_t p0, int m, int64_t task) {
      // grad rows of this block: [grad_y; s·grad_y; d logit] (grad_y read in place)
      thread_local std::vector<T> sg;
      sg.resize(C_out * BW);
      T s[BW], v[BW], gz[BW], acc[BW];
      const T* block = ap + n * C_in * HW + p0;
      const T* gblock = gyp + n * C_out * HW + p0;
      std::fill(s, s + BW, b_att);
      project_add(block, HW, C_in, wp + 2 * C_out * C_in, m, s);
      std::fill(gz, gz + BW, T(0));
_Pragma("omp simd")
      for (int t = 0; t < m; ++t) s[t] = sigmoid(s[t]);
      for (int64_t o = 0; o < C_out; ++o) {
        std::fill(v, v + BW, T(0));
        project_add(block, HW, C_in, wp + (C_out + o) * C_in, m, v);
        const T* g = gblock + o * HW;
        T* sgo = sg.data() + o * BW;
        _Pragma("omp simd")
        for (int t = 0; t < m; ++t) {
          gz[t] += g[t] * v[t];
          sgo[t] = s[t] * g[t];
        }
      }
      for (int t = 0; t < m; ++t) gz[t] *= s[t] * (T(1) - s[t]);
      T* part = pp + task * (rows * C_in + rows);
      for (int64_t c = 0; c < C_in; ++c) {
        const T* wc = wtp + c * rows;
        _Pragma("omp simd")
        for (int t = 0; t < m; ++t) acc[t] = wc[2 * C_out] * gz[t];
        project_add(gblock, HW, C_out, wc, m, acc);            // W_aᵀ·grad_y
        project_add(sg.data(), BW, C_out, wc + C_out, m, acc);  // W_bᵀ·(s·grad_y)
        std::copy(acc, acc + m, gap + (n * C_in + c) * HW + p0);
        const T* ac = block + c * HW;
        for (int64_t o = 0; o < C_out; ++o) {
          part[o * C_in + c] += dot(gblock + o * HW, ac, m);
          part[(C_out + o) * C_in + c] += dot(sg.data() + o * BW, ac, m);
        }
        part[2 * C_out * C_in + c] += dot(gz, ac, m);
      }
      T* sums = part + rows * C_in;
      for (int64_t o = 0; o < C_out; ++o) sums[o] += block_sum(gblock + o * HW, m);
      sums[2 * C_out] += block_sum(gz, m);
    });
  });
  const at::Tensor total = partial.sum(0);
  const at::Tensor gw = total.narrow(0, 0, rows * C_in).view({rows, C_in});
  const at::Tensor sums = total.narrow(0, rows * C_in, rows);
  // Separate tensors: outputs of an op may not alias each other. d bias = Σ grad_y = sums[:C_out].
  return {to_output_layout(ga, a_in), gw.narrow(0, 2 * C_out, 1).clone(),
          sums.narrow(0, 2 * C_out, 1).clone(), gw.narrow(0, 0, C_out).clone(),
          gw.narrow(0, C_out, C_out).clone(), sums.narrow(0, 0, C_out).clone()};
}

// --- bilinear resize of planes -----------------------------------------------------------------

// The horizontal resize of a row that fits two vectors, and its adjoint, by permutes instead of
// gathers: each vector of outputs is l0·perm(row, i0) + l1·perm(row, i1) over the row's two
// vectors (one two-source permute each; AVX-512's vpermt2ps), and each vector of the adjoint sums
// `reads` such terms. On this machine a gather of 16 floats costs several times a permute, and
// LightAWNet's cross gates resize rows of 16 and 32 values. `forward`: whether the input row fits
// (in ≤ 2 vectors); `adjoint`: whether the output row fits (out ≤ 2 vectors).
template <typename I>
using IndexVec __attribute__((vector_size(simd::kVectorBytes))) = I;
template <typename I>
using UnalignedIndexVec __attribute__((vector_size(simd::kVectorBytes), aligned(sizeof(I)))) = I;

template <typename T>
struct PermuteTaps {
  // Vectors are stored as runs of L values (a vector type as a template argument loses its
  // vector attribute in GCC) and loaded where they are used.
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  static constexpr int L = simd::kLanes<T>;
  bool forward = false, adjoint = false;
  int in = 0, out = 0, reads = 0;
  std::vector<I> i0, i1, from_o;  // per vector of outputs; [(k · input vectors + j) · L + lane]
  std::vector<T> l0, l1, from_l;

  void build(int in_, int out_, const std::vector<int>& ti0, const std::vector<int>& ti1,
             const std::vector<T>& tl0, const std::vector<T>& tl1, int reads_,
             const std::vector<int>& fo, const std::vector<T>& fl) {
    in = in_, out = out_, reads = reads_;
    forward = in <= 2 * L;
    adjoint = out <= 2 * L;
    const size_t out_values = static_cast<size_t>((out + L - 1) / L) * L;
    const int in_vectors = (in + L - 1) / L;
    if (forward) {
      i0.assign(out_values, 0), i1.assign(out_values, 0);
      l0.assign(out_values, T(0)), l1.assign(out_values, T(0));
      for (int o = 0; o < out; ++o) i0[o] = ti0[o], i1[o] = ti1[o], l0[o] = tl0[o], l1[o] = tl1[o];
    }
    if (adjoint) {
      from_o.assign(static_cast<size_t>(reads) * in_vectors * L, 0);
      from_l.assign(static_cast<size_t>(reads) * in_vectors * L, T(0));
      for (int k = 0; k < reads; ++k)
        for (int i = 0; i < in; ++i) {
          from_o[(static_cast<size_t>(k) * in_vectors + i / L) * L + i % L] =
              fo[static_cast<size_t>(k) * in + i];
          from_l[(static_cast<size_t>(k) * in_vectors + i / L) * L + i % L] =
              fl[static_cast<size_t>(k) * in + i];
        }
    }
  }

  static IndexVec<I> load_index(const I* p) {
    return *reinterpret_cast<const UnalignedIndexVec<I>*>(p);
  }
  // The row's n ≤ 2L values as two vectors (lanes past n are zero, and no permute selects them).
  static void load_row(const T* p, int n, simd::Vec<T>& lo, simd::Vec<T>& hi) {
    if (n >= L) {
      lo = simd::load(p);
      if (n == 2 * L) {
        hi = simd::load(p + L);
      } else {
        hi = simd::Vec<T>{};
        for (int l = 0; l < n - L; ++l) hi[l] = p[L + l];
      }
    } else {
      lo = simd::Vec<T>{}, hi = simd::Vec<T>{};
      for (int l = 0; l < n; ++l) lo[l] = p[l];
    }
  }
  // o[c] for c < out from the input row p (in values).
  void resize(const T* p, T* o) const {
    simd::Vec<T> lo, hi;
    load_row(p, in, lo, hi);
    for (int j = 0; j * L < out; ++j) {
      const simd::Vec<T> v =
          simd::load(&l0[j * L]) * __builtin_shuffle(lo, hi, load_index(&i0[j * L])) +
          simd::load(&l1[j * L]) * __builtin_shuffle(lo, hi, load_index(&i1[j * L]));
      simd::store_lanes<T>(o + j * L, v, imin(L, out - j * L));
    }
  }
  // g[i] for i < in: the adjoint applied to the output row r (out values).
  void resize_adjoint(const T* r, T* g) const {
    simd::Vec<T> lo, hi;
    load_row(r, out, lo, hi);
    const int in_vectors = (in + L - 1) / L;
    for (int j = 0; j < in_vectors; ++j) {
      simd::Vec<T> acc =
          simd::load(&from_l[j * L]) * __builtin_shuffle(lo, hi, load_index(&from_o[j * L]));
      for (int k = 1; k < reads; ++k) {
        const size_t at = (static_cast<size_t>(k) * in_vectors + j) * L;
        acc += simd::load(&from_l[at]) * __builtin_shuffle(lo, hi, load_index(&from_o[at]));
      }
      simd::store_lanes<T>(g + j * L, acc, imin(L, in - j * L));
    }
  }
};

// The taps of every output position along one axis, as separate arrays (vectorisable gathers).
template <typename T>
struct AxisTaps {
  std::vector<int> i0, i1;
  std::vector<T> l0, l1;
  std::vector<T> weight_sum;  // Σ over outputs of the weight each input gets: the adjoint of 1
  // The adjoint as gathers: input i receives from outputs from_o[k·in + i] with weights
  // from_l[k·in + i], k < reads (padded with weight 0), so that it vectorises over i; scattering
  // each output's two taps is a chain of dependent adds.
  int reads = 0;
  std::vector<int> from_o;
  std::vector<T> from_l;
  AxisTaps(int in, int out, bool align_corners)
      : i0(out), i1(out), l0(out), l1(out), weight_sum(in, T(0)) {
    const T scale = resize_scale<T>(in, out, align_corners);
    std::vector<std::vector<std::pair<int, T>>> from(in);
    for (int o = 0; o < out; ++o) {
      const Taps<T> t = resize_taps<T>(o, in, out, scale, align_corners);
      i0[o] = t.i0, i1[o] = t.i1, l0[o] = t.l0, l1[o] = t.l1;
      weight_sum[t.i0] += t.l0;
      weight_sum[t.i1] += t.l1;
      from[t.i0].emplace_back(o, t.l0);
      from[t.i1].emplace_back(o, t.l1);
    }
    for (const auto& f : from) reads = std::max(reads, static_cast<int>(f.size()));
    from_o.assign(static_cast<size_t>(reads) * in, 0);
    from_l.assign(static_cast<size_t>(reads) * in, T(0));
    for (int i = 0; i < in; ++i)
      for (size_t k = 0; k < from[i].size(); ++k) {
        from_o[k * in + i] = from[i][k].first;
        from_l[k * in + i] = from[i][k].second;
      }
    // The ×2 upsample without align_corners (LightAWNet's decoder): for 0 < i < in - 1, output
    // 2i reads (i - 1, i) with weights (1/4, 3/4) and output 2i + 1 reads (i, i + 1) with
    // (3/4, 1/4); only outputs 0, 1, 2·in - 2 and 2·in - 1 read inputs 0, 1, in - 2 and in - 1.
    // So input i, 2 ≤ i < in - 2, is read by outputs 2i - 1 … 2i + 2 with weights 1/4, 3/4, 3/4,
    // 1/4. Checked on the taps themselves, so the strided loops below compute the same sums.
    doubling = out == 2 * in && in >= 4;
    for (int i = 1; doubling && i + 1 < in; ++i)
      doubling = i0[2 * i] == i - 1 && i1[2 * i] == i && l0[2 * i] == T(0.25) &&
                 l1[2 * i] == T(0.75) && i0[2 * i + 1] == i && i1[2 * i + 1] == i + 1 &&
                 l0[2 * i + 1] == T(0.75) && l1[2 * i + 1] == T(0.25);
    for (int o : {0, 1}) doubling = doubling && imax(i0[o], i1[o]) <= 1;
    for (int o : {out - 2, out - 1}) doubling = doubling && imin(i0[o], i1[o]) >= in - 2;
    permute.build(in, out, i0, i1, l0, l1, reads, from_o, from_l);
  }
  bool doubling = false;
  PermuteTaps<T> permute;
};

// row[o] for o in [lo, hi), by the taps (gathers).
template <typename T>
void gather_taps(const AxisTaps<T>& cols, const T* tmp, int lo, int hi, T* row) {
  const int *c0 = cols.i0.data(), *c1 = cols.i1.data();
  const T *l0 = cols.l0.data(), *l1 = cols.l1.data();
  _Pragma("omp simd")
  for (int c = lo; c < hi; ++c) row[c] = l0[c] * tmp[c0[c]] + l1[c] * tmp[c1[c]];
}

// tmp[i] for i in [lo, hi): the adjoint of the taps applied to `row` (gathers). One pass per
// read k, each a vectorised gather over i (a loop over k inside the one over i stayed scalar).
template <typename T>
void gather_adjoint(const AxisTaps<T>& cols, const T* row, int in_w, int lo, int hi, T* tmp) {
  const int* from_o = cols.from_o.data();
  const T* from_l = cols.from_l.data();
_Pragma("omp simd")
  for (int i = lo; i < hi; ++i) tmp[i] = from_l[i] * row[from_o[i]];
  for (int k = 1; k < cols.reads; ++k) {
    const int* fo = from_o + static_cast<int64_t>(k) * in_w;
    const T* fl = from_l + static_cast<int64_t>(k) * in_w;
_Pragma("omp simd")
    for (int i = lo; i < hi; ++i) tmp[i] += fl[i] * row[fo[i]];
  }
}

// out[c] for c < cols.i0.size(): the horizontal resize of one row of in_w values.
template <typename T>
void resize_columns(const AxisTaps<T>& cols, const T* in, int in_w, T* out) {
  const int W = static_cast<int>(cols.i0.size());
  if (!cols.doubling && cols.permute.forward) return cols.permute.resize(in, out);
  if (!cols.doubling) return gather_taps(cols, in, 0, W, out);
  gather_taps(cols, in, 0, 2, out);
  _Pragma("omp simd")
  for (int i = 1; i < in_w - 1; ++i) {  // contiguous loads instead of gathers
    out[2 * i] = T(0.25) * in[i - 1] + T(0.75) * in[i];
    out[2 * i + 1] = T(0.75) * in[i] + T(0.25) * in[i + 1];
  }
  gather_taps(cols, in, W - 2, W, out);
}

// The vertical resize on rows of n values (`rows`: the taps along the rows):
// out = output row r, the blend of its two input rows; src holds the input rows from row `first`.
template <typename T>
void blend_rows(const AxisTaps<T>& rows, int r, const T* src, int first, int n, T* out) {
  const T *top = src + static_cast<int64_t>(rows.i0[r] - first) * n,
          *bottom = src + static_cast<int64_t>(rows.i1[r] - first) * n;
  const T wt = rows.l0[r], wb = rows.l1[r];
_Pragma("omp simd")
  for (int c = 0; c < n; ++c) out[c] = wt * top[c] + wb * bottom[c];
}

// The vertical resize's adjoint for output row r (`v`), added into its two input rows of dst.
template <typename T>
void scatter_row(const AxisTaps<T>& rows, int r, const T* v, int n, T* dst) {
  T *top = dst + static_cast<int64_t>(rows.i0[r]) * n,
    *bottom = dst + static_cast<int64_t>(rows.i1[r]) * n;
  const T wt = rows.l0[r], wb = rows.l1[r];
_Pragma("omp simd")
  for (int c = 0; c < n; ++c) top[c] += wt * v[c];
_Pragma("omp simd")
  for (int c = 0; c < n; ++c) bottom[c] += wb * v[c];
}

// The vertical resize's adjoint for input row i, written once: out = Σ of the output rows of src
// that read row i, each times its weight (from the taps' gather lists).
template <typename T>
void gather_rows(const AxisTaps<T>& rows, int i, const T* src, int n, T* out) {
  const int64_t in = static_cast<int64_t>(rows.weight_sum.size());
  std::fill(out, out + n, T(0));
  for (int k = 0; k < rows.reads; ++k) {
    const T l = rows.from_l[k * in + i];
    if (l == T(0)) continue;  // padding of the gather lists
    const T* g = src + static_cast<int64_t>(rows.from_o[k * in + i]) * n;
_Pragma("omp simd")
    for (int c = 0; c < n; ++c) out[c] += l * g[c];
  }
}

// row[c] = resized plane at output row r, c < cols.i0.size(): the two input rows are blended
// first (contiguous, vectorised) into `tmp` (in_w values), then each output gathers two taps.
template <typename T>
void resize_row(const T* plane, int in_w, const AxisTaps<T>& rows, const AxisTaps<T>& cols, int r,
                T* tmp, T* row) {
  blend_rows(rows, r, plane, 0, in_w, tmp);
  resize_columns(cols, tmp, in_w, row);
}

// out[i] for i < in_w: the adjoint of the horizontal resize applied to one output row.
template <typename T>
void resize_columns_adjoint(const AxisTaps<T>& cols, const T* row, int in_w, T* out) {
  if (!cols.doubling && cols.permute.adjoint) return cols.permute.resize_adjoint(row, out);
  if (!cols.doubling) return gather_adjoint(cols, row, in_w, 0, in_w, out);
  gather_adjoint(cols, row, in_w, 0, 2, out);
  _Pragma("omp simd")
  for (int i = 2; i < in_w - 2; ++i)  // the taps' sum in the same order, contiguous loads
    out[i] = T(0) + T(0.25) * row[2 * i - 1] + T(0.75) * row[2 * i] + T(0.75) * row[2 * i + 1] +
             T(0.25) * row[2 * i + 2];
  gather_adjoint(cols, row, in_w, in_w - 2, in_w, out);
}

// plane += the resize's adjoint applied to output row r (`row`); `tmp` holds in_w values.
template <typename T>
void resize_row_adjoint(const T* row, const AxisTaps<T>& rows, const AxisTaps<T>& cols, int r,
                        int in_w, T* tmp, T* plane) {
  resize_columns_adjoint(cols, row, in_w, tmp);
  scatter_row(rows, r, tmp, in_w, plane);
}

// The whole resize's adjoint of one plane, rows first where the rows double (an ×2 upsample
// without align_corners): input row i, 2 ≤ i < in_h - 2, is the sum of output rows 2i - 1 …
// 2i + 2 with weights 1/4, 3/4, 3/4, 1/4 (contiguous rows of out_w values), and the horizontal
// adjoint then runs once per input row, written once, instead of once per output row into two
// input rows. `tmp` holds out_w values. Other resizes go row by row (resize_row_adjoint).
template <typename T>
void resize_plane_adjoint(const T* grad, int in_h, int in_w, const AxisTaps<T>& rows,
                          const AxisTaps<T>& cols, T* tmp, T* plane) {
  const int out_h = static_cast<int>(rows.i0.size()), out_w = static_cast<int>(cols.i0.size());
  if (!rows.doubling) {
    std::fill(plane, plane + static_cast<int64_t>(in_h) * in_w, T(0));
    for (int r = 0; r < out_h; ++r)
      resize_row_adjoint(grad + static_cast<int64_t>(r) * out_w, rows, cols, r, in_w, tmp, plane);
    return;
  }
  for (int i = 0; i < in_h; ++i) {
    if (i >= 2 && i < in_h - 2) {
      const T* a = grad + static_cast<int64_t>(2 * i - 1) * out_w;
      const T *b = a + out_w, *c = b + out_w, *d = c + out_w;
_Pragma("omp simd")
      for (int j = 0; j < out_w; ++j)
        tmp[j] = T(0) + T(0.25) * a[j] + T(0.75) * b[j] + T(0.75) * c[j] + T(0.25) * d[j];
    } else {  // the rows reading input row i, from the taps
      gather_rows(rows, i, grad, out_w, tmp);
    }
    resize_columns_adjoint(cols, tmp, in_w, plane + static_cast<int64_t>(i) * in_w);
  }
}

// --- channel_gate ------------------------------------------------------------------------------

// pre = W1·mean, gate = σ(W2·ReLU(pre)): the excitation MLP on [N, C] means (tiny: ATen ops).
std::pair<at::Tensor, at::Tensor> excitation(const at::Tensor& mean, const at::Tensor& w1,
                                             const at::Tensor& w2) {
  at::Tensor pre = at::mm(mean, w1.t());
  return {pre, at::sigmoid(at::mm(at::relu(pre), w2.t())).contiguous()};
}

// mean[n, c] of the (upsampled) plane: Σ_ij rows.weight_sum[i]·cols.weight_sum[j]·x[n, c, i, j] / HW.
template <typename T>
at::Tensor plane_means(const at::Tensor& x, const ChannelGateShape& s, const AxisTaps<T>& rows,
                       const AxisTaps<T>& cols, std::atomic<bool>& non_finite) {
  at::Tensor mean = at::empty({s.N, s.C}, x.options());
  const T* xp = x.data_ptr<T>();
  T* mp = mean.data_ptr<T>();
  const T* cw = cols.weight_sum.data();
  const T inv = T(1) / static_cast<T>(s.H * s.W);
  at::parallel_for(0, s.N * s.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const T* plane = xp + nc * s.h * s.w;
      if (!all_finite(plane, s.h * s.w)) non_finite = true;
      T total = 0;
      for (int64_t i = 0; i < s.h; ++i) {
        const T* row = plane + i * s.w;
        T acc = 0;
_Pragma("omp simd reduction(+ : acc)")
        for (int64_t j = 0; j < s.w; ++j) acc += cw[j] * row[j];
        total += rows.weight_sum[i] * acc;
      }
      mp[nc] = total * inv;
    }
  });
  return mean;
}

at::Tensor channel_gate_cpu(const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& w2,
                            const std::optional<at::Tensor>& skip_in, bool upsample) {
  constexpr const char* op = "channel_gate";
  check_cpu(op, x_in);
  const auto s = check_channel_gate(op, x_in, w1, w2, upsample);
  at::Tensor skip;
  if (skip_in.has_value()) {
    check_feature(op, "skip", *skip_in, x_in);
    TORCH_CHECK(skip_in->size(0) == s.N && skip_in->size(1) == s.C && skip_in->size(2) == s.H &&
                    skip_in->size(3) == s.W, op, ": skip must be [N, C, H, W] of the output");
    skip = skip_in->contiguous();
  }
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = cpu::empty_output({s.N, s.C, s.H, s.W}, x.options());
  std::atomic<bool> non_finite{false}, skip_non_finite{false};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_gate_cpu", [&] {
    using T = scalar_t;
    const AxisTaps<T> rows(s.h, s.H, false), cols(s.w, s.W, false);
    const at::Tensor gate = excitation(plane_means(x, s, rows, cols, non_finite), w1, w2).second;
    const T *xp = x.data_ptr<T>(), *gp = gate.data_ptr<T>();
    const T* sp = skip.defined() ? skip.data_ptr<T>() : nullptr;
    T* yp = y.data_ptr<T>();
    const int64_t out_plane = s.H * s.W;
    // Where the rows double, each input row is resized horizontally once (into `wide`, in_h rows
    // of out_w values) and every output row blends two of them; otherwise row by row (`tmp`).
    const bool by_plane = rows.doubling;
    at::parallel_for(0, s.N * s.C, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> tmp(by_plane ? 0 : s.w), wide(by_plane ? s.h * s.W : 0);
      for (int64_t nc = begin; nc < end; ++nc) {
        const T g = gp[nc];
        if (sp && !all_finite(sp + nc * out_plane, out_plane)) skip_non_finite = true;
        if (by_plane) {
          for (int64_t i = 0; i < s.h; ++i)
            resize_columns(cols, xp + (nc * s.h + i) * s.w, static_cast<int>(s.w),
                           wide.data() + i * s.W);
          for (int r = 0; r < s.H; ++r) {
            const T *top = wide.data() + rows.i0[r] * s.W, *bottom = wide.data() + rows.i1[r] * s.W;
            const T wt = rows.l0[r] * g, wb = rows.l1[r] * g;
            T* row = yp + nc * out_plane + r * s.W;
            if (sp) {
              const T* add = sp + nc * out_plane + r * s.W;
_Pragma("omp simd")
              for (int64_t c = 0; c < s.W; ++c) row[c] = wt * top[c] + wb * bottom[c] + add[c];
            } else {
_Pragma("omp simd")
              for (int64_t c = 0; c < s.W; ++c) row[c] = wt * top[c] + wb * bottom[c];
            }
          }
          continue;
        }
        for (int r = 0; r < s.H; ++r) {
          T* row = yp + nc * out_plane + r * s.W;
          resize_row(xp + nc * s.h * s.w, static_cast<int>(s.w), rows, cols, r, tmp.data(), row);
          if (sp) {
            const T* add = sp + nc * out_plane + r * s.W;
_Pragma("omp simd")
            for (int64_t c = 0; c < s.W; ++c) row[c] = row[c] * g + add[c];
          } else {
_Pragma("omp simd")
            for (int64_t c = 0; c < s.W; ++c) row[c] *= g;
          }
        }
      }
    });
  });
  TORCH_CHECK_VALUE(!non_finite, "channel_gate: x contains NaN or inf");
  TORCH_CHECK_VALUE(!skip_non_finite, "channel_gate: skip contains NaN or inf");
  return to_output_layout(y, x_in);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_gate_backward_cpu(
    const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& w2,
    bool upsample) {
  constexpr const char* op = "channel_gate_backward";
  check_cpu(op, x_in);
  const auto s = check_channel_gate(op, x_in, w1, w2, upsample);
  check_feature(op, "grad_out", gy_in, x_in);
  TORCH_CHECK(gy_in.size(0) == s.N && gy_in.size(1) == s.C && gy_in.size(2) == s.H &&
                  gy_in.size(3) == s.W, op, ": grad_out must be [N, C, H, W] of the output");
  const at::Tensor x = x_in.contiguous(), gy = gy_in.contiguous();
  at::Tensor gx = cpu::empty_output(x.sizes(), x.options());
  at::Tensor gw1, gw2;
  std::atomic<bool> non_finite{false};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_gate_backward_cpu", [&] {
    using T = scalar_t;
    const AxisTaps<T> rows(s.h, s.H, false), cols(s.w, s.W, false);
    const at::Tensor mean = plane_means(x, s, rows, cols, non_finite);
    const auto [pre, gate] = excitation(mean, w1, w2);
    at::Tensor grad_gate = at::empty({s.N, s.C}, x.options());
    const T *xp = x.data_ptr<T>(), *gyp = gy.data_ptr<T>();
    T *gxp = gx.data_ptr<T>(), *ggp = grad_gate.data_ptr<T>();
    const int64_t in_plane = s.h * s.w, out_plane = s.H * s.W;
    // Pass A: grad_x ← up^T(grad_y) per plane; d gate = Σ grad_y·up(x) = Σ x·up^T(grad_y).
    at::parallel_for(0, s.N * s.C, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> tmp(s.W);
      for (int64_t nc = begin; nc < end; ++nc) {
        T* u = gxp + nc * in_plane;
        resize_plane_adjoint(gyp + nc * out_plane, static_cast<int>(s.h), static_cast<int>(s.w),
                             rows, cols, tmp.data(), u);
        const T* xc = xp + nc * in_plane;
        T dot = 0;
_Pragma("omp simd reduction(+ : dot)")
        for (int64_t i = 0; i < in_plane; ++i) dot += xc[i] * u[i];
        ggp[nc] = dot;
      }
    });
    // The excitation MLP's backward on [N, C] (tiny).
    const at::Tensor hidden = at::relu(pre);
    const at::Tensor grad_e = grad_gate * gate * (1 - gate);
    gw2 = at::mm(grad_e.t(), hidden);
    const at::Tensor grad_pre = at::mm(grad_e, w2) * (pre > 0);
    gw1 = at::mm(grad_pre.t(), mean);
    const at::Tensor grad_mean = (at::mm(grad_pre, w1) / static_cast<double>(out_plane)).contiguous();
    // Pass B: grad_x = gate·up^T(grad_y) + d mean / HW · up^T(1), in place.
    const T *gp = gate.data_ptr<T>(), *gmp = grad_mean.data_ptr<T>();
    const T* cw = cols.weight_sum.data();
    at::parallel_for(0, s.N * s.C, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> tmp(s.w);
      for (int64_t nc = begin; nc < end; ++nc) {
        const T g = gp[nc];
        for (int64_t i = 0; i < s.h; ++i) {
          T* row = gxp + nc * in_plane + i * s.w;
          const T k = gmp[nc] * rows.weight_sum[i];
_Pragma("omp simd")
          for (int64_t j = 0; j < s.w; ++j) row[j] = g * row[j] + k * cw[j];
        }
      }
    });
  });
  TORCH_CHECK_VALUE(!non_finite, "channel_gate_backward: x contains NaN or inf");
  return {to_output_layout(gx, x_in), gw1.contiguous(), gw2.contiguous()};
}

// --- cross_gate --------------------------------------------------------------------------------

// Output rows per band of a plane: about 4096 values, so that a band of the resized gate, of a
// and of grad_out stays in L1 between the passes over it.
int cross_band_rows(int W) { return std::max(1, 4096 / std::max(1, W)); }

// The resized b of output rows [r0, r1) of one plane, into gate[(r - r0)·W + c]. The horizontal
// resize (gathers, or permutes for short rows: PermuteTaps) runs on whichever side has fewer
// rows: where b has fewer rows than the output (an upsample), each input row the band needs is
// resized horizontally once (into `wide`) and the output rows blend two of them (contiguous);
// otherwise each output row blends two input rows (into `tmp`, w values) and resizes that
// horizontally.
template <typename T>
void cross_gate_band(const T* bplane, int h, int w, const AxisTaps<T>& rows,
                     const AxisTaps<T>& cols, int r0, int r1, std::vector<T>& tmp,
                     std::vector<T>& wide, T* gate) {
  const int W = static_cast<int>(cols.i0.size()), H = static_cast<int>(rows.i0.size());
  if (h >= H) {
    for (int r = r0; r < r1; ++r)
      resize_row(bplane, w, rows, cols, r, tmp.data(), gate + static_cast<int64_t>(r - r0) * W);
    return;
  }
  int lo = h, hi = -1;
  for (int r = r0; r < r1; ++r) {
    lo = imin(lo, imin(rows.i0[r], rows.i1[r]));
    hi = imax(hi, imax(rows.i0[r], rows.i1[r]));
  }
  wide.resize(static_cast<size_t>(hi - lo + 1) * W);
  for (int i = lo; i <= hi; ++i)
    resize_columns(cols, bplane + static_cast<int64_t>(i) * w, w,
                   wide.data() + static_cast<int64_t>(i - lo) * W);
  for (int r = r0; r < r1; ++r)
    blend_rows(rows, r, wide.data(), lo, W, gate + static_cast<int64_t>(r - r0) * W);
}

at::Tensor cross_gate_cpu(const at::Tensor& a_in, const at::Tensor& b_in, bool align_corners) {
  constexpr const char* op = "cross_gate";
  check_cpu(op, a_in);
  check_cross_gate(op, a_in, b_in);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t NC = a.size(0) * a.size(1);
  const int H = a.size(2), W = a.size(3), h = b.size(2), w = b.size(3);
  const bool same_size = h == H && w == W;  // the resize is the identity: no row buffers
  at::Tensor y = cpu::empty_output(a.sizes(), a.options());
  std::atomic<bool> a_non_finite{false}, b_non_finite{false};
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "cross_gate_cpu", [&] {
    using T = scalar_t;
    const AxisTaps<T> rows(h, H, align_corners), cols(w, W, align_corners);
    const T *ap = a.data_ptr<T>(), *bp = b.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    const int64_t plane = int64_t(H) * W;
    const int band = cross_band_rows(W);
    at::parallel_for(0, NC, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> gate(same_size ? 0 : static_cast<size_t>(imin(band, H)) * W), tmp(w), wide;
      for (int64_t nc = begin; nc < end; ++nc) {
        const T *aplane = ap + nc * plane, *bplane = bp + nc * h * w;
        T* yplane = yp + nc * plane;
        if (!all_finite(aplane, plane)) a_non_finite = true;
        if (!all_finite(bplane, int64_t(h) * w)) b_non_finite = true;
        if (same_size) {
_Pragma("omp simd")
          for (int64_t i = 0; i < plane; ++i) yplane[i] = aplane[i] * sigmoid(bplane[i]);
          continue;
        }
        for (int r0 = 0; r0 < H; r0 += band) {
          const int r1 = imin(H, r0 + band);
          cross_gate_band(bplane, h, w, rows, cols, r0, r1, tmp, wide, gate.data());
          const int64_t o = int64_t(r0) * W, n = int64_t(r1 - r0) * W;
          const T* g = gate.data();
_Pragma("omp simd")
          for (int64_t i = 0; i < n; ++i) yplane[o + i] = aplane[o + i] * sigmoid(g[i]);
        }
      }
    });
  });
  TORCH_CHECK_VALUE(!a_non_finite, "cross_gate: a contains NaN or inf");
  TORCH_CHECK_VALUE(!b_non_finite, "cross_gate: b contains NaN or inf");
  return to_output_layout(y, a_in);
}

// Backward by bands of output rows as the forward: the band's resized gate, then grad_a and
// d = grad_out·a·σ'(gate) in one pass, then the resize's adjoint of d, with the horizontal part
// (gathers or permutes) on whichever side has fewer rows. Where b has fewer rows than the
// output, d's rows are summed into b's rows (contiguous, into `tall`, h × W) and the horizontal
// adjoint runs once per row of b after the last band; otherwise each output row's horizontal
// adjoint goes into `short_rows` (H × w), and after the last band each row of grad_b is written
// once as the sum of the rows that read it.
std::tuple<at::Tensor, at::Tensor> cross_gate_backward_cpu(const at::Tensor& gy_in,
                                                           const at::Tensor& a_in,
                                                           const at::Tensor& b_in,
                                                           bool align_corners) {
  constexpr const char* op = "cross_gate_backward";
  check_cpu(op, a_in);
  check_cross_gate(op, a_in, b_in);
  check_feature(op, "grad_out", gy_in, a_in);
  TORCH_CHECK(gy_in.sizes() == a_in.sizes(), op, ": grad_out must have a's shape");
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), gy = gy_in.contiguous();
  const int64_t NC = a.size(0) * a.size(1);
  const int H = a.size(2), W = a.size(3), h = b.size(2), w = b.size(3);
  const bool same_size = h == H && w == W;
  at::Tensor ga = cpu::empty_output(a.sizes(), a.options());
  at::Tensor gb = cpu::empty_output(b.sizes(), b.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "cross_gate_backward_cpu", [&] {
    using T = scalar_t;
    const AxisTaps<T> rows(h, H, align_corners), cols(w, W, align_corners);
    const T *ap = a.data_ptr<T>(), *bp = b.data_ptr<T>(), *gyp = gy.data_ptr<T>();
    T *gap = ga.data_ptr<T>(), *gbp = gb.data_ptr<T>();
    const int64_t plane = int64_t(H) * W;
    const int band = cross_band_rows(W);
    const bool rows_first = h < H;  // the adjoint's vertical part first (see above)
    at::parallel_for(0, NC, 1, [&](int64_t begin, int64_t end) {
      const size_t band_values = same_size ? 0 : static_cast<size_t>(imin(band, H)) * W;
      std::vector<T> gate(band_values), tmp(w), wide;
      std::vector<T> tall(rows_first ? static_cast<size_t>(h) * W : 0);
      std::vector<T> short_rows(rows_first ? 0 : static_cast<size_t>(H) * w);
      for (int64_t nc = begin; nc < end; ++nc) {
        T* gbplane = gbp + nc * h * w;
        if (same_size) {
          const int64_t o = nc * plane;
_Pragma("omp simd")
          for (int64_t i = 0; i < plane; ++i) {
            const T sg = sigmoid(bp[o + i]);
            gap[o + i] = gyp[o + i] * sg;
            gbplane[i] = gyp[o + i] * ap[o + i] * sg * (T(1) - sg);
          }
          continue;
        }
        if (rows_first) std::fill(tall.begin(), tall.end(), T(0));
        for (int r0 = 0; r0 < H; r0 += band) {
          const int r1 = imin(H, r0 + band);
          T* g = gate.data();
          cross_gate_band(bp + nc * h * w, h, w, rows, cols, r0, r1, tmp, wide, g);
          const int64_t o = nc * plane + int64_t(r0) * W, n = int64_t(r1 - r0) * W;
_Pragma("omp simd")
          for (int64_t i = 0; i < n; ++i) {
            const T sg = sigmoid(g[i]);
            gap[o + i] = gyp[o + i] * sg;
            g[i] = gyp[o + i] * ap[o + i] * sg * (T(1) - sg);  // d resized b
          }
          for (int r = r0; r < r1; ++r) {
            const T* d = g + static_cast<int64_t>(r - r0) * W;
            if (!rows_first) {
              resize_columns_adjoint(cols, d, w, short_rows.data() + static_cast<int64_t>(r) * w);
              continue;
            }
            scatter_row(rows, r, d, W, tall.data());
          }
        }
        if (rows_first) {
          for (int i = 0; i < h; ++i)
            resize_columns_adjoint(cols, tall.data() + static_cast<int64_t>(i) * W, w,
                                   gbplane + static_cast<int64_t>(i) * w);
          continue;
        }
        for (int i = 0; i < h; ++i)  // grad_b's row i: the rows that read it, from the taps
          gather_rows(rows, i, short_rows.data(), w, gbplane + static_cast<int64_t>(i) * w);
      }
    });
  });
  return {to_output_layout(ga, a_in), to_output_layout(gb, b_in)};
}

// --- attention_gate ----------------------------------------------------------------------------

// The backward's outputs from grad_x, grad_g and `total`, the summed per-task partials
// [d W_x (C_i·C_x), d W_g (C_i·C_g), d b (C_i), d psi_w (C_i), d psi_b].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_gate_grads(const at::Tensor& total, const at::Tensor& gx, const at::Tensor& gg,
                     const at::Tensor& x_in, const at::Tensor& g_in, int64_t C_x, int64_t C_g,
                     int64_t C_i) {
  int64_t offset = 0;
  auto take = [&](int64_t count) {
    const at::Tensor t = total.narrow(0, offset, count).clone();
    offset += count;
    return t;
  };
  const at::Tensor gw_x = take(C_i * C_x).view({C_i, C_x}), gw_g = take(C_i * C_g).view({C_i, C_g}),
                   gb = take(C_i), gpsi_w = take(C_i).view({1, C_i}), gpsi_b = take(1);
  return {to_output_layout(gx, x_in), to_output_layout(gg, g_in), gw_x, gw_g, gb, gpsi_w, gpsi_b};
}

// The GEMM path by tasks of one sample's block of pixels, in parallel: the block's projection
// W_x·x + W_g·g into a per-thread scratch [C_i, BW] by BLAS on the strided rows of x and g, the
// gating around it, and in the backward the block's four products with the projection's
// gradient. A block of every tensor stays in L2 between its passes, so x, g and grad_out are read
// from memory once and grad_x, grad_g written once (whole-sample products streamed each of them
// through memory two or three times). Per-task partial weight gradients are summed in task order.

// Pixels per task: `rows` rows of the block within kBlockBytes, at least kMinGemmPixels (a BLAS
// call on fewer pixels is mostly overhead).
constexpr int64_t kMinGemmPixels = 1024;
int64_t gemm_block(int64_t rows, int64_t HW, int64_t bytes_per_value) {
  return std::min(HW, std::max(kMinGemmPixels, pixel_block(rows, HW, 1, bytes_per_value)));
}

// alpha[t] = σ(psi_b + Σ_i psi[i]·ReLU(proj[i][t] + b[i])), t < m; proj rows at a stride of ld.
template <typename T>
void attention_alpha(const T* proj, int64_t ld, int64_t C_i, const T* b, const T* psi, T psi_b,
                     int m, T* alpha) {
  for (int t = 0; t < m; ++t) alpha[t] = psi_b;
  for (int64_t i = 0; i < C_i; ++i) {
    const T* pi = proj + i * ld;
    const T bi = b[i], wi = psi[i];
_Pragma("omp simd")
    for (int t = 0; t < m; ++t) alpha[t] += wi * std::max(pi[t] + bi, T(0));
  }
_Pragma("omp simd")
  for (int t = 0; t < m; ++t) alpha[t] = sigmoid(alpha[t]);
}

at::Tensor attention_gate_blocked(const at::Tensor& x_in, const at::Tensor& g_in,
                                  const at::Tensor& w_x_in, const at::Tensor& w_g_in,
                                  const at::Tensor& b_in, const at::Tensor& psi_w_in,
                                  const at::Tensor& psi_b) {
  const at::Tensor x = x_in.contiguous(), g = g_in.contiguous(), w_x = w_x_in.contiguous(),
                   w_g = w_g_in.contiguous(), b = b_in.contiguous(), psi_w = psi_w_in.contiguous();
  const int64_t N = x.size(0), C_x = x.size(1), C_g = g.size(1), C_i = w_x.size(0),
                HW = x.size(2) * x.size(3);
  at::Tensor y = cpu::empty_output(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attention_gate_cpu", [&] {
    using T = scalar_t;
    const int64_t BW = gemm_block(2 * C_x + C_g + C_i, HW, sizeof(T));  // x, y, g, projection
    const int64_t blocks = (HW + BW - 1) / BW;
    const T *xp = x.data_ptr<T>(), *gp = g.data_ptr<T>(), *wxp = w_x.data_ptr<T>(),
            *wgp = w_g.data_ptr<T>(), *bp = b.data_ptr<T>(), *psi = psi_w.data_ptr<T>();
    const T psi_bias = psi_b.item<T>();
    T* yp = y.data_ptr<T>();
    at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> scratch((C_i + 1) * BW);
      T *proj = scratch.data(), *alpha = proj + C_i * BW;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / blocks, q0 = task % blocks * BW;
        const int m = static_cast<int>(std::min(BW, HW - q0));
        const T *xs = xp + n * C_x * HW + q0, *gs = gp + n * C_g * HW + q0;
        gemm<T>(false, false, C_i, m, C_x, wxp, C_x, xs, HW, false, proj, BW);
        gemm<T>(false, false, C_i, m, C_g, wgp, C_g, gs, HW, true, proj, BW);
        attention_alpha(proj, BW, C_i, bp, psi, psi_bias, m, alpha);
        for (int64_t c = 0; c < C_x; ++c) {
          const T* xc = xs + c * HW;
          T* yc = yp + (n * C_x + c) * HW + q0;
_Pragma("omp simd")
          for (int t = 0; t < m; ++t) yc[t] = xc[t] * alpha[t];
        }
      }
    });
  });
  return to_output_layout(y, x_in);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_gate_backward_blocked(const at::Tensor& gy_in, const at::Tensor& x_in,
                                const at::Tensor& g_in, const at::Tensor& w_x_in,
                                const at::Tensor& w_g_in, const at::Tensor& b_in,
                                const at::Tensor& psi_w_in, const at::Tensor& psi_b) {
  const at::Tensor x = x_in.contiguous(), g = g_in.contiguous(), gy = gy_in.contiguous(),
                   w_x = w_x_in.contiguous(), w_g = w_g_in.contiguous(), b = b_in.contiguous(),
                   psi_w = psi_w_in.contiguous();
  const int64_t N = x.size(0), C_x = x.size(1), C_g = g.size(1), C_i = w_x.size(0),
                HW = x.size(2) * x.size(3);
  at::Tensor gx = cpu::empty_output(x.sizes(), x.options());
  at::Tensor gg = cpu::empty_output(g.sizes(), g.options());
  // Per task: d W_x [C_i, C_x], d W_g [C_i, C_g], d b [C_i], d psi_w [C_i], d psi_b.
  const int64_t width = C_i * (C_x + C_g + 2) + 1;
  at::Tensor partial;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attention_gate_backward_cpu", [&] {
    using T = scalar_t;
    // x, grad_out, grad_x, g, grad_g and the projection
    const int64_t BW = gemm_block(3 * C_x + 2 * C_g + C_i, HW, sizeof(T));
    const int64_t blocks = (HW + BW - 1) / BW;
    partial = at::empty({N * blocks, width}, x.options());
    const T *xp = x.data_ptr<T>(), *gp = g.data_ptr<T>(), *gyp = gy.data_ptr<T>(),
            *wxp = w_x.data_ptr<T>(), *wgp = w_g.data_ptr<T>(), *bp = b.data_ptr<T>(),
            *psi = psi_w.data_ptr<T>();
    const T psi_bias = psi_b.item<T>();
    T *gxp = gx.data_ptr<T>(), *ggp = gg.data_ptr<T>(), *pp = partial.data_ptr<T>();
    at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> scratch((C_i + 2) * BW);
      T *proj = scratch.data(), *alpha = proj + C_i * BW, *gt = alpha + BW;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / blocks, q0 = task % blocks * BW;
        const int m = static_cast<int>(std::min(BW, HW - q0));
        const T *xs = xp + n * C_x * HW + q0, *gs = gp + n * C_g * HW + q0,
                *gys = gyp + n * C_x * HW + q0;
        T *gxs = gxp + n * C_x * HW + q0, *ggs = ggp + n * C_g * HW + q0;
        gemm<T>(false, false, C_i, m, C_x, wxp, C_x, xs, HW, false, proj, BW);
        gemm<T>(false, false, C_i, m, C_g, wgp, C_g, gs, HW, true, proj, BW);
        attention_alpha(proj, BW, C_i, bp, psi, psi_bias, m, alpha);
        // grad_x's gating term, and Σ_c grad_out·x → the gradient of the psi logit
        std::fill(gt, gt + m, T(0));
        for (int64_t c = 0; c < C_x; ++c) {
          const T *xc = xs + c * HW, *gc = gys + c * HW;
          T* gxc = gxs + c * HW;
_Pragma("omp simd")
          for (int t = 0; t < m; ++t) {
            gt[t] += gc[t] * xc[t];
            gxc[t] = gc[t] * alpha[t];
          }
        }
_Pragma("omp simd")
        for (int t = 0; t < m; ++t) gt[t] *= alpha[t] * (T(1) - alpha[t]);
        T* part = pp + task * width;
        T *gw_x = part, *gw_g = part + C_i * C_x, *gb_part = gw_g + C_i * C_g,
          *gpsi_part = gb_part + C_i;
        gpsi_part[C_i] = block_sum(gt, m);
        // the projection becomes its gradient, in place
        for (int64_t i = 0; i < C_i; ++i) {
          T* pi = proj + i * BW;
          const T bi = bp[i], wi = psi[i];
          T gpsi = 0;
_Pragma("omp simd reduction(+ : gpsi)")
          for (int t = 0; t < m; ++t) {
            const T q = pi[t] + bi;
            gpsi += gt[t] * std::max(q, T(0));
            pi[t] = q > T(0) ? wi * gt[t] : T(0);
          }
          gpsi_part[i] = gpsi;
          gb_part[i] = block_sum(pi, m);
        }
        gemm<T>(true, false, C_x, m, C_i, wxp, C_x, proj, BW, true, gxs, HW);
        gemm<T>(true, false, C_g, m, C_i, wgp, C_g, proj, BW, false, ggs, HW);
        gemm<T>(false, true, C_i, C_x, m, proj, BW, xs, HW, false, gw_x, C_x);
        gemm<T>(false, true, C_i, C_g, m, proj, BW, gs, HW, false, gw_g, C_g);
      }
    });
  });
  return attention_gate_grads(partial.sum(0), gx, gg, x_in, g_in, C_x, C_g, C_i);
}

at::Tensor attention_gate_cpu(const at::Tensor& x_in, const at::Tensor& g_in, const at::Tensor& w_x_in,
                              const at::Tensor& w_g_in, const at::Tensor& b_in, const at::Tensor& psi_w_in,
                              const at::Tensor& psi_b) {
  constexpr const char* op = "attention_gate";
  check_cpu(op, x_in);
  check_attention_gate(op, x_in, g_in, w_x_in, w_g_in, b_in, psi_w_in, psi_b);
  // The path from the shapes, before any copy (the GEMM path makes its own).
  if (use_gemm(std::min(x_in.size(1), g_in.size(1)), w_x_in.size(0))) {
    return attention_gate_blocked(x_in, g_in, w_x_in, w_g_in, b_in, psi_w_in, psi_b);
  }
  const at::Tensor x = x_in.contiguous(), g = g_in.contiguous(), w_x = w_x_in.contiguous(),
                   w_g = w_g_in.contiguous(), b = b_in.contiguous(), psi_w = psi_w_in.contiguous();
  const int64_t N = x.size(0), C_x = x.size(1), C_g = g.size(1), C_i = w_x.size(0),
                HW = x.size(2) * x.size(3);
  at::Tensor y = cpu::empty_output(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attention_gate_cpu", [&] {
    using T = scalar_t;
    constexpr int BW = kProjBlock<T>;
    const T *xp = x.data_ptr<T>(), *gp = g.data_ptr<T>(), *wxp = w_x.data_ptr<T>(),
            *wgp = w_g.data_ptr<T>(), *bp = b.data_ptr<T>(), *psi = psi_w.data_ptr<T>();
    const T psi_bias = psi_b.item<T>();
    T* yp = y.data_ptr<T>();
    for_pixel_blocks(N, HW, BW, [&](int64_t n, int64_t p0, int m, int64_t) {
      T alpha[BW], q[BW];
      const T *xb = xp + n * C_x * HW + p0, *gb = gp + n * C_g * HW + p0;
      std::fill(alpha, alpha + BW, psi_bias);
      for (int64_t i = 0; i < C_i; ++i) {
        std::fill(q, q + BW, bp[i]);
        project_add(xb, HW, C_x, wxp + i * C_x, m, q);
        project_add(gb, HW, C_g, wgp + i * C_g, m, q);
        const T wi = psi[i];
        _Pragma("omp simd")
        for (int t = 0; t < m; ++t) alpha[t] += wi * std::max(q[t], T(0));
      }
_Pragma("omp simd")
      for (int t = 0; t < m; ++t) alpha[t] = sigmoid(alpha[t]);
      for (int64_t c = 0; c < C_x; ++c) {
        const T* xc = xb + c * HW;
        T* yc = yp + (n * C_x + c) * HW + p0;
        _Pragma("omp simd")
        for (int t = 0; t < m; ++t) yc[t] = xc[t] * alpha[t];
      }
    });
  });
  return to_output_layout(y, x_in);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_gate_backward_cpu(const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& g_in,
                            const at::Tensor& w_x_in, const at::Tensor& w_g_in, const at::Tensor& b_in,
                            const at::Tensor& psi_w_in, const at::Tensor& psi_b) {
  constexpr const char* op = "attention_gate_backward";
  check_cpu(op, x_in);
  check_attention_gate(op, x_in, g_in, w_x_in, w_g_in, b_in, psi_w_in, psi_b);
  check_feature(op, "grad_out", gy_in, x_in);
  TORCH_CHECK(gy_in.sizes() == x_in.sizes(), op, ": grad_out must have x's shape");
  // The path from the shapes, before any copy (the GEMM path makes its own).
  if (use_gemm(std::min(x_in.size(1), g_in.size(1)), w_x_in.size(0))) {
    return attention_gate_backward_blocked(gy_in, x_in, g_in, w_x_in, w_g_in, b_in, psi_w_in, psi_b);
  }
  const at::Tensor x = x_in.contiguous(), g = g_in.contiguous(), gy = gy_in.contiguous(),
                   w_x = w_x_in.contiguous(), w_g = w_g_in.contiguous(), b = b_in.contiguous(),
                   psi_w = psi_w_in.contiguous();
  // [C, C_i]: the weights that one input channel's gradient gathers, together.
  const at::Tensor w_x_t = w_x.t().contiguous(), w_g_t = w_g.t().contiguous();
  const int64_t N = x.size(0), C_x = x.size(1), C_g = g.size(1), C_i = w_x.size(0),
                HW = x.size(2) * x.size(3);
  at::Tensor gx = cpu::empty_output(x.sizes(), x.options());
  at::Tensor gg = cpu::empty_output(g.sizes(), g.options());
  // Per task: d W_x [C_i, C_x], d W_g [C_i, C_g], d b [C_i], d psi_w [C_i], d psi_b.
  const int64_t width = C_i * (C_x + C_g + 2) + 1;
  at::Tensor partial = at::zeros({pixel_tasks(N, HW), width}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attention_gate_backward_cpu", [&] {
    using T = scalar_t;
    constexpr int BW = kProjBlock<T>;
    const T *xp = x.data_ptr<T>(), *gp = g.data_ptr<T>(), *gyp = gy.data_ptr<T>(),
            *wxp = w_x.data_ptr<T>(), *wgp = w_g.data_ptr<T>(), *wxt = w_x_t.data_ptr<T>(),
            *wgt = w_g_t.data_ptr<T>(), *bp = b.data_ptr<T>(), *psi = psi_w.data_ptr<T>();
    const T psi_bias = psi_b.item<T>();
    T *gxp = gx.data_ptr<T>(), *ggp = gg.data_ptr<T>(), *pp = partial.data_ptr<T>();
    for_pixel_blocks(N, HW, BW, [&](int64_t n, int64_t p0, int m, int64_t task) {
      thread_local std::vector<T> proj;  // [C_i][BW]: the projection, then its gradient
      proj.resize(C_i * BW);
      T alpha[BW], gt[BW], acc[BW];
      const T *xb = xp + n * C_x * HW + p0, *gb = gp + n * C_g * HW + p0,
              *gyb = gyp + n * C_x * HW + p0;
      std::fill(alpha, alpha + BW, psi_bias);
      for (int64_t i = 0; i < C_i; ++i) {
        T* q = proj.data() + i * BW;
        std::fill(q, q + BW, bp[i]);
        project_add(xb, HW, C_x, wxp + i * C_x, m, q);
        project_add(gb, HW, C_g, wgp + i * C_g, m, q);
        const T wi = psi[i];
        _Pragma("omp simd")
        for (int t = 0; t < m; ++t) alpha[t] += wi * std::max(q[t], T(0));
      }
      std::fill(gt, gt + BW, T(0));
_Pragma("omp simd")
      for (int t = 0; t < m; ++t) alpha[t] = sigmoid(alpha[t]);
      for (int64_t c = 0; c < C_x; ++c) {
        const T *xc = xb + c * HW, *gc = gyb + c * HW;
        _Pragma("omp simd")
        for (int t = 0; t < m; ++t) gt[t] += gc[t] * xc[t];
      }
      for (int t = 0; t < m; ++t) gt[t] *= alpha[t] * (T(1) - alpha[t]);  // d psi logit
      T* part = pp + task * width;
      T *gb_part = part + C_i * (C_x + C_g), *gpsi_part = gb_part + C_i;
      for (int64_t i = 0; i < C_i; ++i) {
        T* q = proj.data() + i * BW;
        const T wi = psi[i];
        T gpsi = 0;
        _Pragma("omp simd reduction(+ : gpsi)")
        for (int t = 0; t < m; ++t) {
          gpsi += gt[t] * std::max(q[t], T(0));
          q[t] = q[t] > T(0) ? wi * gt[t] : T(0);
        }
        gpsi_part[i] += gpsi;
        gb_part[i] += block_sum(q, m);
      }
      gpsi_part[C_i] += block_sum(gt, m);
      for (int64_t c = 0; c < C_x; ++c) {
        const T* gc = gyb + c * HW;
        _Pragma("omp simd")
        for (int t = 0; t < m; ++t) acc[t] = gc[t] * alpha[t];
        project_add(proj.data(), BW, C_i, wxt + c * C_i, m, acc);
        std::copy(acc, acc + m, gxp + (n * C_x + c) * HW + p0);
        const T* xc = xb + c * HW;
        for (int64_t i = 0; i < C_i; ++i) part[i * C_x + c] += dot(proj.data() + i * BW, xc, m);
      }
      T* gw_g = part + C_i * C_x;
      for (int64_t c = 0; c < C_g; ++c) {
        std::fill(acc, acc + BW, T(0));
        project_add(proj.data(), BW, C_i, wgt + c * C_i, m, acc);
        std::copy(acc, acc + m, ggp + (n * C_g + c) * HW + p0);
        const T* gc = gb + c * HW;
        for (int64_t i = 0; i < C_i; ++i) gw_g[i * C_g + c] += dot(proj.data() + i * BW, gc, m);
      }
    });
  });
  return attention_gate_grads(partial.sum(0), gx, gg, x_in, g_in, C_x, C_g, C_i);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("spatial_gate", &spatial_gate_cpu);
  m.impl("spatial_gate_backward", &spatial_gate_backward_cpu);
  m.impl("gated_pointwise", &gated_pointwise_cpu);
  m.impl("gated_pointwise_backward", &gated_pointwise_backward_cpu);
  m.impl("channel_gate", &channel_gate_cpu);
  m.impl("channel_gate_backward", &channel_gate_backward_cpu);
  m.impl("cross_gate", &cross_gate_cpu);
  m.impl("cross_gate_backward", &cross_gate_backward_cpu);
  m.impl("attention_gate", &attention_gate_cpu);
  m.impl("attention_gate_backward", &attention_gate_backward_cpu);
}

}  // namespace gates
}  // namespace fastseg
