// CPU kernels of the attention gates (forward and backward).
//
// Every gate is bandwidth-bound, so each kernel streams its large tensors once or twice and keeps
// intermediates in cache-sized pieces:
// * spatial_gate: blocks of kBlock pixels of one sample; the per-pixel gate is reduced over the
//   channels, then applied while the block is still in cache.
// * gated_pointwise, attention_gate: chunks of pixels of one sample whose matrix product with
//   the stacked 1×1 weights (ATen's GEMM) fits a cache-sized scratch; the gating is fused
//   around it and the backward recomputes the product instead of storing it.
// * channel_gate: one (n, c) plane at a time. The global average of the (upsampled) plane is a
//   weighted sum of the input plane (the resize is linear), so pass 1 reads only x; pass 2
//   writes up(x)·gate + skip once. Backward: pass A applies the resize's adjoint to grad_out
//   (into grad_x) and dots it with x; pass B rescales grad_x in place.
// * cross_gate: one plane at a time, resizing b row by row on the fly.
// Per-block partial sums of the weight gradients are reduced afterwards in a fixed order, so the
// results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "attention_gates.h"
#include "common/attention_gates.h"
#include "utils.h"

namespace fastseg {
namespace gates {
namespace {

// Pixels per vector block: four 512-bit vectors (two AVX2 registers' worth each for float).
template <typename T>
constexpr int kBlock = 256 / sizeof(T);

// Scratch budget of a pixel chunk's matrix product: stays in L2 between GEMM and gating.
constexpr int64_t kChunkBytes = 256 * 1024;

template <typename T>
bool all_finite(const T* p, int64_t n) {
  bool ok = true;
_Pragma("omp simd reduction(&& : ok)")
  for (int64_t i = 0; i < n; ++i) ok = ok && std::abs(p[i]) <= std::numeric_limits<T>::max();
  return ok;
}

void check_cpu(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), op, " (cpu): inputs must be CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              " (cpu): inputs must be float32 or float64, got ", x.scalar_type());
}

// Pixels per GEMM chunk for `rows` output rows: a multiple of the vector block, at most HW.
template <typename T>
int64_t chunk_pixels(int64_t HW, int64_t rows) {
  const int64_t fit = kChunkBytes / static_cast<int64_t>(sizeof(T) * rows);
  return std::min(HW, std::max<int64_t>(kBlock<T>, fit / kBlock<T> * kBlock<T>));
}

// [C, HW] view of sample n of an NCHW-contiguous tensor, columns [p0, p0 + len).
at::Tensor sample_columns(const at::Tensor& t, int64_t n, int64_t p0, int64_t len) {
  return t.select(0, n).view({t.size(1), -1}).narrow(1, p0, len);
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
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  std::atomic<bool> non_finite{false};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spatial_gate_cpu", [&] {
    using T = scalar_t;
    constexpr int BW = kBlock<T>;
    const T *xp = x.data_ptr<T>(), *wp = w.data_ptr<T>(), bias = b_in.item<T>();
    T* yp = y.data_ptr<T>();
    const int64_t blocks = (HW + BW - 1) / BW;
    at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
      T s[BW];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / blocks, p0 = task % blocks * BW;
        const int len = static_cast<int>(std::min<int64_t>(BW, HW - p0));
        const T* xs = xp + n * C * HW + p0;
        T* ys = yp + n * C * HW + p0;
        for (int t = 0; t < BW; ++t) s[t] = bias;
        bool ok = true;
        for (int64_t c = 0; c < C; ++c) {
          const T* xc = xs + c * HW;
          const T wc = wp[c];
_Pragma("omp simd reduction(&& : ok)")
          for (int t = 0; t < len; ++t) {
            s[t] += wc * xc[t];
            ok = ok && std::abs(xc[t]) <= std::numeric_limits<T>::max();
          }
        }
        if (!ok) non_finite = true;
        for (int t = 0; t < len; ++t) s[t] = sigmoid(s[t]);
        for (int64_t c = 0; c < C; ++c) {
          const T* xc = xs + c * HW;
          T* yc = ys + c * HW;
_Pragma("omp simd")
          for (int t = 0; t < len; ++t) yc[t] = xc[t] * s[t];
        }
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
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor partial;  // [tasks, C + 1]: Σ gz·x per channel, then Σ gz
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spatial_gate_backward_cpu", [&] {
    using T = scalar_t;
    constexpr int BW = kBlock<T>;
    const T *xp = x.data_ptr<T>(), *gyp = gy.data_ptr<T>(), *wp = w.data_ptr<T>();
    const T bias = b_in.item<T>();
    T* gxp = gx.data_ptr<T>();
    const int64_t blocks = (HW + BW - 1) / BW;
    partial = at::empty({N * blocks, C + 1}, x.options());
    T* pp = partial.data_ptr<T>();
    at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
      T s[BW], gz[BW];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / blocks, p0 = task % blocks * BW;
        const int len = static_cast<int>(std::min<int64_t>(BW, HW - p0));
        const int64_t base = n * C * HW + p0;
        for (int t = 0; t < BW; ++t) s[t] = bias, gz[t] = 0;
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

// --- gated_pointwise ---------------------------------------------------------------------------

at::Tensor gated_pointwise_cpu(const at::Tensor& a_in, const at::Tensor& w_s, const at::Tensor& b_s,
                               const at::Tensor& w_a, const at::Tensor& w_b, const at::Tensor& bias_in) {
  constexpr const char* op = "gated_pointwise";
  check_cpu(op, a_in);
  check_gated_pointwise(op, a_in, w_s, b_s, w_a, w_b);
  const int64_t N = a_in.size(0), C_out = w_a.size(0), H = a_in.size(2), W = a_in.size(3), HW = H * W;
  check_vector(op, "bias", bias_in, C_out, a_in);
  const at::Tensor a = a_in.contiguous(), bias = bias_in.contiguous();
  const at::Tensor weight = stacked_weight(w_s, w_a, w_b);
  const int64_t rows = 2 * C_out + 1;
  at::Tensor y = at::empty({N, C_out, H, W}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "gated_pointwise_cpu", [&] {
    using T = scalar_t;
    constexpr int BW = kBlock<T>;
    const int64_t chunk = chunk_pixels<T>(HW, rows);
    at::Tensor scratch = at::empty({rows * chunk}, a.options());
    const T *bp = bias.data_ptr<T>(), b_att = b_s.item<T>();
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t p0 = 0; p0 < HW; p0 += chunk) {
        const int64_t len = std::min(chunk, HW - p0);
        at::Tensor prod = scratch.narrow(0, 0, rows * len).view({rows, len});
        at::mm_out(prod, weight, sample_columns(a, n, p0, len));  // [W_a·a; W_b·a; w_s·a]
        const T* pp = prod.data_ptr<T>();
        T* yp = y.data_ptr<T>() + n * C_out * HW + p0;
        at::parallel_for(0, (len + BW - 1) / BW, 1, [&](int64_t begin, int64_t end) {
          T s[BW];
          for (int64_t blk = begin; blk < end; ++blk) {
            const int64_t q0 = blk * BW;
            const int m = static_cast<int>(std::min<int64_t>(BW, len - q0));
            const T* logit = pp + 2 * C_out * len + q0;
            for (int t = 0; t < m; ++t) s[t] = sigmoid(logit[t] + b_att);
            for (int64_t o = 0; o < C_out; ++o) {
              const T *u = pp + o * len + q0, *v = pp + (C_out + o) * len + q0;
              T* yo = yp + o * HW + q0;
              const T bo = bp[o];
_Pragma("omp simd")
              for (int t = 0; t < m; ++t) yo[t] = u[t] + s[t] * v[t] + bo;
            }
          }
        });
      }
    }
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
  const at::Tensor a = a_in.contiguous(), gy = gy_in.contiguous();
  const at::Tensor weight = stacked_weight(w_s, w_a, w_b);
  at::Tensor ga = at::empty_like(a, at::MemoryFormat::Contiguous);
  at::Tensor gw = at::zeros({rows, C_in}, a.options());       // d/d[W_a; W_b; w_s]
  at::Tensor gbias = at::zeros({rows}, a.options());          // Σ over pixels of the stacked grads
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "gated_pointwise_backward_cpu", [&] {
    using T = scalar_t;
    constexpr int BW = kBlock<T>;
    const int64_t chunk = chunk_pixels<T>(HW, rows);
    at::Tensor scratch = at::empty({2, rows * chunk}, a.options());
    const T b_att = b_s.item<T>();
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t p0 = 0; p0 < HW; p0 += chunk) {
        const int64_t len = std::min(chunk, HW - p0);
        const at::Tensor a_cols = sample_columns(a, n, p0, len);
        at::Tensor prod = scratch[0].narrow(0, 0, rows * len).view({rows, len});
        at::Tensor grad = scratch[1].narrow(0, 0, rows * len).view({rows, len});
        at::mm_out(prod, weight, a_cols);
        const T* pp = prod.data_ptr<T>();
        T* gp = grad.data_ptr<T>();
        const T* gyp = gy.data_ptr<T>() + n * C_out * HW + p0;
        // grad rows: [grad_y; s·grad_y; d logit], the gradient of [W_a·a; W_b·a; w_s·a].
        at::parallel_for(0, (len + BW - 1) / BW, 1, [&](int64_t begin, int64_t end) {
          T s[BW], gs[BW];
          for (int64_t blk = begin; blk < end; ++blk) {
            const int64_t q0 = blk * BW;
            const int m = static_cast<int>(std::min<int64_t>(BW, len - q0));
            const T* logit = pp + 2 * C_out * len + q0;
            for (int t = 0; t < m; ++t) s[t] = sigmoid(logit[t] + b_att), gs[t] = 0;
            for (int64_t o = 0; o < C_out; ++o) {
              const T *v = pp + (C_out + o) * len + q0, *g = gyp + o * HW + q0;
              T *gu = gp + o * len + q0, *gv = gp + (C_out + o) * len + q0;
_Pragma("omp simd")
              for (int t = 0; t < m; ++t) {
                gu[t] = g[t];
                gv[t] = s[t] * g[t];
                gs[t] += g[t] * v[t];
              }
            }
            T* gl = gp + 2 * C_out * len + q0;
            for (int t = 0; t < m; ++t) gl[t] = gs[t] * s[t] * (T(1) - s[t]);
          }
        });
        at::Tensor ga_cols = sample_columns(ga, n, p0, len);
        at::mm_out(ga_cols, weight.t(), grad);
        gw.addmm_(grad, a_cols.t());
        gbias.add_(grad.sum(1));
      }
    }
  });
  return {to_output_layout(ga, a_in), gw.narrow(0, 2 * C_out, 1).clone(),
          gbias.narrow(0, 2 * C_out, 1).clone(), gw.narrow(0, 0, C_out).clone(),
          gw.narrow(0, C_out, C_out).clone(), gbias.narrow(0, 0, C_out).clone()};
}

