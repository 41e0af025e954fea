// CPU kernels of dilated_attention2d (forward and backward), flash-style.
//
// Work unit: one problem (sample, parity group, head; common/dilated_attention.h) of L tokens.
// The inputs are first gathered per problem into packed row-major buffers ([L][d]); a task then
// transposes one block of kLanes tokens into vector lanes ([d][kLanes]). Every step of the inner
// loops is a vertical vector operation over those lanes: the scores of one token of the other
// side against kLanes tokens are d broadcast-FMAs, the online softmax's maximum and sum are
// lane-wise, the accumulations are broadcast-FMAs. No score matrix is stored; the backward
// recomputes the probabilities from the saved log-sum-exp.
//
// Forward: one task per (problem, block of kLanes queries); keys in blocks of kKeyBlock (the
// online-softmax rescale happens once per block). Backward, one task per (problem, block of
// kLanes tokens), in two passes that keep every accumulator in registers: dQ with the block's
// queries in lanes, then dK and dV with its keys in lanes. Tasks are handed to the threads one
// at a time (parallel_tasks). Dimensions 8/8 (LGMSNet's heads) are compile-time constants so the
// loops unroll.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/dilated_attention.h"
#include "dilated_attention.h"
#include "cpu/output_cache.h"

namespace fastseg {
namespace attn {
namespace {

// Queries per vector block: one 512-bit vector of lanes (two 256-bit registers on AVX2
// machines, which the compiler splits it into). Written with GCC vector types so that the
// accumulators of a block are registers, not memory the loops read and write back.
template <typename T>
struct Lanes {
  typedef T vec __attribute__((vector_size(64)));
  static constexpr int count = 64 / sizeof(T);
};
template <typename T>
using vec_t = typename Lanes<T>::vec;
template <typename T>
constexpr int kLanes = Lanes<T>::count;
constexpr int kKeyBlock = 64;

template <typename T>
inline __attribute__((always_inline)) vec_t<T> load(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline __attribute__((always_inline)) void store(T* p, vec_t<T> v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename T>
inline __attribute__((always_inline)) vec_t<T> splat(T x) {
  return vec_t<T>{} + x;
}
template <typename V>
inline __attribute__((always_inline)) V vmax(V a, V b) {
  return a > b ? a : b;
}

// Σ_e coef[e] · x[e] lane-wise (x: vectors), in two interleaved partial sums: half the
// dependent-FMA chain of one running sum (the latency that bounds the inner loops).
template <typename T>
inline __attribute__((always_inline)) vec_t<T> dot_lanes(const T* coef, const vec_t<T>* x, int n) {
  vec_t<T> even{}, odd{};
  int e = 0;
  for (; e + 1 < n; e += 2) {
    even += coef[e] * x[e];
    odd += coef[e + 1] * x[e + 1];
  }
  if (e < n) even += coef[e] * x[e];
  return even + odd;
}

// e^x for x ≤ 0, lane-wise: x = n·ln2 + r with |r| ≤ ln2/2, e^r by its degree-6 Taylor
// polynomial (relative error < 2e-7), 2^n through the exponent bits. Below -87 the result is
// clamped to ≈ 1.6e-38 instead of underflowing to denormals and 0.
inline __attribute__((always_inline)) vec_t<float> exp_nonpositive(vec_t<float> x) {
  typedef int32_t ivec __attribute__((vector_size(64)));
  x = vmax(x, splat(-87.0f));
  const vec_t<float> magic = splat(12582912.0f);  // 1.5·2^23: adding it rounds to an integer
  const vec_t<float> shifted = x * 1.44269504f + magic;
  const vec_t<float> n = shifted - magic;
  const vec_t<float> r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  vec_t<float> p = splat(1.0f / 720);
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  ivec e, m;
  std::memcpy(&e, &shifted, sizeof(e));
  std::memcpy(&m, &magic, sizeof(m));
  const ivec bits = (e - m + 127) << 23;
  vec_t<float> scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline __attribute__((always_inline)) vec_t<double> exp_nonpositive(vec_t<double> x) {
  for (int i = 0; i < kLanes<double>; ++i) x[i] = std::exp(x[i]);
  return x;
}

// Strided view of one [N, H, W, heads, c] input and the problem geometry.
struct Geometry {
  int64_t N, H, W, heads, s, Hg, Wg, L;
  Geometry(const at::Tensor& q, int64_t dilation)
      : N(q.size(0)), H(q.size(1)), W(q.size(2)), heads(q.size(3)), s(dilation),
        Hg(H / dilation), Wg(W / dilation), L(Hg * Wg) {}
  int64_t problems() const { return N * s * s * heads; }
};

// Runs body(state, task) for every task in [0, n) on the intra-op threads, handing tasks out
// one at a time: on a machine shared with other work, a thread that gets less of its core then
// takes fewer tasks (at::parallel_for gives each thread one fixed chunk, so the slowest thread
// sets the time). make_state() builds each thread's scratch buffers once.
template <typename MakeState, typename Body>
void parallel_tasks(int64_t n, MakeState make_state, Body body) {
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n)));
#pragma omp parallel num_threads(threads)
  {
    auto state = make_state();
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n; ++task) body(state, task);
  }
}

// A [N, H, W, heads, c] input read through its strides (any layout, no copy): element offset
// of (token t of problem pr, channel e).
struct Strided {
  const void* base;
  int64_t sn, sr, sc, sh, se;  // sample, row, column, head, channel
  static Strided of(const at::Tensor& t) {
    return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
  }
  int64_t offset(const Geometry& g, const Problem& pr, int64_t t, int64_t e) const {
    const int64_t r = pr.a + g.s * (t / g.Wg), c = pr.b + g.s * (t % g.Wg);
    return pr.n * sn + r * sr + c * sc + pr.h * sh + e * se;
  }
};

// rows[t][e] = x[token t][e] (keys, values) for one problem.
template <typename T>
void gather_rows(const Strided& x, const Geometry& g, const Problem& pr, int64_t dim, T* rows) {
  const T* base = static_cast<const T*>(x.base);
  for (int64_t t = 0; t < g.L; ++t)
    for (int64_t e = 0; e < dim; ++e) rows[t * dim + e] = base[x.offset(g, pr, t, e)];
}

// cols[e][t - t0] = x[token t][e] for the tokens t0 .. t0 + count - 1, zero-padded to `width`.
template <typename T>
void gather_cols(const Strided& x, const Geometry& g, const Problem& pr, int64_t dim, int64_t t0,
                 int64_t count, int64_t width, T* cols) {
  const T* base = static_cast<const T*>(x.base);
  for (int64_t e = 0; e < dim; ++e) {
    T* col = cols + e * width;
    for (int64_t i = 0; i < count; ++i) col[i] = base[x.offset(g, pr, t0 + i, e)];
    for (int64_t i = count; i < width; ++i) col[i] = T(0);
  }
}

// Forward of one block of kLanes queries of one problem. K [L][d], V [L][dv] packed; Qt [d][VL]
// (queries in lanes). `work` holds d + dv vectors (used for the dims not fixed at compile time).
// Writes out [count][dv] (row-major, per query) and lse [count].
template <typename T, int D, int DV>
void forward_block(const T* K, const T* V, const T* Qt, int64_t L, int d_rt, int dv_rt, T scale,
                   vec_t<T>* work, T* out_rows, T* lse_block, int count) {
  using vec = vec_t<T>;
  constexpr int VL = kLanes<T>;
  const int d = D > 0 ? D : d_rt, dv = DV > 0 ? DV : dv_rt;
  // Fixed dims: local arrays indexed by constants after unrolling, i.e. registers.
  vec q_fixed[D > 0 ? D : 1], o_fixed[DV > 0 ? DV : 1];
  vec* q = D > 0 ? q_fixed : work;
  vec* o = DV > 0 ? o_fixed : work + d;
  for (int e = 0; e < d; ++e) q[e] = load(Qt + e * VL);
  for (int c = 0; c < dv; ++c) o[c] = vec{};
  vec m = splat(-std::numeric_limits<T>::max()), l = vec{};
  vec st[kKeyBlock];
  for (int64_t k0 = 0; k0 < L; k0 += kKeyBlock) {
    const int nk = static_cast<int>(std::min<int64_t>(kKeyBlock, L - k0));
    vec block_max = m;
    for (int j = 0; j < nk; ++j) {
      const T* kj = K + (k0 + j) * d;
      st[j] = dot_lanes(kj, q, d) * scale;
      block_max = vmax(block_max, st[j]);
    }
    const vec alpha = exp_nonpositive(m - block_max);
    l *= alpha;
    m = block_max;
    for (int c = 0; c < dv; ++c) o[c] *= alpha;
    for (int j = 0; j < nk; ++j) {
      const vec p = exp_nonpositive(st[j] - m);
      l += p;
      const T* vj = V + (k0 + j) * dv;
      for (int c = 0; c < dv; ++c) o[c] += vj[c] * p;
    }
  }
  for (int i = 0; i < count; ++i) {
    const T inv = T(1) / l[i];
    for (int c = 0; c < dv; ++c) out_rows[i * dv + c] = o[c][i] * inv;
    lse_block[i] = m[i] + std::log(l[i]);
  }
}

template <typename T, int D, int DV>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t dilation,
                  double scale_in, at::Tensor& out, at::Tensor& lse) {
  constexpr int VL = kLanes<T>;
  const Geometry g(q, dilation);
  const int d = static_cast<int>(q.size(4)), dv = static_cast<int>(v.size(4));
  const T scale = static_cast<T>(scale_in);
  const int64_t P = g.problems(), L = g.L, blocks = (L + VL - 1) / VL;
  // Keys and values packed per problem once, shared by every query block's task.
  std::vector<T> K(static_cast<size_t>(P * L * d)), V(static_cast<size_t>(P * L * dv));
  const Strided qs = Strided::of(q), ks = Strided::of(k), vs = Strided::of(v);
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const Problem pr = problem_of(p, static_cast<int>(g.s), static_cast<int>(g.heads));
      gather_rows(ks, g, pr, d, K.data() + p * L * d);
      gather_rows(vs, g, pr, dv, V.data() + p * L * dv);
    }
  });
  T* out_p = out.data_ptr<T>();
  T* lse_p = lse.data_ptr<T>();
  // out and lse are contiguous: token (n, r, c, h) at ((n·H + r)·W + c)·heads + h.
  struct Scratch {
    std::vector<T> Qt, rows, lse_block;
    std::vector<vec_t<T>> work;
  };
  parallel_tasks(P * blocks, [&] {
    return Scratch{std::vector<T>(d * VL), std::vector<T>(dv * VL), std::vector<T>(VL),
                   std::vector<vec_t<T>>(d + dv)};
  }, [&](Scratch& scratch, int64_t task) {
    auto& [Qt, rows, lse_block, work] = scratch;
    {
      const int64_t p = task / blocks, t0 = (task % blocks) * VL;
      const int count = static_cast<int>(std::min<int64_t>(VL, L - t0));
      const Problem pr = problem_of(p, static_cast<int>(g.s), static_cast<int>(g.heads));
      gather_cols(qs, g, pr, d, t0, count, VL, Qt.data());
      forward_block<T, D, DV>(K.data() + p * L * d, V.data() + p * L * dv, Qt.data(), L, d, dv,
                              scale, work.data(), rows.data(), lse_block.data(), count);
      for (int i = 0; i < count; ++i) {
        const int64_t token = (pr.n * g.H * g.W + group_pixel(t0 + i, pr.a, pr.b,
                                                              static_cast<int>(g.s), g.Wg, g.W)) *
                                  g.heads + pr.h;
        std::copy(rows.data() + i * dv, rows.data() + (i + 1) * dv, out_p + token * dv);
        lse_p[token] = lse_block[i];
      }
    }
  });
}

