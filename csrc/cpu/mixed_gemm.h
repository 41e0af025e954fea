// The gemm plan's forward products for groups 1: y_n = W_n · col_n (+ b_n) for every sample, with
// W_n = Σ_k routing[n][k] · experts[k] mixed a few rows at a time, and no BLAS call per block.
//   y[n][o][p] = b[n][o] + Σ_j W_n[o][j] · col[n][j][p]       (j < R = C_in·kh·kw, p < P)
//
// Why: at small images (LightAWNet's 256 channels at 8²) every sample's kernel is as large as its
// im2col, so the BLAS packs a block of each per-sample kernel for a product of only P = 64
// columns; the forward ran at ≈ 80 GFLOP/s there, half of oneDNN's static convolution.
//
// How: tasks are tiles of RB output channels; a thread runs its tiles over one chunk of the
// reduction (C columns of the kernel rows, C rows of im2col) at a time, for a block of samples.
// Per chunk it first mixes those C columns of all its tiles' rows for the block's samples (each
// expert value read once per block of samples), then, sample by sample, runs every one of its
// tiles over the chunk: per kernel column j, PV vector loads of col[n][j], RB broadcasts of the
// mixed rows, RB·PV FMAs. The accumulators start at the mixed bias in the first chunk and at y's
// partial sums in the others. A sample's chunk of im2col (32 KB) is built by the thread itself,
// into L1, where it stays while every tile of the thread reads it (the im2col rows are not
// stored: before, one pass over the batch wrote them, 4.7 MB at 8 × 256 channels at 8², and
// every thread read them all back from L3; see im2col_rows in dynamic_conv.cpp). With each tile
// running over a chunk of every sample in turn before the next tile (chunks of 64 KB, from L2),
// the forward op took 3.02 ms against 2.80 (8 × 256 channels at 8², 8 alternating rounds of 100
// calls, medians, with the im2col pass); chunks of 16 KB: 3.08 (y's partial sums, loaded and
// stored per chunk, twice as often). Before that, with the whole reduction per tile, each tile
// read every sample's im2col again, from L3 once a block of samples' im2col outgrew L2 (4.7 MB
// at 8 × 256 channels at 8²: 78 % of the kernel's samples on those loads on a Xeon).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "common/macros.h"
#include "cpu/finite.h"
#include "cpu/simd.h"

