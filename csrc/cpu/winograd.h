// A Winograd F(2×2, 3×3) convolution (stride 1, padding 1, dilation 1, groups 1) of NCHW-contiguous
// tensors, with a kernel per sample: y_n = conv(x_n, w_n) + b_n — the same contract as
// direct_conv::conv3x3, with 16 products per 2×2 output tile where the direct convolution has 36.
//
// Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A for every 4×4 input patch d (2×2 output tile) and 3×3 kernel g:
//   Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1], G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1],
//   Aᵀ = [1 1 1 0; 0 1 −1 −1].
// Per sample the kernels are transformed once (U_ξ[co][ci], ξ = 4·i + j the 16 positions), and per
// task (a sample's block of tile rows): the input patches are transformed into 16 panels
// V_ξ[ci][tiles], the 16 channel products M_ξ = U_ξ · V_ξ run on csrc/cpu/pointwise.h's
// register-blocked tile (the panels are written in its layout), and the output transform turns
// M back into 2×2 tiles. A task's panels and products are sized to a cache budget (1 MB from
// dynamic_conv.cpp).
//
// Why: at 16–128 channels direct_conv's tile runs near the machine's FMA rate, so fewer
// multiplications is what is left: 2.25× fewer here, against transforms that cost ≈ 8 adds per
// input and per output value and channel; they weigh most at few channels. Measured through
// dynamic_conv2d (bench/RESULTS.md, "Ops: `dynamic_conv2d`"): 1.15–1.38× the direct convolution's
// speed at 64 and 128 channels, about the same at 16 → 32 and 32, slower at 16 → 16.
//
// Patches of L consecutive tiles are read from deinterleaved copies of the padded input rows:
// E[i] = row[2i], O[i] = row[2i+1], so the patch columns 2·tx + 0..3 of L tiles are E[tx..],
// O[tx..], E[tx+1..], O[tx+1..]: four vector loads, no gathers. The output transform interleaves
// the two columns of L tiles back into 2·L contiguous pixels.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "cpu/direct_conv.h"
#include "cpu/finite.h"
#include "cpu/pointwise.h"
#include "cpu/simd.h"

namespace fastseg {
namespace winograd {

using simd::kLanes;
using simd::load;
using simd::UnalignedVec;
using simd::Vec;

constexpr int kPositions = 16;  // a transformed 4×4 tile

// Whether an image W wide has rows of 2×2 tiles narrower than a vector of T (item bytes each):
// conv3x3 then packs them across rows and gathers and scatters them lane by lane.
inline bool narrow_rows(int64_t W, int64_t item) { return (W + 1) / 2 * item < simd::kVectorBytes; }

// Even and odd lanes of the 2·L values a, b; and the reverse: lanes of a and b interleaved.
template <typename T, std::size_t... I>
inline Vec<T> even_lanes(Vec<T> a, Vec<T> b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, (2 * I)...);
}
template <typename T, std::size_t... I>
inline Vec<T> odd_lanes(Vec<T> a, Vec<T> b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, (2 * I + 1)...);
}
// first half: a0 b0 a1 b1 …; second half: the same from lane L/2
template <typename T, std::size_t... I>
inline Vec<T> interleave_low(Vec<T> a, Vec<T> b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, (I % 2 ? kLanes<T> + I / 2 : I / 2)...);
}
template <typename T, std::size_t... I>
inline Vec<T> interleave_high(Vec<T> a, Vec<T> b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b,
                                 (I % 2 ? kLanes<T> + kLanes<T> / 2 + I / 2 : kLanes<T> / 2 + I / 2)...);
}
template <typename T>
using Lanes = std::make_index_sequence<kLanes<T>>;

// u[ξ·stride] = (G g Gᵀ)[ξ] for one 3×3 kernel g (row-major).
template <typename T>
inline void transform_kernel(const T* g, T* u, int64_t stride) {
  T t[4][3];  // G g
  for (int c = 0; c < 3; ++c) {
    const T g0 = g[c], g1 = g[3 + c], g2 = g[6 + c];
    t[0][c] = g0;
    t[1][c] = T(0.5) * (g0 + g1 + g2);
    t[2][c] = T(0.5) * (g0 - g1 + g2);
    t[3][c] = g2;
  }
  for (int i = 0; i < 4; ++i) {  // (G g) Gᵀ
    u[(4 * i + 0) * stride] = t[i][0];
    u[(4 * i + 1) * stride] = T(0.5) * (t[i][0] + t[i][1] + t[i][2]);
    u[(4 * i + 2) * stride] = T(0.5) * (t[i][0] - t[i][1] + t[i][2]);
    u[(4 * i + 3) * stride] = t[i][2];
  }
}