// Gradient of one block of kLanes queries (pass A of the backward): queries in lanes, every key
// in turn. K [L][d], V [L][dv] rows; Qt [d][VL], dOt [dv][VL] this block's queries; lse and
// delta vectors of the block (padding lanes: lse huge, so their probabilities vanish).
// Writes dq_rows [count][d]. `work` holds 2·d + dv vectors (for dims not fixed at compile time).
template <typename T, int D, int DV>
void grad_q_block(const T* K, const T* V, const T* Qt, const T* dOt, vec_t<T> lse,
                  vec_t<T> delta, int64_t L, int d_rt, int dv_rt, T scale, vec_t<T>* work,
                  T* dq_rows, int count) {
  using vec = vec_t<T>;
  constexpr int VL = kLanes<T>;
  const int d = D > 0 ? D : d_rt, dv = DV > 0 ? DV : dv_rt;
  vec q_fixed[D > 0 ? D : 1], dq_fixed[D > 0 ? D : 1], do_fixed[DV > 0 ? DV : 1];
  vec* q = D > 0 ? q_fixed : work;
  vec* dq = D > 0 ? dq_fixed : work + d;
  vec* dout = DV > 0 ? do_fixed : work + 2 * d;
  for (int e = 0; e < d; ++e) q[e] = load(Qt + e * VL), dq[e] = vec{};
  for (int c = 0; c < dv; ++c) dout[c] = load(dOt + c * VL);
  for (int64_t j = 0; j < L; ++j) {
    const T* kj = K + j * d;
    const T* vj = V + j * dv;
    const vec p = exp_nonpositive(dot_lanes(kj, q, d) * scale - lse);
    const vec ds = softmax_input_grad(p, dot_lanes(vj, dout, dv), delta);
    for (int e = 0; e < d; ++e) dq[e] += ds * kj[e];
  }
  for (int i = 0; i < count; ++i)
    for (int e = 0; e < d; ++e) dq_rows[i * d + e] = dq[e][i] * scale;
}

