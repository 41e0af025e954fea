// BatchNorm2d fused with the activation after it (fastseg/ops/norm_act.py), NCHW and NHWC, CPU.
//
// ATen runs BatchNorm and its activation as separate passes over the tensor: forward statistics,
// normalise, activate (5 tensor passes); backward activation gradient, two BatchNorm passes (8).
// Here the forward reads x for the statistics, then reads it again and writes y (3 passes); the
// backward recomputes the activation's input from x and the statistics instead of keeping it,
// sums the two per-channel reductions in one pass and writes grad_x in a second (5 passes).
//
// Work split (NCHW): every pass runs over the N·C planes of H·W contiguous values (at::parallel_for);
// per-plane partial sums are kept in double and added per channel afterwards, so the result does
// not depend on the thread count. Within a plane, chunks of kChunk values are summed in the
// input's type by vectorised loops, each chunk's sum then added in double. Channels-last inputs
// are computed in their own layout, over rows of C values (see Tiling below); outputs and
// gradients come back in x's layout.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/attention_gates.h"
#include "cpu/output_cache.h"
#include "utils.h"

namespace fastseg {
namespace bnact {
namespace {

enum Act : int64_t { kIdentity = 0, kRelu = 1, kLeakyRelu = 2, kSilu = 3 };
constexpr int64_t kChunk = 2048;

template <typename T, int64_t A>
inline T act_forward(T z, T slope) {
  if constexpr (A == kRelu) return z > T(0) ? z : T(0);
  else if constexpr (A == kLeakyRelu) return (z > T(0) ? z : T(0)) + slope * (z < T(0) ? z : T(0));
  else if constexpr (A == kSilu) return z * gates::sigmoid(z);
  else return z;
}

// d act(z) / dz, as ATen's backward takes it (ReLU and LeakyReLU: the z > 0 side at z = 0 is 0).
template <typename T, int64_t A>
inline T act_derivative(T z, T slope) {
  if constexpr (A == kRelu) return z > T(0) ? T(1) : T(0);
  else if constexpr (A == kLeakyRelu) return slope + (T(1) - slope) * T(z > T(0));  // branch-free
  else if constexpr (A == kSilu) {
    const T s = gates::sigmoid(z);
    return s * (T(1) + z * (T(1) - s));
  } else return T(1);
}

// The activation before the norm (LGMSNet's Fusion blocks: GELU → BatchNorm): none or GELU.
enum Pre : int64_t { kNone = 0, kGelu = 1 };

// The standard normal's Φ(x) = (1 + erf(x/√2))/2 and exp(−x²/2) of a float, vectorisable, with one
// exp: erf by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7, the formula of ATen's vectorised erf),
// erf(a) = 1 − r(t)·exp(−a²), with the Cephes-polynomial exp of the gates.
inline void normal_cdf_and_gauss(float x, float& cdf, float& gauss) {
  const float a = (x < 0.0f ? -x : x) * 0.70710678f;
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  const float r =
      ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
  gauss = gates::exp_vectorisable(-a * a);
  const float e = 1.0f - r * gauss;
  cdf = 0.5f + 0.5f * (x < 0.0f ? -e : e);
}
inline void normal_cdf_and_gauss(double x, double& cdf, double& gauss) {
  cdf = 0.5 + 0.5 * std::erf(x * 0.70710678118654752);
  gauss = std::exp(-0.5 * x * x);
}

// v = pre(x) (GELU: x·Φ(x)), as ATen's gelu (approximate='none') computes it
template <typename T, int64_t P>
inline T pre_forward(T x) {
  if constexpr (P == kGelu) {
    T cdf, gauss;
    normal_cdf_and_gauss(x, cdf, gauss);
    return x * cdf;
  } else return x;
}

// v = pre(x) and d = pre'(x) (GELU: Φ(x) + x·φ(x), φ(x) = exp(−x²/2)/√(2π), as ATen's
// gelu_backward), sharing Φ(x) and its exp
template <typename T, int64_t P>
inline void pre_both(T x, T& v, T& d) {
  if constexpr (P == kGelu) {
    T cdf, gauss;
    normal_cdf_and_gauss(x, cdf, gauss);
    v = x * cdf;
    d = cdf + x * T(0.39894228040143268) * gauss;
  } else {
    v = x;
    d = T(1);
  }
}

void check(const at::Tensor& x, const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(1), op, ": ", name, " must have shape [",
                    x.size(1), "], got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype");
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " must be on x's device");
}

// Per channel, the sums over its N planes of the per-plane partial sums p1, p2 ([N·C], plane
// n·C + c), in a fixed order: the result does not depend on how the planes were split.
void add_planes(const std::vector<double>& p1, const std::vector<double>& p2, int64_t N, int64_t C,
                std::vector<double>& s1, std::vector<double>& s2) {
  for (int64_t c = 0; c < C; ++c) {
    double a = 0, b = 0;
    for (int64_t n = 0; n < N; ++n) {
      a += p1[n * C + c];
      b += p2[n * C + c];
    }
    s1[c] = a;
    s2[c] = b;
  }
}

// Two per-channel sums over the N·C planes of HW values, planes in parallel: chunk(p, i0, i1, a,
// b) adds plane p's values i0 ≤ i < i1 (at most kChunk of them, summed in T) into a and b; the
// chunks are added per plane in double, the planes per channel by add_planes.
template <typename T, typename F>
void plane_sums(int64_t N, int64_t C, int64_t HW, std::vector<double>& s1, std::vector<double>& s2,
                F&& chunk) {
  std::vector<double> p1(N * C), p2(N * C);
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      double a = 0, b = 0;
      for (int64_t i0 = 0; i0 < HW; i0 += kChunk) {
        T ca = 0, cb = 0;
        chunk(p, i0, std::min(HW, i0 + kChunk), ca, cb);
        a += ca;
        b += cb;
      }
      p1[p] = a;
      p2[p] = b;
    }
  });
  add_planes(p1, p2, N, C, s1, s2);
}