// --- bilinear resize of planes -----------------------------------------------------------------

// The taps of every output position along one axis, as separate arrays (vectorisable gathers).
template <typename T>
struct AxisTaps {
  std::vector<int> i0, i1;
  std::vector<T> l0, l1;
  std::vector<T> weight_sum;  // Σ over outputs of the weight each input gets: the adjoint of 1
  AxisTaps(int in, int out, bool align_corners)
      : i0(out), i1(out), l0(out), l1(out), weight_sum(in, T(0)) {
    const T scale = resize_scale<T>(in, out, align_corners);
    for (int o = 0; o < out; ++o) {
      const Taps<T> t = resize_taps<T>(o, in, out, scale, align_corners);
      i0[o] = t.i0, i1[o] = t.i1, l0[o] = t.l0, l1[o] = t.l1;
      weight_sum[t.i0] += t.l0;
      weight_sum[t.i1] += t.l1;
    }
  }
};

// row[c] = resized plane at output row r, c < cols.i0.size().
template <typename T>
void resize_row(const T* plane, int in_w, const AxisTaps<T>& rows, const AxisTaps<T>& cols, int r,
                T* row) {
  const T *top = plane + static_cast<int64_t>(rows.i0[r]) * in_w,
          *bottom = plane + static_cast<int64_t>(rows.i1[r]) * in_w;
  const T wt = rows.l0[r], wb = rows.l1[r];
  const int *c0 = cols.i0.data(), *c1 = cols.i1.data();
  const T *l0 = cols.l0.data(), *l1 = cols.l1.data();
  const int W = static_cast<int>(cols.i0.size());
_Pragma("omp simd")
  for (int c = 0; c < W; ++c)
    row[c] = wt * (l0[c] * top[c0[c]] + l1[c] * top[c1[c]]) +
             wb * (l0[c] * bottom[c0[c]] + l1[c] * bottom[c1[c]]);
}