// Gradients of one block of kLanes keys (pass B): keys in lanes, every query in turn. Q [L][d],
// dO [L][dv] rows, lse and delta [L]; Kt [d][VL], Vt [dv][VL] this block's keys (padding
// lanes are never written back). Writes dk_rows [count][d], dv_rows [count][dv]. `work` holds
// 2·d + 2·dv vectors.
template <typename T, int D, int DV>
void grad_kv_block(const T* Q, const T* dO, const T* lse, const T* delta, const T* Kt,
                   const T* Vt, int64_t L, int d_rt, int dv_rt, T scale, vec_t<T>* work,
                   T* dk_rows, T* dv_rows, int count) {
  using vec = vec_t<T>;
  constexpr int VL = kLanes<T>;
  const int d = D > 0 ? D : d_rt, dv = DV > 0 ? DV : dv_rt;
  vec k_fixed[D > 0 ? D : 1], dk_fixed[D > 0 ? D : 1], v_fixed[DV > 0 ? DV : 1],
      dv_fixed[DV > 0 ? DV : 1];
  vec* k = D > 0 ? k_fixed : work;
  vec* dk = D > 0 ? dk_fixed : work + d;
  vec* v = DV > 0 ? v_fixed : work + 2 * d;
  vec* dvacc = DV > 0 ? dv_fixed : work + 2 * d + dv;
  for (int e = 0; e < d; ++e) k[e] = load(Kt + e * VL), dk[e] = vec{};
  for (int c = 0; c < dv; ++c) v[c] = load(Vt + c * VL), dvacc[c] = vec{};
  for (int64_t i = 0; i < L; ++i) {
    const T* qi = Q + i * d;
    const T* doi = dO + i * dv;
    const vec p = exp_nonpositive(dot_lanes(qi, k, d) * scale - lse[i]);
    const vec ds = softmax_input_grad(p, dot_lanes(doi, v, dv), splat(delta[i]));
    for (int c = 0; c < dv; ++c) dvacc[c] += p * doi[c];
    for (int e = 0; e < d; ++e) dk[e] += ds * qi[e];
  }
  for (int i = 0; i < count; ++i) {
    for (int e = 0; e < d; ++e) dk_rows[i * d + e] = dk[e][i] * scale;
    for (int c = 0; c < dv; ++c) dv_rows[i * dv + c] = dvacc[c][i];
  }
}