// Σ over a channel's N planes of (v − shift) and (v − shift)², v = pre(x), per channel, in double.
template <typename T, int64_t P>
void channel_moments(const T* x, int64_t N, int64_t C, int64_t HW, std::vector<double>& s1,
                     std::vector<double>& s2) {
  plane_sums<T>(N, C, HW, s1, s2, [&](int64_t p, int64_t i0, int64_t i1, T& ca, T& cb) {
    const T shift = pre_forward<T, P>(x[(p % C) * HW]);  // the channel's first value: keeps the
                                                          // squares small
    const T* xp = x + p * HW;
#pragma omp simd reduction(+ : ca, cb)
    for (int64_t i = i0; i < i1; ++i) {
      const T d = pre_forward<T, P>(xp[i]) - shift;
      ca += d;
      cb += d * d;
    }
  });
}

template <typename T, int64_t A, int64_t P>
void apply(const T* x, const T* scale, const T* shift, T* y, int64_t N, int64_t C, int64_t HW,
           T slope) {
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const T a = scale[p % C], b = shift[p % C], s = slope;  // locals: y cannot alias them
      const T* xp = x + p * HW;
      T* yp = y + p * HW;
      FASTSEG_VECTOR_LOOP
      for (int64_t i = 0; i < HW; ++i) yp[i] = act_forward<T, A>(pre_forward<T, P>(xp[i]) * a + b, s);
    }
  });
}

// ---- channels-last (NHWC): a row-major matrix of N·H·W rows of C values ----
//
// The vector loops run along a row. For narrow C, k consecutive rows form one "wide row" of
// L = k·C values (per-channel parameters tiled k times), so that every inner loop is at least
// kMinWidth long; the R mod k rows left at the end are a tail block of width C. The wide rows are
// cut into blocks of kBlockRows, fixed whatever the thread count: each block's per-lane partial
// sums (in T over at most kBlockRows values, then in double) are added per channel in block order,
// so results do not depend on the thread count.
constexpr int64_t kMinWidth = 128, kBlockRows = 64;