// plane += the resize's adjoint applied to output row r (`row`); `tmp` holds in_w values.
template <typename T>
void resize_row_adjoint(const T* row, const AxisTaps<T>& rows, const AxisTaps<T>& cols, int r,
                        int in_w, T* tmp, T* plane) {
  std::fill(tmp, tmp + in_w, T(0));
  const int W = static_cast<int>(cols.i0.size());
  for (int c = 0; c < W; ++c) {  // a scatter: sequential
    tmp[cols.i0[c]] += cols.l0[c] * row[c];
    tmp[cols.i1[c]] += cols.l1[c] * row[c];
  }
  T *top = plane + static_cast<int64_t>(rows.i0[r]) * in_w,
    *bottom = plane + static_cast<int64_t>(rows.i1[r]) * in_w;
  const T wt = rows.l0[r], wb = rows.l1[r];
_Pragma("omp simd")
  for (int c = 0; c < in_w; ++c) top[c] += wt * tmp[c];
_Pragma("omp simd")
  for (int c = 0; c < in_w; ++c) bottom[c] += wb * tmp[c];
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
  at::Tensor y = at::empty({s.N, s.C, s.H, s.W}, x.options());
  std::atomic<bool> non_finite{false}, skip_non_finite{false};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_gate_cpu", [&] {
    using T = scalar_t;
    const AxisTaps<T> rows(s.h, s.H, false), cols(s.w, s.W, false);
    const at::Tensor gate = excitation(plane_means(x, s, rows, cols, non_finite), w1, w2).second;
    const T *xp = x.data_ptr<T>(), *gp = gate.data_ptr<T>();
    const T* sp = skip.defined() ? skip.data_ptr<T>() : nullptr;
    T* yp = y.data_ptr<T>();
    const int64_t out_plane = s.H * s.W;
    at::parallel_for(0, s.N * s.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc) {
        const T g = gp[nc];
        if (sp && !all_finite(sp + nc * out_plane, out_plane)) skip_non_finite = true;
        for (int r = 0; r < s.H; ++r) {
          T* row = yp + nc * out_plane + r * s.W;
          resize_row(xp + nc * s.h * s.w, static_cast<int>(s.w), rows, cols, r, row);
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
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
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
      std::vector<T> tmp(s.w);
      for (int64_t nc = begin; nc < end; ++nc) {
        T* u = gxp + nc * in_plane;
        std::fill(u, u + in_plane, T(0));
        for (int r = 0; r < s.H; ++r)
          resize_row_adjoint(gyp + nc * out_plane + r * s.W, rows, cols, r, static_cast<int>(s.w),
                             tmp.data(), u);
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

at::Tensor cross_gate_cpu(const at::Tensor& a_in, const at::Tensor& b_in, bool align_corners) {
  constexpr const char* op = "cross_gate";
  check_cpu(op, a_in);
  check_cross_gate(op, a_in, b_in);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t NC = a.size(0) * a.size(1);
  const int H = a.size(2), W = a.size(3), h = b.size(2), w = b.size(3);
  at::Tensor y = at::empty_like(a, at::MemoryFormat::Contiguous);
  std::atomic<bool> a_non_finite{false}, b_non_finite{false};
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "cross_gate_cpu", [&] {
    using T = scalar_t;
    const AxisTaps<T> rows(h, H, align_corners), cols(w, W, align_corners);
    const T *ap = a.data_ptr<T>(), *bp = b.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    at::parallel_for(0, NC, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> gate(W);
      for (int64_t nc = begin; nc < end; ++nc) {
        const T* bplane = bp + nc * h * w;
        if (!all_finite(ap + nc * H * W, int64_t(H) * W)) a_non_finite = true;
        if (!all_finite(bplane, int64_t(h) * w)) b_non_finite = true;
        for (int r = 0; r < H; ++r) {
          resize_row(bplane, w, rows, cols, r, gate.data());
          const T* ar = ap + (nc * H + r) * W;
          T* yr = yp + (nc * H + r) * W;
          for (int c = 0; c < W; ++c) yr[c] = ar[c] * sigmoid(gate[c]);
        }
      }
    });
  });
  TORCH_CHECK_VALUE(!a_non_finite, "cross_gate: a contains NaN or inf");
  TORCH_CHECK_VALUE(!b_non_finite, "cross_gate: b contains NaN or inf");
  return to_output_layout(y, a_in);
}

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
  at::Tensor ga = at::empty_like(a, at::MemoryFormat::Contiguous);
  at::Tensor gb = at::empty_like(b, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "cross_gate_backward_cpu", [&] {
    using T = scalar_t;
    const AxisTaps<T> rows(h, H, align_corners), cols(w, W, align_corners);
    const T *ap = a.data_ptr<T>(), *bp = b.data_ptr<T>(), *gyp = gy.data_ptr<T>();
    T *gap = ga.data_ptr<T>(), *gbp = gb.data_ptr<T>();
    at::parallel_for(0, NC, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> gate(W), tmp(w);
      for (int64_t nc = begin; nc < end; ++nc) {
        T* gbplane = gbp + nc * h * w;
        std::fill(gbplane, gbplane + int64_t(h) * w, T(0));
        for (int r = 0; r < H; ++r) {
          resize_row(bp + nc * h * w, w, rows, cols, r, gate.data());
          const int64_t o = (nc * H + r) * W;
          for (int c = 0; c < W; ++c) {
            const T sg = sigmoid(gate[c]);
            gap[o + c] = gyp[o + c] * sg;
            gate[c] = gyp[o + c] * ap[o + c] * sg * (T(1) - sg);  // d resized b
          }
          resize_row_adjoint(gate.data(), rows, cols, r, w, tmp.data(), gbplane);
        }
      }
    });
  });
  return {to_output_layout(ga, a_in), to_output_layout(gb, b_in)};
}