// The backward in two passes that each keep their accumulators in registers: dQ with queries
// in lanes (pass A), dK and dV with keys in lanes (pass B). Each recomputes the probabilities
// from lse and dP = dO·v (twice the score arithmetic of a single pass), but neither writes an
// accumulator back to memory per score nor reduces across lanes.
template <typename T, int D, int DV>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse_in,
                   int64_t dilation, double scale_in, at::Tensor& dq, at::Tensor& dk,
                   at::Tensor& dvt) {
  using vec = vec_t<T>;
  constexpr int VL = kLanes<T>;
  const Geometry g(q, dilation);
  const int d = static_cast<int>(q.size(4)), dv = static_cast<int>(v.size(4));
  const T scale = static_cast<T>(scale_in);
  const int64_t P = g.problems(), L = g.L, blocks = (L + VL - 1) / VL;
  const Strided qs = Strided::of(q), ks = Strided::of(k), vs = Strided::of(v),
                gs = Strided::of(grad_out), os = Strided::of(out);
  const T* lse_base = lse_in.data_ptr<T>();
  const T* out_base = out.data_ptr<T>();
  // Every input packed per problem, row by row, once: both passes read them.
  std::vector<T> Q(P * L * d), K(P * L * d), V(P * L * dv), dO(P * L * dv), lse(P * L),
      delta(P * L);
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const Problem pr = problem_of(p, static_cast<int>(g.s), static_cast<int>(g.heads));
      gather_rows(qs, g, pr, d, Q.data() + p * L * d);
      gather_rows(ks, g, pr, d, K.data() + p * L * d);
      gather_rows(vs, g, pr, dv, V.data() + p * L * dv);
      gather_rows(gs, g, pr, dv, dO.data() + p * L * dv);
      for (int64_t t = 0; t < L; ++t) {
        const int64_t r = pr.a + g.s * (t / g.Wg), c = pr.b + g.s * (t % g.Wg);
        lse[p * L + t] = lse_base[pr.n * lse_in.stride(0) + r * lse_in.stride(1) +
                                  c * lse_in.stride(2) + pr.h * lse_in.stride(3)];
        T sum = 0;
        for (int64_t e = 0; e < dv; ++e)
          sum += dO[(p * L + t) * dv + e] * out_base[os.offset(g, pr, t, e)];
        delta[p * L + t] = sum;
      }
    }
  });
  T* dq_p = dq.data_ptr<T>();
  T* dk_p = dk.data_ptr<T>();
  T* dv_p = dvt.data_ptr<T>();
  const auto token_of = [&](const Problem& pr, int64_t t) {
    return (pr.n * g.H * g.W + group_pixel(t, pr.a, pr.b, static_cast<int>(g.s), g.Wg, g.W)) *
               g.heads + pr.h;
  };
  // Transposes rows [count][dim] (tokens t0…) of one problem into lanes [dim][VL], zero-padded.
  const auto to_lanes = [](const T* rows, int dim, int count, T* lanes) {
    for (int e = 0; e < dim; ++e)
      for (int i = 0; i < VL; ++i) lanes[e * VL + i] = i < count ? rows[i * dim + e] : T(0);
  };
  struct Scratch {
    std::vector<T> Qt, dOt, Kt, Vt, rows_a, rows_b;
    std::vector<vec> work;
  };
  parallel_tasks(P * blocks, [&] {
    return Scratch{std::vector<T>(d * VL), std::vector<T>(dv * VL), std::vector<T>(d * VL),
                   std::vector<T>(dv * VL), std::vector<T>(d * VL), std::vector<T>(dv * VL),
                   std::vector<vec>(2 * d + 2 * dv)};
  }, [&](Scratch& scratch, int64_t task) {
    auto& [Qt, dOt, Kt, Vt, rows_a, rows_b, work] = scratch;
    {
      const int64_t p = task / blocks, t0 = (task % blocks) * VL;
      const int count = static_cast<int>(std::min<int64_t>(VL, L - t0));
      const Problem pr = problem_of(p, static_cast<int>(g.s), static_cast<int>(g.heads));
      const int64_t row0 = p * L + t0;
      // Pass A: the gradient of this block of queries.
      to_lanes(Q.data() + row0 * d, d, count, Qt.data());
      to_lanes(dO.data() + row0 * dv, dv, count, dOt.data());
      vec lse_v = splat(std::numeric_limits<T>::max()), delta_v = vec{};
      for (int i = 0; i < count; ++i) lse_v[i] = lse[row0 + i], delta_v[i] = delta[row0 + i];
      grad_q_block<T, D, DV>(K.data() + p * L * d, V.data() + p * L * dv, Qt.data(), dOt.data(),
                             lse_v, delta_v, L, d, dv, scale, work.data(), rows_a.data(), count);
      for (int i = 0; i < count; ++i)
        std::copy(rows_a.data() + i * d, rows_a.data() + (i + 1) * d,
                  dq_p + token_of(pr, t0 + i) * d);
      // Pass B: the gradients of this block of keys.
      to_lanes(K.data() + row0 * d, d, count, Kt.data());
      to_lanes(V.data() + row0 * dv, dv, count, Vt.data());
      grad_kv_block<T, D, DV>(Q.data() + p * L * d, dO.data() + p * L * dv, lse.data() + p * L,
                              delta.data() + p * L, Kt.data(), Vt.data(), L, d, dv, scale,
                              work.data(), rows_a.data(), rows_b.data(), count);
      for (int i = 0; i < count; ++i) {
        const int64_t token = token_of(pr, t0 + i);
        std::copy(rows_a.data() + i * d, rows_a.data() + (i + 1) * d, dk_p + token * d);
        std::copy(rows_b.data() + i * dv, rows_b.data() + (i + 1) * dv, dv_p + token * dv);
      }
    }
  });
}