struct Tiling {
  int64_t C, k, L, P, tail, blocks;  // P wide rows; `blocks` counts the tail block too
  Tiling(int64_t rows, int64_t channels) : C(channels) {
    k = std::max<int64_t>(1, (kMinWidth + C - 1) / C);
    L = k * C;
    P = rows / k;
    tail = rows % k;
    blocks = (P + kBlockRows - 1) / kBlockRows + (tail > 0);
  }
  // block b: its first value's offset, its row count and its row width
  void block(int64_t b, int64_t& offset, int64_t& count, int64_t& width) const {
    const int64_t full = (P + kBlockRows - 1) / kBlockRows;
    if (b < full) {
      offset = b * kBlockRows * L;
      count = std::min(P, (b + 1) * kBlockRows) - b * kBlockRows;
      width = L;
    } else {
      offset = P * L;
      count = tail;
      width = C;
    }
  }
  template <typename T>
  std::vector<T> tile(const T* per_channel) const {
    std::vector<T> t(L);
    for (int64_t j = 0; j < L; ++j) t[j] = per_channel[j % C];
    return t;
  }
  // per channel, Σ over blocks and lanes of the per-lane partial sums p ([blocks, L])
  void fold(const std::vector<double>& p, std::vector<double>& s) const {
    std::fill(s.begin(), s.end(), 0.0);
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t j = 0; j < L; ++j) s[j % C] += p[b * L + j];
  }
  // Two per-channel sums over every row, blocks in parallel: rows(offset, count, width, a, q)
  // adds a block's `count` rows of `width` values from `offset` into the zeroed per-lane
  // accumulators a and q (L values each); s1 and s2 get the blocks' partials added per channel.
  template <typename T, typename F>
  void channel_sums(std::vector<double>& s1, std::vector<double>& s2, F&& rows) const {
    std::vector<double> p1(blocks * L, 0.0), p2(blocks * L, 0.0);
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> a(L), q(L);
      for (int64_t b = begin; b < end; ++b) {
        int64_t offset, count, width;
        block(b, offset, count, width);
        std::fill(a.begin(), a.end(), T(0));
        std::fill(q.begin(), q.end(), T(0));
        rows(offset, count, width, a.data(), q.data());
        for (int64_t j = 0; j < width; ++j) {
          p1[b * L + j] = a[j];
          p2[b * L + j] = q[j];
        }
      }
    });
    fold(p1, s1);
    fold(p2, s2);
  }
  // row(offset, width) for every (wide) row, blocks in parallel
  template <typename F>
  void for_each_row(F&& row) const {
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        int64_t offset, count, width;
        block(b, offset, count, width);
        for (int64_t r = 0; r < count; ++r) row(offset + r * width, width);
      }
    });
  }
};

template <typename T, int64_t P>
void channel_moments_nhwc(const T* x, const Tiling& t, std::vector<double>& s1,
                          std::vector<double>& s2) {
  std::vector<T> first(x, x + t.C);  // pre(the first row): keeps the squares small
  for (T& v : first) v = pre_forward<T, P>(v);
  const std::vector<T> shift = t.tile(first.data());
  t.channel_sums<T>(s1, s2, [&](int64_t offset, int64_t count, int64_t width, T* ap, T* qp) {
    const T* sh = shift.data();
    for (int64_t r = 0; r < count; ++r) {
      const T* xr = x + offset + r * width;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const T d = pre_forward<T, P>(xr[j]) - sh[j];
        ap[j] += d;
        qp[j] += d * d;
      }
    }
  });
}

template <typename T, int64_t A, int64_t P>
void apply_nhwc(const T* x, const T* scale, const T* shift, T* y, const Tiling& t, T slope) {
  const std::vector<T> sc = t.tile(scale), sh = t.tile(shift);
  t.for_each_row([&](int64_t offset, int64_t width) {
    const T *a = sc.data(), *b = sh.data(), *xr = x + offset;
    const T s = slope;
    T* yr = y + offset;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) yr[j] = act_forward<T, A>(pre_forward<T, P>(xr[j]) * a[j] + b[j], s);
  });
}

