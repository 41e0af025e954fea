// The expert and routing gradients of a dynamic 3×3 convolution (stride 1, padding 1, groups 1),
// from x and grad_out, with no per-sample weight gradient ever in memory. With j = c·9 + tap a
// column of a kernel row (the experts' own layout [K][C_out][C_in·9]):
//   gW_n[o][j]            = Σ_p gy_n[o][p] · col_n[p][j]      (col_n: what tap j reads at pixel p)
//   grad_experts[k][o][j] = Σ_n routing[n][k] · gW_n[o][j]
//   grad_routing[n][k]    = Σ_{o,j} experts[k][o][j] · gW_n[o][j]
//
// Why: at small images with many channels (LightAWNet's 128 and 256 channels at 8² and 16²) the
// gemm plan's weight side, per-sample BLAS products one cache-sized block at a time and passes
// that reduce their results afterwards, ran at about half the machine's FMA rate (the BLAS packing
// every small block anew, the reductions reading every gradient block back).
//
// How: tasks own a block of JB = 4 vectors of kernel columns for a range of output channels. Per
// sample a task writes its columns of col_n once, pixel-major ([P][JB], what a GEMM would pack),
// and runs a register tile of RB output channels × JB columns over the sample's pixels (per pixel:
// 4 vector loads, RB broadcasts of grad_out, 4·RB FMAs). The finished tiles of a group of up to
// 8 samples are folded together into grad_experts (Σ_n routing[n][k] · tile_n, in place: the task
// owns those columns; the first group stores) and into per-sample routing sums (⟨experts[k],
// tile_n⟩), read straight from the experts, each expert row once per group; with a single group
// (N ≤ 8) the gradients are stored non-temporally (see fold_expert). Routing gradients:
// partial sums per task, summed in task order afterwards (deterministic).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/macros.h"
#include "cpu/simd.h"