namespace fastseg {
namespace mixed_gemm {

using simd::kLanes;
using simd::Vec;

constexpr int kRowBlock = simd::kOuterRows;
constexpr int kPixelVectors = simd::kOuterVectors;
constexpr int64_t kL1Bytes = int64_t(32) << 10;  // a sample's chunk of im2col rows (see above)

// One tile: RB rows (w[o] the mixed rows, `steps` columns) × PV vectors of pixels from pixel p0 of
// col's rows (P values each). first: the sums start at b (0 where null), else at y's; stores the
// valid rows and the pixels < P of y. A last vector that passes the row's end reads into the next
// row (or the buffer's padding) and those lanes are not stored.
template <typename T, int RB, int PV>
__attribute__((always_inline)) inline void tile(const T* const* w, const T* col, int64_t steps,
                                                int64_t p0, bool first, const T* b, int valid,
                                                T* y, int64_t P) {
  constexpr int L = kLanes<T>;
  Vec<T> acc[RB][PV];
  if (first) {
    simd::fill<T, RB, PV>(acc, b);
  } else {
    for (int o = 0; o < RB; ++o)
      for (int v = 0; v < PV; ++v) {
        const int64_t p = p0 + v * L;
        // rows ≥ valid are computed, not stored: they start at 0
        acc[o][v] = o < valid ? simd::load_lanes<T>(y + o * P + p,
                                                    static_cast<int>(std::min<int64_t>(L, P - p)))
                              : Vec<T>{};
      }
  }
  simd::outer_product_sums<T, RB, PV>(w, col + p0, P, steps, acc);
  for (int o = 0; o < std::min(valid, RB); ++o)  // (≤ RB: GCC cannot tell, and warns on AVX2)
    for (int v = 0; v < PV; ++v) {
      const int64_t p = p0 + v * L;
      simd::store_lanes<T>(y + o * P + p, acc[o][v], static_cast<int>(std::min<int64_t>(L, P - p)));
    }
}

// im2col(n, j0, j1, out) writes rows j0 .. j1 − 1 of sample n's im2col ([R][P]) to out, which
// has room for one vector more; experts [K][C_out][R], bias [N][C_out] (mixed) or null, y
// [N][C_out][P]. mix(n0, count, o0, rows, j0, cols, out) writes
// columns j0 .. j0 + cols − 1 of the mixed kernel rows o0 .. o0 + rows − 1 of samples n0 .. n0 +
// count − 1 to out ([count][rows][cols]). `budget` bytes bound a thread's mixed rows of one chunk
// for a block of samples (at least one sample), and a chunk of one sample's im2col rows is at
// most kL1Bytes and budget / 8 (at least one column; tests shrink the budget).
// Returns false where the experts hold a NaN or inf (checked as they are first read).
template <typename T, typename Im2col, typename Mix>
bool forward(const Im2col& im2col, const T* experts, const Mix& mix, const T* bias,
             int64_t N, int64_t C_out, int64_t R, int64_t P, int64_t K, T* y, int64_t budget) {
  constexpr int L = kLanes<T>, RB = kRowBlock, PV = kPixelVectors;
  const int64_t tiles = (C_out + RB - 1) / RB, item = sizeof(T);
  // A sample's chunk of im2col rows fits L1 and is used by every tile of the thread in turn; the
  // thread's tiles' mixed rows of the chunk for a block of samples fit the budget.
  const int64_t chunk = std::clamp<int64_t>(std::min(kL1Bytes, budget / 8) / (P * item), 1, R);
  const int64_t per_thread = (tiles + at::get_num_threads() - 1) / at::get_num_threads();
  const int64_t samples =
      std::clamp<int64_t>(budget / (per_thread * RB * chunk * item), 1, N);
  std::atomic<bool> finite{true};
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    const int64_t tile_values = samples * RB * chunk;  // one tile's mixed rows, [n][rows][cols]
    // not zero-filled (0.54 MB per thread at 256 channels, 8²): mix writes every value read
    const std::unique_ptr<T[]> mixed(new T[(end - begin) * tile_values]);
    // a sample's chunk of im2col rows, vector-aligned, with a vector of room after it
    const std::unique_ptr<T[]> cols_buffer(new T[chunk * P + 2 * L]());
    T* const cn = simd::aligned(cols_buffer.get());
    for (int64_t n0 = 0; n0 < N; n0 += samples) {
      const int64_t count = std::min(samples, N - n0);
      for (int64_t j0 = 0; j0 < R; j0 += chunk) {
        const int64_t cols = std::min(chunk, R - j0);
        const bool first = j0 == 0;  // the sums start at the bias
        for (int64_t t = begin; t < end; ++t) {
          const int64_t o0 = t * RB;
          const int valid = static_cast<int>(std::min<int64_t>(RB, C_out - o0));
          if (n0 == 0)
            for (int k = 0; k < K; ++k)
              for (int o = 0; o < valid; ++o)
                if (!all_finite(experts + (k * C_out + o0 + o) * R + j0, cols)) finite = false;
          mix(n0, count, o0, valid, j0, cols, mixed.get() + (t - begin) * tile_values);
        }
        for (int64_t n = 0; n < count; ++n) {
          im2col(n0 + n, j0, j0 + cols, cn);
          for (int64_t t = begin; t < end; ++t) {
            const int64_t o0 = t * RB;
            const int valid = static_cast<int>(std::min<int64_t>(RB, C_out - o0));
            const T* mt = mixed.get() + (t - begin) * tile_values;
            // rows past C_out (valid < RB) repeat the last one: computed, not stored
            const T* w[RB];
            for (int o = 0; o < RB; ++o) w[o] = mt + (n * valid + std::min(o, valid - 1)) * cols;
            const T* b = bias != nullptr ? bias + (n0 + n) * C_out + o0 : nullptr;
            T bias_rows[RB] = {};
            if (b != nullptr) std::copy(b, b + valid, bias_rows);
            T* yn = y + ((n0 + n) * C_out + o0) * P;
            const T* br = b != nullptr ? bias_rows : nullptr;
            int64_t p0 = 0;
            for (; p0 + PV * L <= P; p0 += PV * L)
              tile<T, RB, PV>(w, cn, cols, p0, first, br, valid, yn, P);
            switch ((P - p0 + L - 1) / L) {  // the last 1–4 vectors, the last one maybe partial
              case 4: tile<T, RB, 4>(w, cn, cols, p0, first, br, valid, yn, P); break;
              case 3: tile<T, RB, 3>(w, cn, cols, p0, first, br, valid, yn, P); break;
              case 2: tile<T, RB, 2>(w, cn, cols, p0, first, br, valid, yn, P); break;
              case 1: tile<T, RB, 1>(w, cn, cols, p0, first, br, valid, yn, P); break;
              default: break;
            }
          }
        }
      }
    }
  });
  return finite;
}

}  // namespace mixed_gemm
}  // namespace fastseg