template <typename F>
void dispatch_act(int64_t act, F&& f) {
  switch (act) {
    case kIdentity: return f(std::integral_constant<int64_t, kIdentity>{});
    case kRelu: return f(std::integral_constant<int64_t, kRelu>{});
    case kLeakyRelu: return f(std::integral_constant<int64_t, kLeakyRelu>{});
    case kSilu: return f(std::integral_constant<int64_t, kSilu>{});
    default: TORCH_CHECK_VALUE(false, "batch_norm_act: unknown activation code ", act);
  }
}

template <typename F>
void dispatch_pre(int64_t pre, F&& f) {
  switch (pre) {
    case kNone: return f(std::integral_constant<int64_t, kNone>{});
    case kGelu: return f(std::integral_constant<int64_t, kGelu>{});
    default: TORCH_CHECK_VALUE(false, "batch_norm_act: unknown pre-activation code ", pre);
  }
}

// Returns (y, mean, var): in training the batch's mean and biased variance per channel, in eval
// copies of running_mean and running_var.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_cpu(
    const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& bias_in,
    const at::Tensor& running_mean, const at::Tensor& running_var, bool training, double eps,
    int64_t act, double slope, int64_t pre) {
  constexpr const char* op = "batch_norm_act";
  TORCH_CHECK_VALUE(x_in.dim() == 4, op, ": x must be [N, C, H, W], got ", x_in.sizes());
  check(x_in, weight_in, "weight", op);
  check(x_in, bias_in, "bias", op);
  check(x_in, running_mean, "running_mean", op);
  check(x_in, running_var, "running_var", op);
  // the kernels compute in x's output layout (csrc/utils.h): channels-last or NCHW
  const at::MemoryFormat format = output_memory_format(x_in);
  const bool nhwc = format == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(format), weight = weight_in, bias = bias_in;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  TORCH_CHECK_VALUE(!training || N * HW > 1, op, ": training needs more than one value per channel, got x ",
                    x.sizes());
  at::Tensor y = cpu::empty_output(x.sizes(), x.options(), format);
  at::Tensor mean = at::empty({C}, x.options()), var = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_act_cpu", [&] {
    using T = scalar_t;
    const T* xs = x.data_ptr<T>();
    T *ms = mean.data_ptr<T>(), *vs = var.data_ptr<T>();
    if (training) {
      std::vector<double> s1(C), s2(C);
      dispatch_pre(pre, [&](auto p) {
        constexpr int64_t kPre = decltype(p)::value;
        if (nhwc) channel_moments_nhwc<T, kPre>(xs, Tiling(N * HW, C), s1, s2);
        else channel_moments<T, kPre>(xs, N, C, HW, s1, s2);
      });
      const double M = double(N * HW);
      for (int64_t c = 0; c < C; ++c) {
        const double m = s1[c] / M;  // of v − shift, shift = v's first value in the channel
        const T first = xs[nhwc ? c : c * HW];
        ms[c] = T(m + double(pre == kGelu ? pre_forward<T, kGelu>(first) : first));
        vs[c] = T(std::max(0.0, s2[c] / M - m * m));
      }
    } else {
      const at::Tensor rm = running_mean.contiguous(), rv = running_var.contiguous();
      std::copy_n(rm.data_ptr<T>(), C, ms);
      std::copy_n(rv.data_ptr<T>(), C, vs);
    }
    const at::Tensor w = weight.contiguous(), b = bias.contiguous();
    const T *ws = w.data_ptr<T>(), *bs = b.data_ptr<T>();
    std::vector<T> scale(C), shift(C);
    for (int64_t c = 0; c < C; ++c) {
      const double sc = double(ws[c]) / std::sqrt(double(vs[c]) + eps);
      scale[c] = T(sc);
      shift[c] = T(double(bs[c]) - double(ms[c]) * sc);
    }
    dispatch_act(act, [&](auto a) {
      dispatch_pre(pre, [&](auto p) {
        constexpr int64_t kAct = decltype(a)::value, kPre = decltype(p)::value;
        if (nhwc)
          apply_nhwc<T, kAct, kPre>(xs, scale.data(), shift.data(), y.data_ptr<T>(), Tiling(N * HW, C),
                                    T(slope));
        else
          apply<T, kAct, kPre>(xs, scale.data(), shift.data(), y.data_ptr<T>(), N, C, HW, T(slope));
      });
    });
  });
  return {y, mean, var};
}