namespace fastseg {
namespace expert_grad {

using simd::kLanes;
using simd::load;
using simd::UnalignedVec;
using simd::Vec;

constexpr int kRowBlock = simd::kOuterRows;
constexpr int kColumnVectors = simd::kOuterVectors;
constexpr int kTaps = 9;

// acc[o][v] = Σ_{p<P} g[o][p] · panel[p·JB + v·L]: one tile's sums over a sample's pixels.
template <typename T, int RB>
__attribute__((always_inline)) inline void tile_sums(const T* const* g, const T* panel, int64_t P,
                                                     Vec<T> (&acc)[RB][kColumnVectors]) {
  simd::fill<T, RB, kColumnVectors>(acc, nullptr);
  simd::outer_product_sums<T, RB, kColumnVectors>(g, panel, kColumnVectors * kLanes<T>, P, acc);
}

// panel[p][jj] = what kernel column j0 + jj reads at output pixel p of sample x_n [C_in, H, W]
// (0 in the padding and for columns ≥ C_in·9). Row by row of output pixels: a row's part of the
// panel (W·JB values, 8 KB at W = 32 in float32) stays in L1 while its columns are written with a
// stride of JB; column by column over the whole panel, every write missed L1 (38 % of the
// backward at 8 × 64 at 32² on a Xeon).
template <typename T>
void fill_panel(const T* xn, int64_t C_in, int64_t H, int64_t W, int64_t j0, T* panel) {
  constexpr int JB = kColumnVectors * kLanes<T>;
  for (int64_t i = 0; i < H; ++i) {
    T* const row = panel + i * W * JB;
    for (int64_t jj = 0; jj < JB; ++jj) {
      const int64_t j = j0 + jj, c = j / kTaps, ky = j % kTaps / 3 - 1, kx = j % 3 - 1;
      const int64_t yi = i + ky;
      T* const dst = row + jj;
      if (c >= C_in || yi < 0 || yi >= H) {
        for (int64_t w = 0; w < W; ++w) dst[w * JB] = T(0);
        continue;
      }
      const T* const src = xn + (c * H + yi) * W + kx;  // src[w] = x_n[c][yi][w + kx]
      const int64_t lo = kx < 0 ? 1 : 0, hi = kx > 0 ? W - 1 : W;
      if (lo > 0) dst[0] = T(0);
      for (int64_t w = lo; w < hi; ++w) dst[w * JB] = src[w];
      if (hi < W) dst[(W - 1) * JB] = T(0);
    }
  }
}

// The same in float32, 16 pixels × 16 columns at a time: the 16 columns' source rows (in a
// zero-padded copy of the sample's planes of the block's input channels, made once) loaded as
// vectors and transposed in registers, then stored as 16 pixels' runs of 16 columns. The scalar
// fill above took 14 % of the backward at 8 × 64 at 32² on a Xeon, a third of the expert
// gradients' time. The copy was made per output row before, three rows per channel, each row a
// memcpy call (64 bytes at 16²): in `perf` of the backward at 8 × 128 at 16², fill_panel took
// 4.6 % of the samples and memmove, those calls among others, 1.6 %.
inline void fill_panel(const float* xn, int64_t C_in, int64_t H, int64_t W, int64_t j0,
                       float* panel) {
  constexpr int JB = kColumnVectors * kLanes<float>, V = 16;
  static_assert(JB % V == 0, "a panel row is whole runs of 16 columns");
  // padded[c − c0][1 + h][1 + w] = x_n[c][h][w]; zeros around, room for a vector load from any
  // column ≤ W + 1
  const int64_t c0 = j0 / kTaps, channels = std::min(C_in, (j0 + JB - 1) / kTaps + 1) - c0;
  const int64_t Wp = W + 2 + V, plane = (H + 2) * Wp;
  thread_local std::vector<float> padded;
  padded.assign(channels * plane, 0.f);  // channels ≥ 1: j0 < C_in·9
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t h = 0; h < H; ++h) {
      const float* __restrict from = xn + ((c0 + c) * H + h) * W;
      float* __restrict to = padded.data() + c * plane + (h + 1) * Wp + 1;
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) to[w] = from[w];
    }
  const float* src[JB];  // per column: its source row for output row 0 (null: zeros)
  for (int64_t jj = 0; jj < JB; ++jj) {
    const int64_t j = j0 + jj, c = j / kTaps, ky = j % kTaps / 3 - 1, kx = j % 3 - 1;
    src[jj] = c < C_in ? padded.data() + (c - c0) * plane + (ky + 1) * Wp + 1 + kx : nullptr;
  }
  for (int64_t i = 0; i < H; ++i) {
    for (int64_t w0 = 0; w0 < W; w0 += V) {
      const int64_t pixels = std::min<int64_t>(V, W - w0);
      float* dst = panel + (i * W + w0) * JB;
      for (int g = 0; g < JB; g += V) {
        simd::Float32x16 v[V];
#pragma GCC unroll 16
        for (int t = 0; t < V; ++t)
          v[t] = src[g + t] != nullptr ? simd::load16(src[g + t] + i * Wp + w0)
                                       : simd::Float32x16{};
        simd::transpose16(v);  // v[l][t]: pixel w0 + l, column g + t
        for (int64_t l = 0; l < pixels; ++l) simd::store16(dst + l * JB + g, v[l]);
      }
    }
  }
}

// One register tile's sums, kept while the rest of its group of samples is summed.
template <typename T>
struct Tile {
  Vec<T> v[kRowBlock][kColumnVectors];
};

// Samples whose tiles are folded together: their routing sums stay in registers (8 + 3 vectors;
// at most 8, simd::dispatch_up_to_8's range).
constexpr int kFoldSamples = 8;