// Tile rows per task: as many as keep the task's panels and products (16 · (C_in + C_out) values
// per tile) within `budget` bytes, but at least two tasks per thread where the image has the
// rows (a batch of one is split), evened out over the image's tile rows.
inline int64_t tile_rows_per_task(int64_t C_in, int64_t C_out, int64_t N, int64_t th, int64_t twp,
                                  int64_t item, int64_t budget) {
  const int64_t per_row = kPositions * (C_in + C_out) * twp * item;
  return direct_conv::rows_per_thread_task(
      th, std::clamp<int64_t>(budget / std::max<int64_t>(1, per_row), 1, th), N);
}

// Scratch memory of `values` values, aligned to the vector. Up to kKeptBytes it is the calling
// thread's buffer for its Use, kept between calls (no allocation and no page faults per call:
// 1 MB of transformed kernels faulted in afresh cost 0.1–0.2 ms of a 1 ms call); larger requests
// get memory of their own, freed with the Scratch.
enum class Use { kernels, task };
constexpr int64_t kKeptBytes = int64_t(8) << 20;

template <typename T, Use use>
class Scratch {
 public:
  explicit Scratch(int64_t values) {
    const int64_t size = values + kLanes<T>;
    T* base;
    if (size * int64_t(sizeof(T)) <= kKeptBytes) {
      thread_local std::vector<T> kept;
      if (static_cast<int64_t>(kept.size()) < size) kept.resize(size);
      base = kept.data();
    } else {
      own_.reset(new T[size]);
      base = own_.get();
    }
    data_ = simd::aligned(base);
  }
  T* data() const { return data_; }

 private:
  std::unique_ptr<T[]> own_;
  T* data_;
};

