// 1×1 products of NCHW tensors, register-blocked: y[co][p] = b[co] + Σ_ci w[co][ci] · x[ci][p]
// for one sample's block of pixels, where x and y are rows of a plane (stride `ld` between
// channels) and w is a [C_out, C_in] matrix.
//
// Why: these are the products of 1×1 convolutions on NCHW tensors, a few channels deep (16–512)
// and thousands of pixels wide. BLAS packs both operands and runs them far below its peak
// (MKL on a 2-core AMD EPYC: LightAWNet's [33 × 64] · [64 × 16384] at 39–79 GFLOP/s, its
// [64 × 16] · [16 × 16384] at 23–71; bench/RESULTS.md, "Ops: `pointwise_conv2d`"), and a caller that gates the product has to write it to memory and read it
// back. Here a tile of CB output channels × PV vectors of pixels is accumulated in registers over
// all input channels (each loaded input vector used CB times, each broadcast weight PV times),
// from a panel of the block's pixels copied tile by tile ([tiles][C_in][PV·lanes], zero-padded
// past the block's end) so a tile reads one contiguous run; the caller's block of output stays in
// cache for what it does with it next.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/simd.h"

namespace fastseg {
namespace pointwise {

using simd::kLanes;
using simd::kVectorBytes;
using simd::UnalignedVec;
using simd::Vec;

#if defined(__AVX512F__)
constexpr int kChannelBlock = 8;  // 32 registers: 8 channels × 3 vectors of accumulators
constexpr int kTileVectors = 3;
#else
constexpr int kChannelBlock = 4;  // 16 registers: 4 channels × 3 vectors of accumulators
constexpr int kTileVectors = 3;
#endif
// Pixels of one tile.
template <typename T>
constexpr int kTilePixels = kTileVectors * kLanes<T>;

// Bytes of a block's panel of input pixels (see product): the panel and the block's products
// stay in L2 (64 KB ran LightAWNet's 1×1 products fastest of 16–256 KB).
constexpr int64_t kPanelBytes = 64 * 1024;

// The weights [C_out, C_in], element (co, ci) at w[co·row_stride + ci·col_stride] (a transposed
// matrix: row_stride 1), in the tiles' order: full blocks of CB output channels
// [C_out / CB][C_in][CB], then the remaining channels' rows [C_in] each.
template <typename T>
std::vector<T> pack_weights(const T* w, int64_t row_stride, int64_t col_stride, int64_t C_out,
                            int64_t C_in) {
  constexpr int CB = kChannelBlock;
  std::vector<T> packed(C_out * C_in);
  const int64_t full = C_out / CB * CB;
  for (int64_t co0 = 0; co0 < full; co0 += CB)
    for (int64_t ci = 0; ci < C_in; ++ci)
      for (int c = 0; c < CB; ++c)
        packed[co0 * C_in + ci * CB + c] = w[(co0 + c) * row_stride + ci * col_stride];
  for (int64_t co = full; co < C_out; ++co)
    for (int64_t ci = 0; ci < C_in; ++ci)
      packed[co * C_in + ci] = w[co * row_stride + ci * col_stride];
  return packed;
}

// acc[c][v] = b[c] + Σ_ci w[ci][c] · panel[ci][v·lanes ...]; stored to the CB rows of y (stride
// ld), `pixels` of them (fewer than the tile's in a block's last tile).
template <typename T, int CB, int PV>
__attribute__((always_inline)) inline void tile(const T* panel, int64_t C_in, const T* w,
                                                const T* b, T* y, int64_t ld, int pixels) {
  constexpr int L = kLanes<T>;
  Vec<T> acc[CB][PV];
  simd::fill<T, CB, PV>(acc, b);
  for (int64_t ci = 0; ci < C_in; ++ci) {
    const T* in = panel + ci * (PV * L);
    Vec<T> xv[PV];
#pragma GCC unroll 4
    for (int v = 0; v < PV; ++v) xv[v] = *reinterpret_cast<const Vec<T>*>(in + v * L);
    const T* wc = w + ci * CB;
#pragma GCC unroll 8
    for (int c = 0; c < CB; ++c) {
      const T s = wc[c];
#pragma GCC unroll 4
      for (int v = 0; v < PV; ++v) acc[c][v] += s * xv[v];
    }
  }
  if (pixels == PV * L) {
#pragma GCC unroll 8
    for (int c = 0; c < CB; ++c)
#pragma GCC unroll 4
      for (int v = 0; v < PV; ++v) *reinterpret_cast<UnalignedVec<T>*>(y + c * ld + v * L) = acc[c][v];
  } else {
    for (int c = 0; c < CB; ++c)
      for (int p = 0; p < pixels; ++p) y[c * ld + p] = acc[c][p / L][p % L];
  }
}

// Pixels per block of an image of HW pixels: as many whole tiles as a panel of kPanelBytes holds
// (at least one), at most HW.
template <typename T>
int64_t block_pixels(int64_t C_in, int64_t HW) {
  const int64_t panel_tile = std::max<int64_t>(1, C_in) * kTilePixels<T> * int64_t(sizeof(T));
  const int64_t tiles = std::max<int64_t>(1, kPanelBytes / panel_tile);
  return std::min(HW, tiles * kTilePixels<T>);
}

// A reusable panel: ceil(pixels / tile) tiles of [C_in][tile pixels], aligned to the vector.
template <typename T>
struct Panel {
  std::vector<T> storage;
  T* data(int64_t C_in, int64_t pixels) {
    const int64_t tiles = (pixels + kTilePixels<T> - 1) / kTilePixels<T>;
    storage.resize(tiles * C_in * kTilePixels<T> + kLanes<T>);
    return simd::aligned(storage.data());
  }
};

// f(std::integral_constant<int, kChannelBlock>{}, co) for each full block of output channels
// from co on, then f(std::integral_constant<int, 1>{}, co) for each channel that remains: the
// tiles' channel counts, in the packed weights' order (pack_weights).
template <typename F>
inline void for_each_channel_block(int64_t C_out, F&& f) {
  constexpr int CB = kChannelBlock;
  const int64_t full = C_out / CB * CB;
  for (int64_t co = 0; co < full; co += CB) f(std::integral_constant<int, CB>{}, co);
  for (int64_t co = full; co < C_out; ++co) f(std::integral_constant<int, 1>{}, co);
}

// y[co][p] = b[co] + Σ_ci w[co][ci] · x[ci][p] for p in [0, pixels): x rows at stride ldx, y rows
// at stride ldy, `packed` from pack_weights, b [C_out] or null. `panel`: scratch for the block's
// copy of x (see Panel). Single-threaded: callers run it per task.
template <typename T>
void product(const T* x, int64_t ldx, int64_t C_in, const T* packed, int64_t C_out, const T* b,
             T* y, int64_t ldy, int64_t pixels, Panel<T>& panel) {
  constexpr int PV = kTileVectors, TP = kTilePixels<T>;
  T* pp = panel.data(C_in, pixels);
  const int64_t tiles = (pixels + TP - 1) / TP;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t p0 = t * TP;
    const int n = static_cast<int>(std::min<int64_t>(TP, pixels - p0));
    T* tp = pp + t * C_in * TP;
    for (int64_t ci = 0; ci < C_in; ++ci) {
      std::memcpy(tp + ci * TP, x + ci * ldx + p0, n * sizeof(T));
      if (n < TP) std::memset(tp + ci * TP + n, 0, (TP - n) * sizeof(T));
    }
  }
  // Channel blocks outer, tiles inner: a channel block writes its CB output rows front to back,
  // CB streams of stores, while the panel is read from L2 once per block. With tiles outer (the
  // tile's panel kept in L1), every tile stored to all C_out rows at once: C_out interleaved
  // streams of 3 cache lines each, whose write-allocates the prefetchers do not follow; 16 → 64
  // channels at 1×128² took 1.4–1.9× as long that way (bench/RESULTS.md, "Ops: `pointwise_conv2d`").
  for_each_channel_block(C_out, [&](auto channels, int64_t co) {
    constexpr int cb = decltype(channels)::value;
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t p0 = t * TP;
      const int n = static_cast<int>(std::min<int64_t>(TP, pixels - p0));
      tile<T, cb, PV>(pp + t * C_in * TP, C_in, packed + co * C_in, b ? b + co : nullptr,
                      y + co * ldy + p0, ldy, n);
    }
  });
}

}  // namespace pointwise
}  // namespace fastseg
