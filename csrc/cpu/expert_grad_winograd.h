// The expert and routing gradients of a dynamic 3×3 convolution (stride 1, padding 1, groups 1) in
// the Winograd F(2×2, 3×3) domain: expert_grad3x3.h's contract with 16 products per 2×2 output
// tile where that kernel has 36.
//
// The forward is Y_t = Aᵀ [(G g Gᵀ) ⊙ V_t] A per output tile t (winograd.h), so with
//   V_n[ξ][c][t] = (Bᵀ d B)[ξ]   (d: the 4×4 patch of x_n[c] under tile t),
//   U_n[ξ][o][t] = (A δ Aᵀ)[ξ]   (δ: the 2×2 tile t of grad_out_n[o], zero past the image),
//   Γ_n[ξ][o][c] = Σ_t U_n[ξ][o][t] · V_n[ξ][c][t]      (16 channel products over the tiles),
// a sample's kernel gradient is gW_n[o][c] = Gᵀ Γ_n[·][o][c] G, and by linearity
//   grad_experts[k][o][c] = Gᵀ (Σ_n routing[n][k] · Γ_n[·][o][c]) G,
//   grad_routing[n][k]    = Σ_{o,c} ⟨gW_n[o][c], experts[k][o][c]⟩
//                         = Σ_{ξ,o,c} Γ_n[ξ][o][c] · Ẽ_k[ξ][o][c]
// with Ẽ_k = G experts[k] Gᵀ, the forward's kernel transform. Γ_n is folded into both as soon as a
// register tile of it is summed, as in expert_grad3x3.h: no per-sample gradient is kept.
//
// Why: at LightAWNet's 128 channels at 16² that kernel's products (9 taps × 256 pixels per kernel
// value and sample) ran at ≈ 145 GFLOP/s and held the backward at 1.2× the static convolution's;
// here they are 16 positions × 64 tiles, 2.25× fewer, against transforms of x and grad_out (once
// per sample) and of the experts and their gradients (once per call).
//
// How: the samples run in chunks. Per sample, x is copied channels-last into a zero-padded image
// and its patches transformed vector by vector over channels into V_n [16][tiles][C_in padded to
// JB], and U_n [C_out][16][tiles] is computed from grad_out. Then per chunk a task owns JB = 4
// vectors of input channels and a range of output channels: it transforms its experts into
// Ẽ [16][K][rows][JB] and accumulates Σ_n r·Γ_n in the same layout, with positions outermost (one
// position's Ẽ and sums, ≈ 2 KB per output channel, stay in L2 across the samples), then register
// tiles of RB output channels × JB input channels over a sample's tiles (simd::outer_product_sums:
// per tile, 4 vector loads, RB broadcasts, 4·RB FMAs), and adds its sums, transformed back, to
// grad_experts.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/macros.h"
#include "cpu/expert_grad3x3.h"
#include "cpu/simd.h"
#include "cpu/winograd.h"