void check_cpu(const at::Tensor& q) {
  TORCH_CHECK(q.device().is_cpu(), "dilated_attention2d (cpu): q must be a CPU tensor");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "dilated_attention2d (cpu): q must be float32 or float64, got ", q.scalar_type());
}

// LGMSNet's heads (d_qk = d_v = 8) get unrolled loops; anything else the general ones.
template <typename T, typename Fn>
void dispatch_dims(int64_t d, int64_t dv, Fn&& fn) {
  if (d == 8 && dv == 8)
    fn.template operator()<T, 8, 8>();
  else
    fn.template operator()<T, 0, 0>();
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, int64_t dilation,
                                               double scale) {
  check_cpu(q);
  check_dilated_attention(q, k, v, dilation);
  at::Tensor out = cpu::empty_output(v.sizes(), v.options());
  at::Tensor lse = at::empty(q.sizes().slice(0, 4), q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "dilated_attention2d_cpu", [&] {
    dispatch_dims<scalar_t>(q.size(4), v.size(4), [&]<typename T, int D, int DV>() {
      forward_impl<T, D, DV>(q, k, v, dilation, scale, out, lse);
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, int64_t dilation, double scale) {
  check_cpu(q);
  check_dilated_attention(q, k, v, dilation);
  check_dilated_attention_backward(grad_out, q, v, out, lse);
  at::Tensor dq = cpu::empty_output(q.sizes(), q.options());
  at::Tensor dk = cpu::empty_output(k.sizes(), k.options());
  at::Tensor dv = cpu::empty_output(v.sizes(), v.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "dilated_attention2d_backward_cpu", [&] {
    dispatch_dims<scalar_t>(q.size(4), v.size(4), [&]<typename T, int D, int DV>() {
      backward_impl<T, D, DV>(grad_out, q, k, v, out, lse, dilation, scale, dq, dk, dv);
    });
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("dilated_attention2d", &forward_cpu);
  m.impl("dilated_attention2d_backward", &backward_cpu);
}

}  // namespace attn
}  // namespace fastseg