// From the per-channel Σ dz and Σ dz·x̂ over M values per channel: grad_bias, grad_weight, and
// the coefficients of grad_x = k1·dz − k2 − k3·x̂ in training, k1·dz in eval (the statistics are
// constants there).
template <typename T>
void input_grad_coefficients(const std::vector<double>& sum_dz, const std::vector<double>& sum_dz_xhat,
                             const T* ws, const T* is, double M, bool training, T* gw, T* gb,
                             std::vector<T>& k1, std::vector<T>& k2, std::vector<T>& k3) {
  for (size_t c = 0; c < k1.size(); ++c) {
    const double s1 = sum_dz[c], s2 = sum_dz_xhat[c];
    gb[c] = T(s1);
    gw[c] = T(s2);
    const double wi = double(ws[c]) * double(is[c]);
    k1[c] = T(wi);
    k2[c] = training ? T(wi * s1 / M) : T(0);
    k3[c] = training ? T(wi * s2 / M) : T(0);
  }
}

template <typename T, int64_t A, int64_t P>
void backward_kernel(const T* xs, const T* gs, const T* ms, const T* is, const T* ws, const T* bs,
                     T* gx, T* gw, T* gb, int64_t N, int64_t C, int64_t HW, bool training, T sl) {
  // pass 1: per channel Σ dz and Σ dz·x̂, dz = g · act'(z), z = x̂·w + b, x̂ = (x − mean)·invstd
  std::vector<double> sum_dz(C), sum_dz_xhat(C);
  plane_sums<T>(N, C, HW, sum_dz, sum_dz_xhat, [&](int64_t p, int64_t i0, int64_t i1, T& c1, T& c2) {
    const int64_t c = p % C;
    const T m = ms[c], inv = is[c], w = ws[c], b = bs[c], s = sl;
    const T *xp = xs + p * HW, *gp = gs + p * HW;
#pragma omp simd reduction(+ : c1, c2)
    for (int64_t i = i0; i < i1; ++i) {
      const T xh = (pre_forward<T, P>(xp[i]) - m) * inv;
      const T dz = gp[i] * act_derivative<T, A>(xh * w + b, s);
      c1 += dz;
      c2 += dz * xh;
    }
  });
  std::vector<T> k1(C), k2(C), k3(C);
  input_grad_coefficients(sum_dz, sum_dz_xhat, ws, is, double(N * HW), training, gw, gb, k1, k2, k3);
  // pass 2: grad_x
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c = p % C;
      // locals, not the captured references: a store through `out` could alias those
      const T m = ms[c], inv = is[c], w = ws[c], b = bs[c], a1 = k1[c], a2 = k2[c], a3 = k3[c], s = sl;
      const T *xp = xs + p * HW, *gp = gs + p * HW;
      T* out = gx + p * HW;
      FASTSEG_VECTOR_LOOP
      for (int64_t i = 0; i < HW; ++i) {
        T v, dv;
        pre_both<T, P>(xp[i], v, dv);
        const T xh = (v - m) * inv;
        const T dz = gp[i] * act_derivative<T, A>(xh * w + b, s);
        out[i] = (a1 * dz - a2 - a3 * xh) * dv;
      }
    }
  });
}

