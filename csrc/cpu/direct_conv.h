// A direct 3×3 convolution (stride 1, padding 1, dilation 1, groups 1) of NCHW-contiguous
// tensors, with a kernel per sample: y_n = conv(x_n, w_n) + b_n.
//
// Why: oneDNN runs NCHW convolutions through reorders into its blocked layout, and pads few output
// channels up to a whole block: 16 → 1 channel at 1×256² took as long as 16 → 16 (≈ 5 ms), and
// 16 → 16 ran at ≈ 40 % of its channels-last speed. Here the output is computed in registers, a
// tile of CB output channels × PV vectors of pixels at a time (every input value loaded once per
// tile and tap is used CB times, every broadcast weight PV times), from a zero-padded copy of the
// task's input rows that stays in L2; no reorder, no im2col. The copy holds row r of every input
// channel next to each other ([rows][C_in][padded width]): one input channel to the next is one
// padded row (≤ 1 KB at LightAWNet's widths) instead of a whole plane of the task's rows
// (16–250 KB), a stride the hardware prefetchers can follow; measured 6 % faster.
//
// Tasks are (sample, block of output rows, block of CB output channels; the last block takes the
// C_out mod CB remaining channels, one at a time). A task's rows are cut into vector-wide slots
// (a row's last slot may be partial) and consecutive slots form a tile, across rows when rows are
// narrower than a tile (LightAWNet's 16² stages), so no lane is spent on a short row's padding.
// Used for dynamic_conv2d's forward and for its input gradient (the same convolution of grad_out
// with the kernels transposed and turned by 180°); weight_grad3x3 at the end computes its
// per-sample weight gradients.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu/finite.h"
#include "cpu/simd.h"