// Folds NS samples' finished tiles into one expert k: its gradient rows
//   g[o][v] (+)= Σ_i r[i·K] · tiles[i][o][v]      (r: routing[n][k] of the group's samples n)
// stored where `first` (the first samples: nothing is there yet), else added; and the routing
// sums dots[i·K·L] += e[o][v] · tiles[i][o][v] (one vector per sample, summed over lanes later).
// e and g are the expert's and its gradient's rows (row_stride apart), of which `valid` are the
// tile's. Each value of e and g is read once per group of samples, not once per sample: folded
// per sample (a sample's panel, 64 KB at 16², passing through L1 between two folds), the folds
// took a sixth of the kernel's samples in `perf` at 256 channels × 16² on a Xeon. Stream (with
// `first`, where no later group adds to g, and g's rows aligned to the vector): g is written with
// non-temporal stores, so its lines are not read from memory before they are overwritten.
template <typename T, int RB, int NS, bool Stream>
__attribute__((always_inline)) inline void fold_expert(const Tile<T>* tiles, const T* r, int64_t K,
                                                       const T* e, T* g, int64_t row_stride,
                                                       int valid, bool first, T* dots) {
  constexpr int L = kLanes<T>;
  Vec<T> dot[NS];
  T rk[NS];
#pragma GCC unroll 8
  for (int i = 0; i < NS; ++i) {
    dot[i] = *reinterpret_cast<const Vec<T>*>(dots + i * K * L);
    rk[i] = r[i * K];
  }
  for (int o = 0; o < valid; ++o) {
#pragma GCC unroll 4
    for (int v = 0; v < kColumnVectors; ++v) {
      const int64_t at = o * row_stride + v * L;
      Vec<T> sum = first ? Vec<T>{} : load(g + at);
      const Vec<T> ev = load(e + at);
#pragma GCC unroll 8
      for (int i = 0; i < NS; ++i) {
        const Vec<T> a = tiles[i].v[o][v];
        sum += rk[i] * a;
        dot[i] += ev * a;
      }
      if constexpr (Stream)
        simd::stream<T>(g + at, sum);
      else
        *reinterpret_cast<UnalignedVec<T>*>(g + at) = sum;
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < NS; ++i) *reinterpret_cast<Vec<T>*>(dots + i * K * L) = dot[i];
}

// x [N, C_in, H, W], gy [N, C_out, H, W], experts [K, C_out, C_in, 3, 3], routing [N, K], all
// contiguous. Writes grad_experts (like experts) and grad_routing [N, K]. A task keeps the panels
// of a block of samples, at most `budget` bytes of them (at least one sample's), in L2.
template <typename T>
void expert_grads3x3(const T* x, const T* gy, const T* experts, const T* routing, int64_t N,
                     int64_t C_in, int64_t C_out, int64_t H, int64_t W, int64_t K, T* grad_experts,
                     acc_t<T>* grad_routing, int64_t budget) {
  constexpr int L = kLanes<T>, CV = kColumnVectors, JB = CV * L, RB = kRowBlock;
  const int64_t P = H * W, R = C_in * kTaps, kernel = C_out * R;
  const int64_t col_blocks = (R + JB - 1) / JB;
  // Rows split only where the column blocks alone give a thread fewer than two tasks.
  const int64_t want = 2 * at::get_num_threads();
  const int64_t row_splits = std::min((want + col_blocks - 1) / col_blocks, (C_out + RB - 1) / RB);
  const int64_t rows_per_task = ((C_out + row_splits - 1) / row_splits + RB - 1) / RB * RB;
  const int64_t row_blocks = (C_out + rows_per_task - 1) / rows_per_task;
  const int64_t tasks = col_blocks * row_blocks;
  std::vector<acc_t<T>> parts(tasks * N * K, acc_t<T>(0));
  const std::vector<T> zeros(P, T(0));
  const int64_t samples = std::clamp<int64_t>(budget / (P * JB * int64_t(sizeof(T))), 1, N);
  // whether one group of samples folds every gradient value (one block of samples, one group)
  const bool one_group = samples == N && N <= kFoldSamples;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> panel_buf(samples * P * JB + L), dot_buf(samples * K * L + L);
    std::vector<Tile<T>> tile_buf(kFoldSamples);
    Tile<T>* const tiles = tile_buf.data();
    T* const panels = simd::aligned(panel_buf.data());
    T* const dots = simd::aligned(dot_buf.data());
    // A partial last column block works on zero-padded copies of its experts and gradients.
    std::vector<T> tail_e, tail_g;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t j0 = task % col_blocks * JB, o0 = task / col_blocks * rows_per_task;
      const int64_t rows = std::min(rows_per_task, C_out - o0), cols = std::min<int64_t>(JB, R - j0);
      const T* e = experts + o0 * R + j0;
      T* ge = grad_experts + o0 * R + j0;
      int64_t e_kstride = kernel, e_rstride = R;
      if (cols < JB) {
        tail_e.assign(K * rows * JB, T(0));
        tail_g.resize(K * rows * JB);  // every value stored by the first group's fold
        for (int64_t k = 0; k < K; ++k)
          for (int64_t o = 0; o < rows; ++o)
            std::copy(e + k * kernel + o * R, e + k * kernel + o * R + cols,
                      tail_e.data() + (k * rows + o) * JB);
        e = tail_e.data(), ge = tail_g.data(), e_kstride = rows * JB, e_rstride = JB;
      }
      // Where a single group of samples folds each gradient value once, the values are streamed
      // to grad_experts (simd::stream: at 256 channels its 9.4 MB would otherwise be read from
      // memory only to be overwritten) if its rows are aligned to the vector; not a partial last
      // block's scratch copy, which is read back at once (and whose alignment the heap decides).
      // The backward op, 8 alternating rounds of 100 calls at batch 8, medians, plain /
      // streamed: 5.91 / 5.61 ms at 256 channels, 8²; 18.3 / 17.7 at 256, 16²; 4.59 / 4.50 at
      // 128, 16² (the folds' `perf` samples at 256, 8²: 2416 → 1999).
      const bool stream = one_group && cols == JB && simd::is_aligned(ge) &&
                          simd::is_aligned(ge + e_rstride) && simd::is_aligned(ge + e_kstride);
      acc_t<T>* part = parts.data() + task * N * K;
      for (int64_t n0 = 0; n0 < N; n0 += samples) {
        const int64_t count = std::min(samples, N - n0);
        for (int64_t n = 0; n < count; ++n)
          fill_panel(x + (n0 + n) * C_in * P, C_in, H, W, j0, panels + n * P * JB);
        std::fill(dots, dots + count * K * L, T(0));
        // Per tile: the sums of a group of samples, then the group folded into every expert's
        // gradient rows and routing sums while those rows are read once (see fold_expert).
        for (int64_t ob = 0; ob < rows; ob += RB) {
          const int valid = static_cast<int>(std::min<int64_t>(RB, rows - ob));
          for (int64_t n1 = 0; n1 < count; n1 += kFoldSamples) {
            const int group = static_cast<int>(std::min<int64_t>(kFoldSamples, count - n1));
            for (int i = 0; i < group; ++i) {
              const int64_t n = n0 + n1 + i;
              const T* g[RB];
              for (int o = 0; o < RB; ++o)
                g[o] = o < valid ? gy + (n * C_out + o0 + ob + o) * P : zeros.data();
              Vec<T> acc[RB][CV];
              tile_sums<T, RB>(g, panels + (n1 + i) * P * JB, P, acc);
              std::copy(&acc[0][0], &acc[0][0] + RB * CV, &tiles[i].v[0][0]);
            }
            const bool first = n0 + n1 == 0;  // no pass zeroes grad_experts beforehand
            for (int64_t k = 0; k < K; ++k) {
              const int64_t off = k * e_kstride + ob * e_rstride;
              const T* r = routing + (n0 + n1) * K + k;
              T* dk = dots + (n1 * K + k) * L;
              simd::dispatch_up_to_8(group, [&]<int NS>() {  // 1 ≤ group ≤ kFoldSamples = 8
                if constexpr (NS > 0) {
                  if (stream)  // the one group: first
                    fold_expert<T, RB, NS, true>(tiles, r, K, e + off, ge + off, e_rstride, valid,
                                                 true, dk);
                  else
                    fold_expert<T, RB, NS, false>(tiles, r, K, e + off, ge + off, e_rstride, valid,
                                                  first, dk);
                }
              });
            }
          }
        }
        for (int64_t i = 0; i < count * K; ++i) {
          acc_t<T> sum = 0;
          for (int l = 0; l < L; ++l) sum += dots[i * L + l];
          part[n0 * K + i] = sum;
        }
      }
      if (cols < JB)
        for (int64_t k = 0; k < K; ++k)
          for (int64_t o = 0; o < rows; ++o)
            std::copy(tail_g.data() + (k * rows + o) * JB, tail_g.data() + (k * rows + o) * JB + cols,
                      grad_experts + k * kernel + (o0 + o) * R + j0);
    }
    simd::stream_fence();
  });
  for (int64_t i = 0; i < N * K; ++i) {
    acc_t<T> sum = 0;
    for (int64_t task = 0; task < tasks; ++task) sum += parts[task * N * K + i];
    grad_routing[i] = sum;
  }
}

}  // namespace expert_grad
}  // namespace fastseg