namespace fastseg {
namespace expert_grad {

// u[ξ] = (G g Gᵀ)[ξ] (winograd::transform_kernel) for a vector of 3×3 kernels g (tap-major,
// row by row), lane by lane; ξ = 4i + j.
template <typename T>
inline void transform_kernels(const Vec<T> (&g)[kTaps], Vec<T> (&u)[16]) {
  const T half = T(0.5);
  Vec<T> t[4][3];  // G g
  for (int c = 0; c < 3; ++c) {
    t[0][c] = g[c];
    t[1][c] = (g[c] + g[3 + c] + g[6 + c]) * half;
    t[2][c] = (g[c] - g[3 + c] + g[6 + c]) * half;
    t[3][c] = g[6 + c];
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = t[i][0];
    u[4 * i + 1] = (t[i][0] + t[i][1] + t[i][2]) * half;
    u[4 * i + 2] = (t[i][0] - t[i][1] + t[i][2]) * half;
    u[4 * i + 3] = t[i][2];
  }
}
// g = Gᵀ γ G for vectors of 16 values γ[ξ]: the gradient of a 3×3 kernel from the gradient of its
// transform, lane by lane.
template <typename T>
inline void untransform_kernels(const Vec<T> (&gamma)[16], Vec<T> (&g)[kTaps]) {
  const T half = T(0.5);
  Vec<T> s[3][4];  // Gᵀ γ
  for (int j = 0; j < 4; ++j) {
    s[0][j] = gamma[j] + (gamma[4 + j] + gamma[8 + j]) * half;
    s[1][j] = (gamma[4 + j] - gamma[8 + j]) * half;
    s[2][j] = (gamma[4 + j] + gamma[8 + j]) * half + gamma[12 + j];
  }
  for (int a = 0; a < 3; ++a) {
    g[3 * a + 0] = s[a][0] + (s[a][1] + s[a][2]) * half;
    g[3 * a + 1] = (s[a][1] - s[a][2]) * half;
    g[3 * a + 2] = (s[a][1] + s[a][2]) * half + s[a][3];
  }
}

// Values of V and U (the transformed inputs and output gradients) for these sizes.
template <typename T>
int64_t panel_values(int64_t N, int64_t C_in, int64_t C_out, int64_t H, int64_t W) {
  constexpr int L = kLanes<T>, JB = kColumnVectors * L;
  const int64_t tiles = (H + 1) / 2 * ((W + 1) / 2), Cp = (C_in + JB - 1) / JB * JB;
  return N * winograd::kPositions * (tiles * Cp + L + C_out * (tiles + L));
}

// expert_grads3x3's contract (x [N, C_in, H, W], gy [N, C_out, H, W], experts [K, C_out, C_in, 3,
// 3], routing [N, K], all contiguous; writes grad_experts like experts and grad_routing [N, K]).
// The samples run in chunks whose V and U fit `chunk_bytes` (at least one sample per chunk); each
// chunk's sums are transformed back and added to grad_experts.
template <typename T>
void expert_grads3x3_winograd(const T* x, const T* gy, const T* experts, const T* routing,
                              int64_t N, int64_t C_in, int64_t C_out, int64_t H, int64_t W,
                              int64_t K, T* grad_experts, acc_t<T>* grad_routing,
                              int64_t chunk_bytes) {
  constexpr int L = kLanes<T>, CV = kColumnVectors, JB = CV * L, RB = kRowBlock;
  constexpr int XI = winograd::kPositions;
  using simd::Vec;
  const int64_t HW = H * W, R = C_in * kTaps, kernel = C_out * R;
  const int64_t th = (H + 1) / 2, tw = (W + 1) / 2, tiles = th * tw;
  const int64_t Cp = (C_in + JB - 1) / JB * JB;  // V's channels, zero past C_in
  const int64_t hp = 2 * th + 2, wp = 2 * tw + 2;  // the padded image: row and column −1 first
  // A position's plane of V, padded by a vector: planes of a power-of-two size put the 16 values
  // of a transform in one L1 set.
  const int64_t plane = tiles * Cp + L;
  // A row of U: the tiles and a vector more (a tile row's last vector is stored whole, past the
  // row's end; the next row overwrites it).
  const int64_t ut = tiles + L;

  // V [chunk][16][tiles][Cp] and U [chunk][C_out][16][tiles], once per sample.
  const int64_t sample_bytes = panel_values<T>(1, C_in, C_out, H, W) * int64_t(sizeof(T));
  const int64_t chunk = std::clamp<int64_t>(chunk_bytes / sample_bytes, 1, N);
  const winograd::Scratch<T, winograd::Use::panels> panels(
      panel_values<T>(chunk, C_in, C_out, H, W));
  T* const V = panels.data();
  T* const U = V + chunk * XI * plane;
  const int64_t col_blocks = Cp / JB;

  // Tasks: a block of JB input channels × a range of output channels, at most kMaxRows of them
  // (the task's Ẽ and sums: 2 · 16 · K · JB values per output channel), split further only where
  // the channel blocks give a thread fewer than two tasks.
  constexpr int64_t kMaxRows = 64;
  const int64_t want = 2 * at::get_num_threads();
  const int64_t row_splits = std::clamp<int64_t>((want + col_blocks - 1) / col_blocks,
                                                 (C_out + kMaxRows - 1) / kMaxRows,
                                                 std::max<int64_t>(1, (C_out + RB - 1) / RB));
  const int64_t rows_per_task = ((C_out + row_splits - 1) / row_splits + RB - 1) / RB * RB;
  const int64_t row_blocks = (C_out + rows_per_task - 1) / rows_per_task;
  const int64_t tasks = col_blocks * row_blocks;
  std::vector<acc_t<T>> parts(tasks * N * K, acc_t<T>(0));
  const std::vector<T> zeros(tiles, T(0));

  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t count = std::min(chunk, N - n0);
    // V per sample and block of JB channels (a zero-padded channels-last copy of the block, then
    // its patches transformed a vector of channels at a time).
    at::parallel_for(0, count * col_blocks, 1, [&](int64_t begin, int64_t end) {
      const winograd::Scratch<T, winograd::Use::task> pad_scratch(hp * wp * JB);
      T* const pad = pad_scratch.data();
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / col_blocks, c0 = task % col_blocks * JB;
        const int64_t cols = std::min<int64_t>(JB, C_in - c0);
        const T* xn = x + ((n0 + n) * C_in + c0) * HW;
        std::fill(pad, pad + hp * wp * JB, T(0));
        for (int64_t c = 0; c < cols; ++c)
          for (int64_t h = 0; h < H; ++h) {
            const T* src = xn + c * HW + h * W;
            T* dst = pad + ((h + 1) * wp + 1) * JB + c;
            for (int64_t w = 0; w < W; ++w) dst[w * JB] = src[w];
          }
        T* vn = V + n * XI * plane + c0;
        for (int64_t ty = 0; ty < th; ++ty)
          for (int64_t tx = 0; tx < tw; ++tx) {
            const int64_t t = ty * tw + tx;
            for (int64_t c = 0; c < JB; c += L) {
              Vec<T> d[4][4], s[4][4];  // the patch; d B
  #pragma GCC unroll 4
              for (int i = 0; i < 4; ++i)
  #pragma GCC unroll 4
                for (int j = 0; j < 4; ++j)
                  d[i][j] = *reinterpret_cast<const Vec<T>*>(
                      pad + ((2 * ty + i) * wp + 2 * tx + j) * JB + c);
  #pragma GCC unroll 4
              for (int i = 0; i < 4; ++i) {
                s[i][0] = d[i][0] - d[i][2];
                s[i][1] = d[i][1] + d[i][2];
                s[i][2] = d[i][2] - d[i][1];
                s[i][3] = d[i][1] - d[i][3];
              }
              T* out = vn + t * Cp + c;
  #pragma GCC unroll 4
              for (int j = 0; j < 4; ++j) {
                const Vec<T> col[4] = {s[0][j] - s[2][j], s[1][j] + s[2][j], s[2][j] - s[1][j],
                                       s[1][j] - s[3][j]};
  #pragma GCC unroll 4
                for (int i = 0; i < 4; ++i)
                  *reinterpret_cast<Vec<T>*>(out + (4 * i + j) * plane) = col[i];
              }
            }
          }
      }
    });
    // U per sample and output channel, L tiles of a tile row at a time: the row pair's even and odd
    // columns from zero-padded copies of the two rows.
    const int64_t vtw = (tw + L - 1) / L * L;  // a tile row in whole vectors
    at::parallel_for(0, count * C_out, 16, [&](int64_t begin, int64_t end) {
      const winograd::Scratch<T, winograd::Use::task> line_scratch(4 * vtw);
      T* const lines = line_scratch.data();  // rows 2ty and 2ty + 1, 2·vtw values each
      for (int64_t no = begin; no < end; ++no) {
        const T* g = gy + (n0 * C_out + no) * HW;
        T* out_row = U + no * XI * ut;
        for (int64_t ty = 0; ty < th; ++ty) {
          for (int i = 0; i < 2; ++i) {
            T* line = lines + i * 2 * vtw;
            const int64_t h = 2 * ty + i;
            const int64_t copied = h < H ? W : 0;
            if (copied > 0) std::memcpy(line, g + h * W, W * sizeof(T));
            std::fill(line + copied, line + 2 * vtw, T(0));
          }
          for (int64_t tx = 0; tx < tw; tx += L) {
            Vec<T> dl[2][2];  // δ[i][j] of L tiles
            for (int i = 0; i < 2; ++i) {
              const T* line = lines + i * 2 * vtw + 2 * tx;
              const Vec<T> a = simd::load(line), b = simd::load(line + L);
              dl[i][0] = winograd::even_lanes<T>(a, b, winograd::Lanes<T>{});
              dl[i][1] = winograd::odd_lanes<T>(a, b, winograd::Lanes<T>{});
            }
            const Vec<T> m[4][2] = {{dl[0][0], dl[0][1]},  // A δ
                                    {dl[0][0] + dl[1][0], dl[0][1] + dl[1][1]},
                                    {dl[0][0] - dl[1][0], dl[0][1] - dl[1][1]},
                                    {-dl[1][0], -dl[1][1]}};
            T* out = out_row + ty * tw + tx;
  #pragma GCC unroll 4
            for (int a = 0; a < 4; ++a) {  // (A δ) Aᵀ
              *reinterpret_cast<simd::UnalignedVec<T>*>(out + (4 * a + 0) * ut) = m[a][0];
              *reinterpret_cast<simd::UnalignedVec<T>*>(out + (4 * a + 1) * ut) = m[a][0] + m[a][1];
              *reinterpret_cast<simd::UnalignedVec<T>*>(out + (4 * a + 2) * ut) = m[a][0] - m[a][1];
              *reinterpret_cast<simd::UnalignedVec<T>*>(out + (4 * a + 3) * ut) = -m[a][1];
            }
          }
        }
      }
    });

    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      const int64_t S = K * rows_per_task * JB + L;  // one position's values, padded as V's
      const winograd::Scratch<T, winograd::Use::task> task_scratch(2 * XI * S + count * K * L +
                                                                   kTaps * JB);
      T* const et = task_scratch.data();  // Ẽ [16][K][rows][JB]
      T* const st = et + XI * S;          // Σ_n r·Γ_n, the same layout
      T* const dots = st + XI * S;
      T* const taps_buf = dots + count * K * L;  // one row of JB kernels, tap-major
      for (int64_t task = begin; task < end; ++task) {
        const int64_t c0 = task % col_blocks * JB, o0 = task / col_blocks * rows_per_task;
        const int64_t rows = std::min(rows_per_task, C_out - o0);
        const int64_t cols = std::min<int64_t>(JB, C_in - c0);
        std::fill(et, et + XI * S, T(0));
        std::fill(st, st + XI * S, T(0));
        std::fill(dots, dots + count * K * L, T(0));
        // Ẽ a row of JB kernels at a time: their taps gathered tap-major ([9][JB], zero past the
        // block's channels), then transformed a vector at a time.
        std::fill(taps_buf, taps_buf + kTaps * JB, T(0));
        for (int64_t k = 0; k < K; ++k)
          for (int64_t o = 0; o < rows; ++o) {
            const T* e = experts + k * kernel + (o0 + o) * R + c0 * kTaps;
            for (int64_t c = 0; c < cols; ++c)
              for (int tap = 0; tap < kTaps; ++tap) taps_buf[tap * JB + c] = e[c * kTaps + tap];
            T* dst = et + (k * rows_per_task + o) * JB;
            for (int v = 0; v < CV; ++v) {
              Vec<T> gv[kTaps], uv[XI];
              for (int tap = 0; tap < kTaps; ++tap)
                gv[tap] = *reinterpret_cast<const Vec<T>*>(taps_buf + tap * JB + v * L);
              transform_kernels<T>(gv, uv);
              for (int xi = 0; xi < XI; ++xi)
                *reinterpret_cast<Vec<T>*>(dst + xi * S + v * L) = uv[xi];
            }
          }
        for (int xi = 0; xi < XI; ++xi) {
          const T* ex = et + xi * S;
          T* sx = st + xi * S;
          for (int64_t n = 0; n < count; ++n) {
            const T* panel = V + (n * XI + xi) * plane + c0;
            const T* un = U + ((n * C_out + o0) * XI + xi) * ut;
            for (int64_t ob = 0; ob < rows; ob += RB) {
              const int valid = static_cast<int>(std::min<int64_t>(RB, rows - ob));
              const T* g[RB];
              for (int o = 0; o < RB; ++o)
                g[o] = o < valid ? un + (ob + o) * XI * ut : zeros.data();
              Vec<T> acc[RB][CV];
              simd::fill<T, RB, CV>(acc, nullptr);
              simd::outer_product_sums<T, RB, CV>(g, panel, Cp, tiles, acc);
              for (int64_t k = 0; k < K; ++k) {
                const T r = routing[(n0 + n) * K + k];
                T* dk = dots + (n * K + k) * L;
                Vec<T> dot = *reinterpret_cast<const Vec<T>*>(dk);
  #pragma GCC unroll 8
                for (int o = 0; o < RB; ++o) {
                  if (o >= valid) break;
                  const int64_t idx = (k * rows_per_task + ob + o) * JB;
  #pragma GCC unroll 4
                  for (int v = 0; v < CV; ++v) {
                    Vec<T>* s = reinterpret_cast<Vec<T>*>(sx + idx + v * L);
                    dot += *reinterpret_cast<const Vec<T>*>(ex + idx + v * L) * acc[o][v];
                    *s += r * acc[o][v];
                  }
                }
                *reinterpret_cast<Vec<T>*>(dk) = dot;
              }
            }
          }
        }
        acc_t<T>* part = parts.data() + task * N * K + n0 * K;
        for (int64_t i = 0; i < count * K; ++i) {
          acc_t<T> sum = 0;
          for (int l = 0; l < L; ++l) sum += dots[i * L + l];
          part[i] = sum;
        }
        for (int64_t k = 0; k < K; ++k)
          for (int64_t o = 0; o < rows; ++o) {
            T* ge = grad_experts + k * kernel + (o0 + o) * R + c0 * kTaps;
            const T* src = st + (k * rows_per_task + o) * JB;
            for (int v = 0; v < CV; ++v) {
              Vec<T> gv[kTaps], sv[XI];
              for (int xi = 0; xi < XI; ++xi)
                sv[xi] = *reinterpret_cast<const Vec<T>*>(src + xi * S + v * L);
              untransform_kernels<T>(sv, gv);
              for (int tap = 0; tap < kTaps; ++tap)
                *reinterpret_cast<Vec<T>*>(taps_buf + tap * JB + v * L) = gv[tap];
            }
            for (int64_t c = 0; c < cols; ++c)
              for (int tap = 0; tap < kTaps; ++tap)
                ge[c * kTaps + tap] =
                    (n0 > 0 ? ge[c * kTaps + tap] : T(0)) + taps_buf[tap * JB + c];
          }
      }
    });
  }
  for (int64_t i = 0; i < N * K; ++i) {
    acc_t<T> sum = 0;
    for (int64_t task = 0; task < tasks; ++task) sum += parts[task * N * K + i];
    grad_routing[i] = sum;
  }
}

}  // namespace expert_grad
}  // namespace fastseg