namespace fastseg {
namespace direct_conv {

using simd::kLanes;
using simd::load;
using simd::Vec;

#if defined(__AVX512F__)
// 32 registers: 8 channels × 2 vectors of accumulators (with 8 × 3, GCC 12 moved accumulators
// between registers, 30 moves per 216 FMAs, and spilled; 8 × 2: 4–5 % faster)
constexpr int kChannelBlock = 8;
constexpr int kTileVectors = 2;
#else
// 16 registers: 4 channels × 2 vectors of accumulators (4 × 3 spilled accumulators to the stack
// with GCC 12)
constexpr int kChannelBlock = 4;
constexpr int kTileVectors = 2;
#endif
// A single output channel: more vectors in flight instead of more channels.
constexpr int kSingleTileVectors = 4;
constexpr int kTaps = 9;

// Where one vector of output pixels lies: its offset into the task's padded input rows, into the
// sample's output plane, and how many of its lanes are pixels (0: a tile's unused slot).
struct Slot {
  int64_t in, out;
  int lanes;
};

// One tile: acc[c][v] = b[c] + Σ_{ci, tap} w[ci][tap][c] · rows[ci·cs + slot_v + tap], stored to
// the CB output planes (stride HW) at the slots' pixels. w: the block's packed kernel
// [C_in][9][CB]; cs: one input channel's stride in the rows, rs: one row's. Inlined into the task
// loop (3 % faster than a call per tile, measured).
template <typename T, int CB, int PV>
__attribute__((always_inline)) inline void tile(const T* rows, int64_t cs, int64_t rs,
                                                int64_t C_in, const T* w, const T* b,
                                                const Slot* slots, T* y, int64_t HW) {
  Vec<T> acc[CB][PV];
  simd::fill<T, CB, PV>(acc, b);
  for (int64_t ci = 0; ci < C_in; ++ci) {
    const T* in = rows + ci * cs;
    const T* wc = w + ci * kTaps * CB;
#pragma GCC unroll 3
    for (int ky = 0; ky < 3; ++ky) {
#pragma GCC unroll 3
      for (int kx = 0; kx < 3; ++kx) {
        const int64_t shift = ky * rs + kx;
        Vec<T> xv[PV];
#pragma GCC unroll 4
        for (int v = 0; v < PV; ++v) xv[v] = load(in + slots[v].in + shift);
        const T* wt = wc + (ky * 3 + kx) * CB;
#pragma GCC unroll 8
        for (int c = 0; c < CB; ++c) {
          const T s = wt[c];
#pragma GCC unroll 4
          for (int v = 0; v < PV; ++v) acc[c][v] += s * xv[v];
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < PV; ++v) {
    const Slot& s = slots[v];
#pragma GCC unroll 8
    for (int c = 0; c < CB; ++c) simd::store_lanes<T>(y + c * HW + s.out, acc[c][v], s.lanes);
  }
}

// Output rows per task: as many as the task's padded input rows (C_in × (rows + 2) × Wp values)
// allow within `budget` bytes, evened out over the image's blocks of rows.
inline int64_t rows_per_task(int64_t C_in, int64_t H, int64_t Wp, int64_t item, int64_t budget) {
  const int64_t fit = std::clamp<int64_t>(budget / std::max<int64_t>(1, C_in * Wp * item) - 2, 1, H);
  const int64_t blocks = (H + fit - 1) / fit;
  return (H + blocks - 1) / blocks;
}

// Rows per task of an image of `rows` rows in N samples: at most `fit` (≥ 1), but at least two
// tasks per thread where the rows allow it (a small batch is split), evened out over the blocks.
inline int64_t rows_per_thread_task(int64_t rows, int64_t fit, int64_t N) {
  const int64_t wanted = (2 * at::get_num_threads() + N - 1) / N;
  const int64_t blocks = std::max((rows + fit - 1) / fit, std::min(rows, wanted));
  return (rows + blocks - 1) / blocks;
}

// Whether every value of x, and of the kernels, is finite: checked while x's rows are copied and
// while the kernels are packed, in cache.
struct Finite {
  bool x, w;
};

// Samples per chunk of N samples whose packed kernels take sample_bytes each: as many as fit
// chunk_bytes (at least one), evened out over the chunks. conv3x3 here and in winograd.h, given
// a kernel per sample, pack one chunk's kernels and then run its tasks, which read them while
// they are in the L3 cache. Packing every sample's at once made them stream from memory (and,
// past glibc's 32 MB mmap threshold, page-fault in afresh on every call): per sample, twice the
// time of batch 8 for the direct convolution at 256 → 256 channels, 16², and batch 16, and for
// Winograd's at 128 → 128 and batch 32.
inline int64_t chunk_samples(int64_t N, int64_t sample_bytes, int64_t chunk_bytes) {
  const int64_t fit = std::clamp<int64_t>(chunk_bytes / std::max<int64_t>(1, sample_bytes), 1,
                                          std::max<int64_t>(1, N));
  const int64_t chunks = (N + fit - 1) / fit;
  return std::max<int64_t>(1, (N + chunks - 1) / chunks);
}

// y [N, C_out, H, W] = conv3x3(x [N, C_in, H, W], w_n) + b_n, where w_n is a [C_out, C_in, 3, 3]
// kernel: w + n·w_stride (w_stride 0: one kernel for all samples) or, given `mix`, computed while
// the kernels are packed (no mixed copy is written first): mix(n, co, c, out) writes rows co to
// co + c − 1 of w_n to out ([c][C_in·9]). b_n = bias + n·b_stride ([C_out], or bias null).
// `budget`: bytes of padded input rows per task (see rows_per_task); `chunk_bytes`: of one
// chunk's packed kernels (chunk_samples). Finite.w: every w_n is finite.
template <typename T>
using MixRows = std::function<void(int64_t n, int64_t co, int channels, T* out)>;

// What `mix` mixes, for conv3x3 to mix each full block of CB rows straight into its packed
// layout instead (float32 with AVX-512; see mix_packed_block): row co of w_n is
// Σ_k routing[n·K + k] · experts[k·expert_stride + co·row_stride + (0 .. C_in·9 − 1)].
template <typename T>
struct MixedFrom {
  const T* routing;
  int64_t K;
  const T* experts;
  int64_t expert_stride, row_stride;
};

// Whether mix_packed_block runs for T and a block of CB rows in this build.
template <typename T, int CB>
constexpr bool kMixesPacked =
#if defined(__AVX512F__)
    std::is_same_v<T, float> && CB == 8;
#else
    false;
#endif

// Rows co .. co + 7 of w_n mixed from `from` straight into the packed layout, out[j·8 + c] = row
// co + c's value j for j < row (float32, 8 rows): 16 values of each row mixed at a time, the 8
// vectors transposed in registers (simd::transpose8x16) and stored as 8 whole vectors; the row's
// last row mod 16 values one by one. Mixing the rows to a buffer, checking it and interleaving it
// value by value had taken 2.1 ms of the forward's 8.8 at 8 × 256 at 16² on a Xeon (mixing 0.85,
// interleaving 0.66, the check 0.6). Returns whether every value is finite (a NaN or inf expert
// value, with finite routing weights, makes the mix non-finite: NaN·α and ∞·0 are NaN).
inline bool mix_packed_block(const MixedFrom<float>& from, int64_t n, int64_t co, int64_t row,
                             float* out) {
  constexpr int CB = 8, V = 16;
  const float* r = from.routing + n * from.K;
  const float* e = from.experts + co * from.row_stride;
  simd::Float32x16 zero{};  // Σ value · 0: NaN where a value is NaN or inf
  int64_t j = 0;
  for (; j + V <= row; j += V) {
    simd::Float32x16 v[CB];
#pragma GCC unroll 8
    for (int c = 0; c < CB; ++c) {
      const float* ec = e + c * from.row_stride + j;
      v[c] = simd::load16(ec) * r[0];
      for (int64_t k = 1; k < from.K; ++k) v[c] += simd::load16(ec + k * from.expert_stride) * r[k];
      zero += v[c] * 0.f;
    }
    simd::transpose8x16(v);
#pragma GCC unroll 8
    for (int m = 0; m < CB; ++m) simd::store16(out + j * CB + m * V, v[m]);
  }
  float tail_zero = 0.f;
  for (; j < row; ++j)
    for (int c = 0; c < CB; ++c) {
      float sum = 0.f;
      for (int64_t k = 0; k < from.K; ++k)
        sum += r[k] * e[k * from.expert_stride + c * from.row_stride + j];
      out[j * CB + c] = sum;
      tail_zero += sum * 0.f;
    }
  float total = tail_zero;
  for (int l = 0; l < V; ++l) total += zero[l];
  return total == 0.f;
}

// In parallel over the items (block of CB output channels, sample), samples inner so a block's
// K expert rows stay in L2 while every sample's mix of them is made; the full blocks first, then
// the remaining channels one by one: pack(n, co, channels, rows) with rows = `channels` rows
// [C_in·9] of w_{n0 + n} from row co on (w + (n0 + n)·w_stride, or mixed by `mix` into a
// per-thread buffer). Returns whether every row was finite. samples n0 .. n0 + samples − 1 (a
// chunk of them, see chunk_samples), or 1 where one kernel serves all samples. Given
// `mixed_from` (and kMixesPacked), a full block is instead mixed by mix_packed_block straight to
// packed + n·packed_stride + co·row, conv3x3's packed place for it, and `pack` is not called.
template <typename T, int CB, typename Pack>
bool for_each_kernel_block(const T* w, int64_t w_stride, const MixRows<T>* mix, int64_t n0,
                           int64_t samples, int64_t C_out, int64_t row, Pack&& pack,
                           const MixedFrom<T>* mixed_from = nullptr,
                           T* packed = nullptr, int64_t packed_stride = 0) {
  const int64_t full_blocks = C_out / CB, blocks = full_blocks + (C_out - full_blocks * CB);
  std::atomic<bool> finite{true};
  at::parallel_for(0, blocks * samples, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> mixed;  // sized on first use: blocks mixed straight into place never need it
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i % samples, b = i / samples;
      const int64_t co = b < full_blocks ? b * CB : full_blocks * CB + (b - full_blocks);
      const int channels = b < full_blocks ? CB : 1;
      if constexpr (kMixesPacked<T, CB>) {
        if (mixed_from != nullptr && channels == CB) {  // mixed straight into its packed place
          T* dst = packed + n * packed_stride + co * row;
          if (!mix_packed_block(*mixed_from, n0 + n, co, row, dst)) finite = false;
          continue;
        }
      }
      const T* rows = w + (n0 + n) * w_stride + co * row;
      if (mix) {
        if (mixed.empty()) mixed.resize(CB * row);
        (*mix)(n0 + n, co, channels, mixed.data());
        rows = mixed.data();
      }
      if (!all_finite(rows, channels * row)) finite = false;
      pack(n, co, channels, rows);
    }
  });
  return finite;
}

// rows[r][c][1 + j] = x_n[c][h0 − 1 + r][j] for r < count and every input channel c of one
// sample's x_n [C_in, H, W], each row Wp values long; a row outside the image is zeroed whole (an
// earlier task may have filled it), the other columns are left as they are. With Check: whether
// every copied value is finite, checked while the rows are in cache.
template <typename T, bool Check>
bool copy_padded_rows(const T* xn, int64_t C_in, int64_t H, int64_t W, int64_t h0, int64_t count,
                      int64_t Wp, T* rows) {
  bool finite = true;
  for (int64_t r = 0; r < count; ++r) {
    const int64_t h = h0 - 1 + r;
    T* dst = rows + r * C_in * Wp;
    if (h < 0 || h >= H) {
      std::memset(dst, 0, C_in * Wp * sizeof(T));
      continue;
    }
    for (int64_t c = 0; c < C_in; ++c, dst += Wp) {
      const T* src = xn + c * (H * W) + h * W;
      if (Check && !all_finite(src, W)) finite = false;
      std::memcpy(dst + 1, src, W * sizeof(T));
    }
  }
  return finite;
}

template <typename T>
Finite conv3x3(const T* x, const T* w, int64_t w_stride, const MixRows<T>* mix, const T* bias,
               int64_t b_stride, T* y, int64_t N, int64_t C_in, int64_t C_out, int64_t H,
               int64_t W, int64_t budget, int64_t chunk_bytes,
               const MixedFrom<T>* mixed_from = nullptr) {
  constexpr int L = kLanes<T>, CB = kChannelBlock;
  const int64_t HW = H * W, row = C_in * kTaps, kernel = C_out * row;
  const int64_t full_blocks = C_out / CB;
  // Packed kernels, per sample: full blocks [C_out / CB][C_in][9][CB], then the remaining
  // channels [C_in][9] each (their original layout). Not zero-filled: every value is written.
  // With a kernel per sample, the samples run in chunks (chunk_samples).
  const bool per_sample = w_stride != 0 || mix != nullptr;
  const int64_t chunk =
      per_sample ? chunk_samples(N, kernel * int64_t(sizeof(T)), chunk_bytes) : N;
  std::unique_ptr<T[]> packed(new T[(per_sample ? chunk : 1) * kernel]);
  // samples n0 .. n0 + count − 1 (or the one shared kernel) packed; whether all are finite. A
  // block's CB (mixed) rows are interleaved into its packed layout.
  const auto pack_kernels = [&](int64_t n0, int64_t count) {
    return for_each_kernel_block<T, CB>(
        w, w_stride, mix, n0, per_sample ? count : 1, C_out, row,
        [&](int64_t n, int64_t co0, int channels, const T* rows) {
          T* dst = packed.get() + n * kernel + co0 * row;
          if (channels == CB) {
            for (int64_t r = 0; r < row; ++r)
#pragma GCC unroll 8
              for (int c = 0; c < CB; ++c) dst[r * CB + c] = rows[c * row + r];
          } else {
            std::memcpy(dst, rows, row * sizeof(T));
          }
        },
        mixed_from, packed.get(), kernel);
  };
  const int64_t row_slots = (W + L - 1) / L, Wp = row_slots * L + 2, rs = C_in * Wp;
  const int64_t R = rows_per_task(C_in, H, Wp, sizeof(T), budget);
  const int64_t row_blocks = (H + R - 1) / R;
  // A task: one block of CB output channels (or all C_out mod CB remaining ones) of one block of
  // rows of one sample. A thread's consecutive tasks share their input rows, copied once.
  const int64_t units = full_blocks + (full_blocks * CB < C_out ? 1 : 0);
  bool w_finite = true;
  std::atomic<bool> finite{true};
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t count = std::min(chunk, N - n0);
    w_finite = pack_kernels(n0, count) && w_finite;  // one chunk (n0 = 0) for a shared kernel
    at::parallel_for(0, count * row_blocks * units, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> rows;
      std::vector<Slot> slots;
      int64_t copied = -1;  // the (sample, row block) pair whose rows are in `rows`
      for (int64_t task = begin; task < end; ++task) {
        const int64_t unit = task % units, pair = task / units;
        const int64_t n = n0 + pair / row_blocks, h0 = pair % row_blocks * R;
        const int64_t h1 = std::min(H, h0 + R);
        const int64_t nr = h1 - h0 + 2;
        if (pair != copied) {
          copied = pair;
          // rows[r][ci][j] = x[n, ci, h0 − 1 + r, j − 1], zero outside the image. Values the vector
          // gains are zero and only columns 1..W are ever copied to, so the padding columns stay
          // zero; a row outside the image is zeroed, as an earlier task may have filled it.
          rows.resize(nr * rs);
          if (!copy_padded_rows<T, true>(x + n * C_in * HW, C_in, H, W, h0, nr, Wp, rows.data()))
            finite = false;
          slots.clear();
          for (int64_t h = h0; h < h1; ++h)
            for (int64_t j = 0; j < row_slots; ++j)
              slots.push_back({(h - h0) * rs + j * L, h * W + j * L,
                               static_cast<int>(std::min<int64_t>(L, W - j * L))});
          // unused slots of the last tile: read valid rows, store nothing
          slots.resize(slots.size() + std::max(kTileVectors, kSingleTileVectors), Slot{0, 0, 0});
        }
        const int64_t used = (h1 - h0) * row_slots;
        const T* wn = packed.get() + (per_sample ? (n - n0) * kernel : 0);
        const T* bn = bias ? bias + n * b_stride : nullptr;
        T* yn = y + n * C_out * HW;
        if (unit < full_blocks) {
          const T* wb = wn + unit * CB * C_in * kTaps;
          for (int64_t s = 0; s < used; s += kTileVectors)
            tile<T, CB, kTileVectors>(rows.data(), Wp, rs, C_in, wb, bn ? bn + unit * CB : nullptr,
                                      slots.data() + s, yn + unit * CB * HW, HW);
        } else {
          for (int64_t co = full_blocks * CB; co < C_out; ++co)
            for (int64_t s = 0; s < used; s += kSingleTileVectors)
              tile<T, 1, kSingleTileVectors>(rows.data(), Wp, rs, C_in, wn + co * C_in * kTaps,
                                             bn ? bn + co : nullptr, slots.data() + s, yn + co * HW,
                                             HW);
        }
      }
    });
  }
  return {finite, w_finite};
}

// --- weight gradients ----------------------------------------------------------------------------

#if defined(__AVX512F__)
// 2 output channels × 9 taps of accumulators (18 of 32 registers; 3 × 9, which leaves one
// register for the 3 gradient vectors and the input vector, measured no faster)
constexpr int kGradChannels = 2;
#else
constexpr int kGradChannels = 1;  // 9 accumulators of 16 registers
#endif

// out[o·out_stride + t] += Σ over the rows and vectors of g_o · x shifted by tap t, for CO output
// channels: x is one input channel's padded row 0 (row r at x + r·xrs, image column j at j + 1,
// zero around the image), g output channel o0's gradient row 0 (channel o at g + o·gcs, row h at
// g + h·grs, zero past the image's width), `vecs` vectors per row.
template <typename T, int CO>
__attribute__((always_inline)) inline void weight_grad_sums(const T* x, int64_t xrs, const T* g,
                                                            int64_t gcs, int64_t grs, int64_t rows,
                                                            int64_t vecs, T* out,
                                                            int64_t out_stride) {
  constexpr int L = kLanes<T>;
  Vec<T> acc[CO][kTaps];
#pragma GCC unroll 4
  for (int o = 0; o < CO; ++o)
#pragma GCC unroll 9
    for (int t = 0; t < kTaps; ++t) acc[o][t] = Vec<T>{};
  for (int64_t h = 0; h < rows; ++h) {
    const T* xh = x + h * xrs;
    const T* gh = g + h * grs;
    for (int64_t j = 0; j < vecs; ++j) {
      Vec<T> gv[CO];
#pragma GCC unroll 4
      for (int o = 0; o < CO; ++o) gv[o] = *reinterpret_cast<const Vec<T>*>(gh + o * gcs + j * L);
#pragma GCC unroll 3
      for (int ky = 0; ky < 3; ++ky)
#pragma GCC unroll 3
        for (int kx = 0; kx < 3; ++kx) {
          const Vec<T> xv = load(xh + ky * xrs + j * L + kx);
#pragma GCC unroll 4
          for (int o = 0; o < CO; ++o) acc[o][ky * 3 + kx] += gv[o] * xv;
        }
    }
  }
  for (int o = 0; o < CO; ++o)
    for (int t = 0; t < kTaps; ++t) {
      T sum = 0;
      for (int l = 0; l < L; ++l) sum += acc[o][t][l];
      out[o * out_stride + t] += sum;
    }
}

// Per-sample weight gradients of conv3x3 above (stride 1, padding 1, dilation 1, groups 1):
// gw[n][o][c][3·ky + kx] = Σ_{h,w} gy[n][o][h][w] · x[n][c][h + ky − 1][w + kx − 1] (zero outside
// the image), x [N, C_in, H, W] and gy [N, C_out, H, W] NCHW-contiguous, gw [N, C_out, C_in, 3, 3].
//
// Why: oneDNN's grouped convolution (the batch folded into the groups) computes these at
// 2.6 GFLOP/s for LightAWNet's head (16 → 1 channel, 8 × 256²: 58 ms) and at 70–140 GFLOP/s
// with 16 – 128 channels. Here the sums run in registers, CO output channels × 9 taps of vectors
// of pixels, over a task's rows of the sample copied zero-padded ([rows + 2][C_in][Wp]: the
// image's column j at j + 1, as in conv3x3) next to its rows of gy ([rows][C_out][Wv], zero past
// W), both within `budget` bytes; each loaded gy vector is used 9 times, each x vector CO times.
// Tasks are (sample, block of rows); a sample's blocks write partial sums that are added in
// block order afterwards (deterministic).
template <typename T>
void weight_grad3x3(const T* x, const T* gy, T* gw, int64_t N, int64_t C_in, int64_t C_out,
                    int64_t H, int64_t W, int64_t budget) {
  constexpr int L = kLanes<T>, CO = kGradChannels;
  const int64_t HW = H * W, vecs = (W + L - 1) / L, Wv = vecs * L, Wp = Wv + L;
  const int64_t kernel = C_out * C_in * kTaps;
  const int64_t per_row = (C_in * Wp + C_out * Wv) * static_cast<int64_t>(sizeof(T));
  const int64_t R = rows_per_thread_task(H, std::clamp<int64_t>(budget / per_row - 2, 1, H), N);
  const int64_t row_blocks = (H + R - 1) / R;
  // one block per sample: its sums go to gw directly; else to per-task partial sums
  std::vector<T> partial(row_blocks > 1 ? N * row_blocks * kernel : 0);
  at::parallel_for(0, N * row_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> xbuf((R + 2) * C_in * Wp), gbuf(R * C_out * Wv + L);
    T* const gb = simd::aligned(gbuf.data());  // gy rows: aligned vector loads
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / row_blocks, h0 = task % row_blocks * R;
      const int64_t rows = std::min(H, h0 + R) - h0;
      T* const dst = row_blocks > 1 ? partial.data() + task * kernel : gw + n * kernel;
      std::fill(dst, dst + kernel, T(0));
      // The buffers start zeroed and only columns 1..W of x's rows and 0..W − 1 of gy's are ever
      // copied to, so the padding stays zero.
      copy_padded_rows<T, false>(x + n * C_in * HW, C_in, H, W, h0, rows + 2, Wp, xbuf.data());
      const T* gn = gy + n * C_out * HW;
      for (int64_t h = 0; h < rows; ++h)
        for (int64_t o = 0; o < C_out; ++o)
          std::memcpy(gb + (h * C_out + o) * Wv, gn + o * HW + (h0 + h) * W, W * sizeof(T));
      const int64_t full = C_out / CO * CO;
      for (int64_t c = 0; c < C_in; ++c) {
        const T* xc = xbuf.data() + c * Wp;
        T* out = dst + c * kTaps;
        for (int64_t o = 0; o < full; o += CO)
          weight_grad_sums<T, CO>(xc, C_in * Wp, gb + o * Wv, Wv, C_out * Wv, rows, vecs,
                                  out + o * C_in * kTaps, C_in * kTaps);
        for (int64_t o = full; o < C_out; ++o)
          weight_grad_sums<T, 1>(xc, C_in * Wp, gb + o * Wv, Wv, C_out * Wv, rows, vecs,
                                 out + o * C_in * kTaps, C_in * kTaps);
      }
    }
  });
  if (row_blocks == 1) return;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      T* out = gw + n * kernel;
      const T* part = partial.data() + n * row_blocks * kernel;
      std::copy(part, part + kernel, out);
      for (int64_t b = 1; b < row_blocks; ++b)
        for (int64_t i = 0; i < kernel; ++i) out[i] += part[b * kernel + i];
    }
  });
}

}  // namespace direct_conv
}  // namespace fastseg