// The NHWC backward: per channel Σ dz and Σ dz·x̂ over blocks of (wide) rows, then grad_x
// (the same two passes as backward_kernel; see Tiling).
template <typename T, int64_t A, int64_t P>
void backward_kernel_nhwc(const T* xs, const T* gs, const T* ms, const T* is, const T* ws,
                          const T* bs, T* gx, T* gw, T* gb, int64_t R, int64_t C, bool training,
                          T sl) {
  const Tiling t(R, C);
  const std::vector<T> mt = t.tile(ms), it = t.tile(is), wt = t.tile(ws), bt = t.tile(bs);
  std::vector<double> sum_dz(C), sum_dz_xhat(C);
  t.channel_sums<T>(sum_dz, sum_dz_xhat, [&](int64_t offset, int64_t count, int64_t width, T* ap,
                                            T* qp) {
    const T *m = mt.data(), *inv = it.data(), *w = wt.data(), *b = bt.data();
    const T s = sl;
    for (int64_t r = 0; r < count; ++r) {
      const T *xr = xs + offset + r * width, *gr = gs + offset + r * width;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const T xh = (pre_forward<T, P>(xr[j]) - m[j]) * inv[j];
        const T dz = gr[j] * act_derivative<T, A>(xh * w[j] + b[j], s);
        ap[j] += dz;
        qp[j] += dz * xh;
      }
    }
  });
  std::vector<T> k1(C), k2(C), k3(C);
  input_grad_coefficients(sum_dz, sum_dz_xhat, ws, is, double(R), training, gw, gb, k1, k2, k3);
  const std::vector<T> k1t = t.tile(k1.data()), k2t = t.tile(k2.data()), k3t = t.tile(k3.data());
  t.for_each_row([&](int64_t offset, int64_t width) {
    const T *m = mt.data(), *inv = it.data(), *w = wt.data(), *b = bt.data();
    const T *a1 = k1t.data(), *a2 = k2t.data(), *a3 = k3t.data();
    const T s = sl;
    const T *xr = xs + offset, *gr = gs + offset;
    T* out = gx + offset;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      T v, dv;
      pre_both<T, P>(xr[j], v, dv);
      const T xh = (v - m[j]) * inv[j];
      const T dz = gr[j] * act_derivative<T, A>(xh * w[j] + b[j], s);
      out[j] = (a1[j] * dz - a2[j] - a3[j] * xh) * dv;
    }
  });
}

// (grad_x, grad_weight, grad_bias) of y = act(BN(x)) given the forward's (mean, var).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& weight_in,
    const at::Tensor& bias_in, const at::Tensor& mean_in, const at::Tensor& var_in, bool training,
    double eps, int64_t act, double slope, int64_t pre) {
  constexpr const char* op = "batch_norm_act_backward";
  TORCH_CHECK_VALUE(grad_in.sizes() == x_in.sizes(), op, ": grad_out must have x's shape");
  // the kernels compute in x's output layout (csrc/utils.h): channels-last or NCHW
  const at::MemoryFormat format = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(format), g = grad_in.to(x.scalar_type()).contiguous(format);
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const at::Tensor mean = mean_in.contiguous(), var = var_in.contiguous();
  const at::Tensor weight = weight_in.contiguous(), bias = bias_in.contiguous();
  at::Tensor grad_x = cpu::empty_output(x.sizes(), x.options(), format);
  at::Tensor grad_weight = at::empty({C}, x.options()), grad_bias = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_act_backward_cpu", [&] {
    std::vector<scalar_t> invstd(C);
    for (int64_t c = 0; c < C; ++c)
      invstd[c] = scalar_t(1.0 / std::sqrt(double(var.data_ptr<scalar_t>()[c]) + eps));
    dispatch_act(act, [&](auto a) {
     dispatch_pre(pre, [&](auto p) {
      constexpr int64_t kAct = decltype(a)::value, kPre = decltype(p)::value;
      const scalar_t *xs = x.data_ptr<scalar_t>(), *gs = g.data_ptr<scalar_t>();
      const scalar_t *ms = mean.data_ptr<scalar_t>(), *ws = weight.data_ptr<scalar_t>();
      const scalar_t* bs = bias.data_ptr<scalar_t>();
      scalar_t *gx = grad_x.data_ptr<scalar_t>(), *gw = grad_weight.data_ptr<scalar_t>();
      scalar_t* gb = grad_bias.data_ptr<scalar_t>();
      if (format == at::MemoryFormat::ChannelsLast)
        backward_kernel_nhwc<scalar_t, kAct, kPre>(xs, gs, ms, invstd.data(), ws, bs, gx, gw, gb, N * HW,
                                             C, training, scalar_t(slope));
      else
        backward_kernel<scalar_t, kAct, kPre>(xs, gs, ms, invstd.data(), ws, bs, gx, gw, gb, N, C,
                                              HW, training, scalar_t(slope));
     });
    });
  });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("batch_norm_act", &batch_norm_act_cpu);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward_cpu);
}

}  // namespace bnact
}  // namespace fastseg