// --- attention_gate ----------------------------------------------------------------------------

at::Tensor attention_gate_cpu(const at::Tensor& x_in, const at::Tensor& g_in, const at::Tensor& w_x,
                              const at::Tensor& w_g, const at::Tensor& b_in, const at::Tensor& psi_w_in,
                              const at::Tensor& psi_b) {
  constexpr const char* op = "attention_gate";
  check_cpu(op, x_in);
  check_attention_gate(op, x_in, g_in, w_x, w_g, b_in, psi_w_in, psi_b);
  const at::Tensor x = x_in.contiguous(), g = g_in.contiguous(), b = b_in.contiguous(),
                   psi_w = psi_w_in.contiguous();
  const int64_t N = x.size(0), C_x = x.size(1), C_i = w_x.size(0), HW = x.size(2) * x.size(3);
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attention_gate_cpu", [&] {
    using T = scalar_t;
    constexpr int BW = kBlock<T>;
    const int64_t chunk = chunk_pixels<T>(HW, C_i);
    at::Tensor scratch = at::empty({C_i * chunk}, x.options());
    const T *bp = b.data_ptr<T>(), *psi = psi_w.data_ptr<T>(), psi_bias = psi_b.item<T>();
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t p0 = 0; p0 < HW; p0 += chunk) {
        const int64_t len = std::min(chunk, HW - p0);
        at::Tensor proj = scratch.narrow(0, 0, C_i * len).view({C_i, len});
        at::mm_out(proj, w_x, sample_columns(x, n, p0, len));
        proj.addmm_(w_g, sample_columns(g, n, p0, len));
        const T* pp = proj.data_ptr<T>();
        const T* xs = x.data_ptr<T>() + n * C_x * HW + p0;
        T* ys = y.data_ptr<T>() + n * C_x * HW + p0;
        at::parallel_for(0, (len + BW - 1) / BW, 1, [&](int64_t begin, int64_t end) {
          T alpha[BW];
          for (int64_t blk = begin; blk < end; ++blk) {
            const int64_t q0 = blk * BW;
            const int m = static_cast<int>(std::min<int64_t>(BW, len - q0));
            for (int t = 0; t < BW; ++t) alpha[t] = psi_bias;
            for (int64_t i = 0; i < C_i; ++i) {
              const T* pi = pp + i * len + q0;
              const T bi = bp[i], wi = psi[i];
_Pragma("omp simd")
              for (int t = 0; t < m; ++t) alpha[t] += wi * std::max(pi[t] + bi, T(0));
            }
            for (int t = 0; t < m; ++t) alpha[t] = sigmoid(alpha[t]);
            for (int64_t c = 0; c < C_x; ++c) {
              const T* xc = xs + c * HW + q0;
              T* yc = ys + c * HW + q0;
_Pragma("omp simd")
              for (int t = 0; t < m; ++t) yc[t] = xc[t] * alpha[t];
            }
          }
        });
      }
    }
  });
  return to_output_layout(y, x_in);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_gate_backward_cpu(const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& g_in,
                            const at::Tensor& w_x, const at::Tensor& w_g, const at::Tensor& b_in,
                            const at::Tensor& psi_w_in, const at::Tensor& psi_b) {
  constexpr const char* op = "attention_gate_backward";
  check_cpu(op, x_in);
  check_attention_gate(op, x_in, g_in, w_x, w_g, b_in, psi_w_in, psi_b);
  check_feature(op, "grad_out", gy_in, x_in);
  TORCH_CHECK(gy_in.sizes() == x_in.sizes(), op, ": grad_out must have x's shape");
  const at::Tensor x = x_in.contiguous(), g = g_in.contiguous(), gy = gy_in.contiguous(),
                   b = b_in.contiguous(), psi_w = psi_w_in.contiguous();
  const int64_t N = x.size(0), C_x = x.size(1), C_i = w_x.size(0), HW = x.size(2) * x.size(3);
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor gg = at::empty_like(g, at::MemoryFormat::Contiguous);
  at::Tensor gw_x = at::zeros_like(w_x, at::MemoryFormat::Contiguous);
  at::Tensor gw_g = at::zeros_like(w_g, at::MemoryFormat::Contiguous);
  at::Tensor gb = at::zeros({C_i}, x.options());
  at::Tensor gpsi = at::zeros({C_i + 1}, x.options());  // d psi_w, then d psi_b
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attention_gate_backward_cpu", [&] {
    using T = scalar_t;
    constexpr int BW = kBlock<T>;
    const int64_t chunk = chunk_pixels<T>(HW, C_i);
    const int64_t max_blocks = (chunk + BW - 1) / BW;
    at::Tensor scratch = at::empty({C_i * chunk}, x.options());
    at::Tensor partial = at::empty({max_blocks, C_i + 1}, x.options());
    const T *bp = b.data_ptr<T>(), *psi = psi_w.data_ptr<T>(), psi_bias = psi_b.item<T>();
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t p0 = 0; p0 < HW; p0 += chunk) {
        const int64_t len = std::min(chunk, HW - p0), blocks = (len + BW - 1) / BW;
        const at::Tensor x_cols = sample_columns(x, n, p0, len), g_cols = sample_columns(g, n, p0, len);
        at::Tensor proj = scratch.narrow(0, 0, C_i * len).view({C_i, len});
        at::mm_out(proj, w_x, x_cols);
        proj.addmm_(w_g, g_cols);
        T* pp = proj.data_ptr<T>();
        T* part = partial.data_ptr<T>();
        const int64_t base = n * C_x * HW + p0;
        const T *xs = x.data_ptr<T>() + base, *gys = gy.data_ptr<T>() + base;
        T* gxs = gx.data_ptr<T>() + base;
        // proj becomes d(W_x·x + W_g·g) in place; grad_x gets its gating term here and its
        // projection term from the GEMM below.
        at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
          T alpha[BW], gt[BW];
          for (int64_t blk = begin; blk < end; ++blk) {
            const int64_t q0 = blk * BW;
            const int m = static_cast<int>(std::min<int64_t>(BW, len - q0));
            for (int t = 0; t < BW; ++t) alpha[t] = psi_bias, gt[t] = 0;
            for (int64_t i = 0; i < C_i; ++i) {
              const T* pi = pp + i * len + q0;
              const T bi = bp[i], wi = psi[i];
_Pragma("omp simd")
              for (int t = 0; t < m; ++t) alpha[t] += wi * std::max(pi[t] + bi, T(0));
            }
            for (int t = 0; t < m; ++t) alpha[t] = sigmoid(alpha[t]);
            for (int64_t c = 0; c < C_x; ++c) {
              const T *xc = xs + c * HW + q0, *gc = gys + c * HW + q0;
              T* gxc = gxs + c * HW + q0;
_Pragma("omp simd")
              for (int t = 0; t < m; ++t) {
                gt[t] += gc[t] * xc[t];
                gxc[t] = gc[t] * alpha[t];
              }
            }
            T* pb = part + blk * (C_i + 1);
            T sum_gt = 0;
            for (int t = 0; t < m; ++t) {
              gt[t] *= alpha[t] * (T(1) - alpha[t]);  // d psi logit
              sum_gt += gt[t];
            }
            pb[C_i] = sum_gt;
            for (int64_t i = 0; i < C_i; ++i) {
              T* pi = pp + i * len + q0;
              const T bi = bp[i], wi = psi[i];
              T gpsi_i = 0;
_Pragma("omp simd reduction(+ : gpsi_i)")
              for (int t = 0; t < m; ++t) {
                const T q = pi[t] + bi;
                gpsi_i += gt[t] * std::max(q, T(0));
                pi[t] = q > T(0) ? wi * gt[t] : T(0);
              }
              pb[i] = gpsi_i;
            }
          }
        });
        gpsi.add_(partial.narrow(0, 0, blocks).sum(0));
        gb.add_(proj.sum(1));
        sample_columns(gx, n, p0, len).addmm_(w_x.t(), proj);
        at::Tensor gg_cols = sample_columns(gg, n, p0, len);
        at::mm_out(gg_cols, w_g.t(), proj);
        gw_x.addmm_(proj, x_cols.t());
        gw_g.addmm_(proj, g_cols.t());
      }
    }
  });
  return {to_output_layout(gx, x_in), to_output_layout(gg, g_in), gw_x, gw_g, gb,
          gpsi.narrow(0, 0, C_i).view({1, C_i}).clone(), gpsi.narrow(0, C_i, 1).clone()};
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