// y [N, C_out, H, W] = conv3x3(x [N, C_in, H, W], w_n) + b_n; arguments as direct_conv::conv3x3's
// (w_stride 0: one kernel for all samples; `mix`: kernels mixed while they are transformed; bias
// + n·b_stride or null). `budget`: bytes of one task's panels and products; `chunk_bytes`: of
// one chunk's transformed kernels (direct_conv::chunk_samples).
template <typename T>
direct_conv::Finite conv3x3(const T* x, const T* w, int64_t w_stride,
                            const direct_conv::MixRows<T>* mix, const T* bias, int64_t b_stride,
                            T* y, int64_t N, int64_t C_in, int64_t C_out, int64_t H, int64_t W,
                            int64_t budget, int64_t chunk_bytes) {
  constexpr int L = kLanes<T>, CB = pointwise::kChannelBlock, PV = pointwise::kTileVectors;
  constexpr int TP = pointwise::kTilePixels<T>;
  static_assert(PV == 3, "the products dispatch tiles of 1, 2 or 3 vectors");
  const int64_t HW = H * W, row = C_in * 9, products = C_out * C_in;
  // Transformed kernels per sample: [16][C_out·C_in], each position's matrix in pointwise's
  // packed order (blocks of CB output channels [C_in][CB], then single channels [C_in]). With a
  // kernel per sample, the samples run in chunks (direct_conv::chunk_samples).
  const bool per_sample = w_stride != 0 || mix != nullptr;
  const int64_t chunk =
      per_sample ? direct_conv::chunk_samples(N, kPositions * products * int64_t(sizeof(T)),
                                               chunk_bytes)
                 : N;
  // the calling thread's buffer, read by every thread of the call
  const Scratch<T, Use::kernels> kernels((per_sample ? chunk : 1) * kPositions * products);
  T* const packed = kernels.data();
  // samples n0 .. n0 + count − 1 (or the one shared kernel) into packed; whether all are finite
  const auto transform_kernels = [&](int64_t n0, int64_t count) {
    return direct_conv::for_each_kernel_block<T, CB>(
        w, w_stride, mix, n0, per_sample ? count : 1, C_out, row,
        [&](int64_t n, int64_t co0, int channels, const T* rows) {
          // the block's transforms first ([16][C_in·channels], each position's run padded by a
          // vector: runs of a power-of-two size put the 16 values of a transform in one L1
          // set), then one run per position: a position's values of the block are contiguous in
          // the packed order
          thread_local std::vector<T> block;
          const int64_t run = C_in * channels, stride = run + kLanes<T>;
          block.resize(std::max<int64_t>(block.size(), kPositions * stride));
          for (int c = 0; c < channels; ++c)
            for (int64_t ci = 0; ci < C_in; ++ci)
              transform_kernel(rows + c * row + ci * 9, block.data() + ci * channels + c, stride);
          T* dst = packed + n * kPositions * products + co0 * C_in;
          for (int xi = 0; xi < kPositions; ++xi)
            std::memcpy(dst + xi * products, block.data() + xi * stride, run * sizeof(T));
        });
  };

  // Tiles: th × tw per sample. Each tile row is padded to twp (a multiple of L) so that a vector
  // of tiles never spans two rows (the padding tiles are computed from zeros and not stored);
  // rows narrower than a vector (`narrow`: 16² images at 16 lanes) are packed instead, tile
  // t = a·tw + tx, and their patches gathered and outputs scattered lane by lane.
  const int64_t th = (H + 1) / 2, tw = (W + 1) / 2;
  const bool narrow = narrow_rows(W, sizeof(T));  // tw < L
  const int64_t twp = narrow ? tw : (tw + L - 1) / L * L;
  // Deinterleaved padded rows: E and O of len values each, len ≥ twp + 1 (loads at tx + 1).
  const int64_t len = (tw + L - 1) / L * L + L, padded = 2 * len;
  bool w_finite = true;
  std::atomic<bool> finite{true};
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t count = std::min(chunk, N - n0);
    w_finite = transform_kernels(n0, count) && w_finite;  // one chunk (n0 = 0) for a shared kernel
    const int64_t R = tile_rows_per_task(C_in, C_out, count, th, twp, sizeof(T), budget);
    const int64_t row_blocks = (th + R - 1) / R;
    at::parallel_for(0, count * row_blocks, 1, [&](int64_t begin, int64_t end) {
      // per thread: the task's rows (E, O per input row and channel), a padded row, the 16 panels,
      // the 16 products
      const int64_t in_rows = 2 * R + 2;
      const int64_t tiles = (R * twp + TP - 1) / TP * TP;  // products' row length, whole tiles
      const int64_t eo_size = in_rows * C_in * padded, panel_size = C_in * tiles;
      const Scratch<T, Use::task> task_scratch(eo_size + padded +
                                               kPositions * (C_in + C_out) * tiles);
      T* scratch = task_scratch.data();
      T* eo = scratch;
      T* line = eo + eo_size;
      T* panels = line + padded;
      T* m = panels + kPositions * panel_size;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = n0 + task / row_blocks, ty0 = task % row_blocks * R;
        const int64_t ty1 = std::min(th, ty0 + R), rows_here = ty1 - ty0;
        // tiles of this task (row padding included), and in whole vectors (narrow rows: the lanes
        // past the last tile are zero)
        const int64_t used = rows_here * twp, vused = (used + L - 1) / L * L;
        // The panels hold groups of TP tiles ([C_in][TP] each) and a last group of the vectors
        // that remain ([C_in][vectors·L]), which the product runs with a tile of that many vectors:
        // no register tile computes a vector of tiles that is not there.
        const int64_t groups = (vused + TP - 1) / TP;
        const auto group_vectors = [&](int64_t group) {
          return static_cast<int>(std::min<int64_t>(PV, (vused - group * TP) / L));
        };
        const T* xn = x + n * C_in * HW;
        // eo[r][ci] = E, O of input row 2·ty0 − 1 + r of channel ci, zero-padded (column −1 first)
        for (int64_t r = 0; r < 2 * rows_here + 2; ++r) {
          const int64_t h = 2 * ty0 - 1 + r;
          T* dst = eo + r * C_in * padded;
          if (h < 0 || h >= H) {
            std::memset(dst, 0, C_in * padded * sizeof(T));
            continue;
          }
          for (int64_t ci = 0; ci < C_in; ++ci, dst += padded) {
            const T* src = xn + ci * HW + h * W;
            if (!all_finite(src, W)) finite = false;
            line[0] = T(0);
            std::memcpy(line + 1, src, W * sizeof(T));
            std::memset(line + 1 + W, 0, (padded - 1 - W) * sizeof(T));
            for (int64_t i = 0; i < len; i += L) {
              const Vec<T> a = load(line + 2 * i), b = load(line + 2 * i + L);
              *reinterpret_cast<UnalignedVec<T>*>(dst + i) = even_lanes<T>(a, b, Lanes<T>{});
              *reinterpret_cast<UnalignedVec<T>*>(dst + len + i) = odd_lanes<T>(a, b, Lanes<T>{});
            }
          }
        }
        // input transform: V_ξ = Bᵀ d B for L tiles at a time (d: the 4 × 4 patches, each value
        // a vector of L tiles), into the panels' layout ([groups][C_in][vectors·L] per position)
        const auto transform_input = [&](const Vec<T> (&d)[4][4], int64_t tile, int64_t ci) {
          Vec<T> t[4][4];  // (d B)[r][j]
  #pragma GCC unroll 4
          for (int r = 0; r < 4; ++r) {
            t[r][0] = d[r][0] - d[r][2];
            t[r][1] = d[r][1] + d[r][2];
            t[r][2] = d[r][2] - d[r][1];
            t[r][3] = d[r][1] - d[r][3];
          }
          const int64_t group = tile / TP;
          T* p = panels + group * C_in * TP + ci * group_vectors(group) * L + tile % TP;
  #pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) {
            const Vec<T> v[4] = {t[0][j] - t[2][j], t[1][j] + t[2][j], t[2][j] - t[1][j],
                                 t[1][j] - t[3][j]};
  #pragma GCC unroll 4
            for (int i = 0; i < 4; ++i) *reinterpret_cast<Vec<T>*>(p + (4 * i + j) * panel_size) = v[i];
          }
        };
        // patch row r of tile (a, tx): input row 2a + r of the task's rows, columns E[tx], O[tx],
        // E[tx + 1], O[tx + 1]
        const auto patch_row = [&](int64_t a, int r, int64_t ci) {
          return eo + ((2 * a + r) * C_in + ci) * padded;
        };
        if (!narrow) {
          for (int64_t a = 0; a < rows_here; ++a)
            for (int64_t ci = 0; ci < C_in; ++ci)
              for (int64_t tx = 0; tx < twp; tx += L) {
                Vec<T> d[4][4];
  #pragma GCC unroll 4
                for (int r = 0; r < 4; ++r) {
                  const T* e = patch_row(a, r, ci);
                  d[r][0] = load(e + tx);
                  d[r][1] = load(e + len + tx);
                  d[r][2] = load(e + tx + 1);
                  d[r][3] = load(e + len + tx + 1);
                }
                transform_input(d, a * twp + tx, ci);
              }
        } else {
          for (int64_t ci = 0; ci < C_in; ++ci)
            for (int64_t t0 = 0; t0 < vused; t0 += L) {
              Vec<T> d[4][4] = {};
              for (int l = 0; l < L && t0 + l < used; ++l) {
                const int64_t a = (t0 + l) / tw, tx = (t0 + l) % tw;
                for (int r = 0; r < 4; ++r) {
                  const T* e = patch_row(a, r, ci);
                  d[r][0][l] = e[tx];
                  d[r][1][l] = e[len + tx];
                  d[r][2][l] = e[tx + 1];
                  d[r][3][l] = e[len + tx + 1];
                }
              }
              transform_input(d, t0, ci);
            }
        }
        // the 16 products M_ξ [C_out][tiles] = U_ξ · V_ξ, channel blocks outer as in pointwise.h
        const T* un = packed + (per_sample ? (n - n0) * kPositions * products : 0);
        for (int xi = 0; xi < kPositions; ++xi) {
          const T* panel = panels + xi * panel_size;
          const T* u = un + xi * products;
          T* mx = m + xi * C_out * tiles;
          pointwise::for_each_channel_block(C_out, [&](auto channels, int64_t co) {
            constexpr int cb = decltype(channels)::value;
            for (int64_t gi = 0; gi < groups; ++gi) {
              const T* pg = panel + gi * C_in * TP;
              T* mg = mx + co * tiles + gi * TP;
              switch (group_vectors(gi)) {
                case PV: pointwise::tile<T, cb, PV>(pg, C_in, u + co * C_in, nullptr, mg, tiles, TP); break;
                case 2: pointwise::tile<T, cb, 2>(pg, C_in, u + co * C_in, nullptr, mg, tiles, 2 * L); break;
                default: pointwise::tile<T, cb, 1>(pg, C_in, u + co * C_in, nullptr, mg, tiles, L); break;
              }
            }
          });
        }
        // output transform: Y = Aᵀ M A (+ bias) for L tiles at a time: out[i][k] = the output
        // pixels (2·ty + i, 2·tx + k) of the L tiles from `tile` on
        const T* bn = bias ? bias + n * b_stride : nullptr;
        T* yn = y + n * C_out * HW;
        const auto transform_output = [&](int64_t co, int64_t tile, T b0, Vec<T> (&out)[2][2]) {
          const T* mp = m + co * tiles + tile;
          Vec<T> s[2][4];
  #pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) {
            const Vec<T> m0 = *reinterpret_cast<const Vec<T>*>(mp + (0 + j) * C_out * tiles);
            const Vec<T> m1 = *reinterpret_cast<const Vec<T>*>(mp + (4 + j) * C_out * tiles);
            const Vec<T> m2 = *reinterpret_cast<const Vec<T>*>(mp + (8 + j) * C_out * tiles);
            const Vec<T> m3 = *reinterpret_cast<const Vec<T>*>(mp + (12 + j) * C_out * tiles);
            s[0][j] = m0 + m1 + m2;
            s[1][j] = m1 - m2 - m3;
          }
  #pragma GCC unroll 2
          for (int i = 0; i < 2; ++i) {
            out[i][0] = s[i][0] + s[i][1] + s[i][2] + b0;
            out[i][1] = s[i][1] - s[i][2] - s[i][3] + b0;
          }
        };
        for (int64_t co = 0; co < C_out; ++co) {
          const T b0 = bn ? bn[co] : T(0);
          T* yc = yn + co * HW;
          if (narrow) {
            for (int64_t t0 = 0; t0 < vused; t0 += L) {
              Vec<T> out[2][2];
              transform_output(co, t0, b0, out);
              for (int l = 0; l < L && t0 + l < used; ++l) {
                const int64_t h = 2 * (ty0 + (t0 + l) / tw), col = 2 * ((t0 + l) % tw);
                for (int i = 0; i < 2 && h + i < H; ++i)
                  for (int k = 0; k < 2 && col + k < W; ++k) yc[(h + i) * W + col + k] = out[i][k][l];
              }
            }
            continue;
          }
          for (int64_t a = 0; a < rows_here; ++a) {
            const int64_t h = 2 * (ty0 + a);
            for (int64_t tx = 0; tx < tw; tx += L) {
              Vec<T> out[2][2];
              transform_output(co, a * twp + tx, b0, out);
              const int64_t col = 2 * tx;
              for (int i = 0; i < 2 && h + i < H; ++i) {
                T* row = yc + (h + i) * W;
                if (col + 2 * L <= W) {
                  *reinterpret_cast<UnalignedVec<T>*>(row + col) =
                      interleave_low<T>(out[i][0], out[i][1], Lanes<T>{});
                  *reinterpret_cast<UnalignedVec<T>*>(row + col + L) =
                      interleave_high<T>(out[i][0], out[i][1], Lanes<T>{});
                } else {
                  for (int l = 0; l < L && col + 2 * l < W; ++l) {
                    row[col + 2 * l] = out[i][0][l];
                    if (col + 2 * l + 1 < W) row[col + 2 * l + 1] = out[i][1][l];
                  }
                }
              }
            }
          }
        }
      }
    });
  }
  return {finite, w_finite};
}

}  // namespace winograd
}  // namespace fastseg
