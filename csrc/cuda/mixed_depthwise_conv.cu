// CUDA kernels of mixed_depthwise_conv2d (forward and backward) on NCHW-contiguous raw pointers.
//
// Work unit: one output tile of one (sample, channel) plane per thread block, one launch per
// channel group. The block stages the zero-padded input tile in shared memory, in the accumulation
// type so that half/bfloat16 are converted once per element rather than once per tap; each thread
// then computes kBW consecutive outputs of each of its rows with the per-element math shared with
// the CPU kernels (common/mixed_depthwise_conv.h). The kernel size is a template parameter: the tap
// loops unroll, overlapping window loads are reused from registers, and the weight-gradient
// accumulator lives in registers up to k = 9 (larger k: in L1-cached local memory, no spills).
#include "cuda/mixed_depthwise_conv.cuh"

#include <type_traits>

#include "common/mixed_depthwise_conv.h"
#include "cuda/elements.cuh"

namespace fastseg {
namespace mdc {
namespace cuda {
namespace {

constexpr int kBW = 4;  // consecutive outputs per thread and row
constexpr int kMaxThreads = 256;
constexpr int kMaxTileW = 64;
constexpr int kConvTileH = 32;
// Taller tiles for the weight gradient: each thread sums more rows per block-wide reduction.
constexpr int kWeightGradTileH = 64;

// Within the default 48 KiB of dynamic shared memory, so no launch needs an opt-in attribute.
constexpr int kMaxHalo = kMaxKernelSize - 1;
static_assert(((kConvTileH + kMaxHalo) * (kMaxTileW + kMaxHalo) + kMaxKernelSize * kMaxKernelSize) *
                  sizeof(double) <= 48 * 1024);
static_assert((kWeightGradTileH + kMaxHalo) * (kMaxTileW + kMaxHalo) * sizeof(double) <= 48 * 1024);

// Output tiles of an H×W plane and the block covering one: thread (tx, ty) owns columns
// [kBW·tx, kBW·tx + kBW) of tile rows ty, ty + blockDim.y, ...
struct Tiling {
  int tile_h, tile_w, tiles_w, tiles;
  dim3 block;
};

Tiling make_tiling(int H, int W, int max_tile_h) {
  Tiling t;
  t.tile_w = W <= 16 ? 16 : W <= 32 ? 32 : kMaxTileW;  // narrow planes leave fewer threads idle
  t.tile_h = imax(1, imin(max_tile_h, H));
  const int threads_x = t.tile_w / kBW, rows_per_warp = 32 / threads_x;
  // Whole warps, so that the weight gradient's shuffle reduction has 32 live lanes.
  const int threads_y = imin(kMaxThreads / threads_x,
                             (t.tile_h + rows_per_warp - 1) / rows_per_warp * rows_per_warp);
  t.block = dim3(threads_x, threads_y);
  t.tiles_w = (W + t.tile_w - 1) / t.tile_w;
  t.tiles = (H + t.tile_h - 1) / t.tile_h * t.tiles_w;
  return t;
}

// Block b of a launch covers tile b % tiles of plane (n, c), c = c_begin + (b / tiles) % c_count.
struct BlockTile {
  int64_t plane;  // n·C + c
  int c, tile, r0, c0;
};

__device__ BlockTile block_tile(const GroupShape& s, const Tiling& t) {
  const int64_t b = blockIdx.x, group_plane = b / t.tiles;
  BlockTile bt;
  bt.tile = static_cast<int>(b % t.tiles);
  bt.c = static_cast<int>(s.c_begin + group_plane % s.c_count);
  bt.plane = group_plane / s.c_count * s.C + bt.c;
  bt.r0 = bt.tile / t.tiles_w * t.tile_h;
  bt.c0 = bt.tile % t.tiles_w * t.tile_w;
  return bt;
}

// tile[ri·cols + ci] = plane[r0 + ri, c0 + ci], zero outside the H×W plane.
template <typename A, typename T>
__device__ void load_padded_tile(const T* __restrict__ plane, int H, int W, int r0, int c0,
                                 int rows, int cols, A* tile) {
  const int nthreads = blockDim.x * blockDim.y;
  for (int e = threadIdx.y * blockDim.x + threadIdx.x; e < rows * cols; e += nthreads) {
    const int r = r0 + e / cols, c = c0 + e % cols;
    tile[e] = r >= 0 && r < H && c >= 0 && c < W ? to_acc(plane[static_cast<int64_t>(r) * W + c])
                                                 : A(0);
  }
}

// out[n, c, r, col] = Σ_{i,j} w_c[tap(i, j)] · in[n, c, r + i - K/2, col + j - K/2] + bias[c]
// (+ addend[n, c, r, col]) for the group's channels; `flip` rotates w_c (input gradient).
// Grid: N · c_count · tiles blocks (block_tile), tiles of at most kConvTileH × kMaxTileW.
// Block: Tiling::block. Shared (acc type): the padded input tile
// [(tile_h + K - 1) × (tile_w + K - 1)], then w_c [K²].
template <int K, typename T>
__global__ void __launch_bounds__(kMaxThreads)
    conv_kernel(GroupShape s, Tiling t, const T* __restrict__ in, const T* __restrict__ weight,
                const T* __restrict__ bias, const T* __restrict__ addend, bool flip,
                T* __restrict__ out) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const BlockTile b = block_tile(s, t);
  const int cols = t.tile_w + K - 1, rows = t.tile_h + K - 1;
  A* tile = reinterpret_cast<A*>(smem);
  A* kernel = tile + rows * cols;
  load_padded_tile(in + b.plane * s.H * s.W, s.H, s.W, b.r0 - K / 2, b.c0 - K / 2, rows, cols,
                   tile);
  for (int e = threadIdx.y * blockDim.x + threadIdx.x; e < K * K; e += blockDim.x * blockDim.y)
    kernel[e] = to_acc(weight[(b.c - s.c_begin) * K * K + e]);
  __syncthreads();

  const A bias_c = bias ? to_acc(bias[b.c]) : A(0);
  const int col = b.c0 + kBW * threadIdx.x;
  for (int ri = threadIdx.y; col < s.W && ri < t.tile_h && b.r0 + ri < s.H; ri += blockDim.y) {
    A acc[kBW];
    for (int u = 0; u < kBW; ++u) acc[u] = bias_c;
    conv_row_block<kBW>(tile + ri * cols + kBW * threadIdx.x, cols, kernel, K, flip, acc);
    const int64_t o = (b.plane * s.H + b.r0 + ri) * s.W + col;
    for (int u = 0; u < kBW && col + u < s.W; ++u)
      store(out + o + u, addend ? acc[u] + to_acc(addend[o + u]) : acc[u]);
  }
}

// partial[plane·tiles + tile, i·K + j] = Σ_{(r, col) in the tile} grad_out[plane, r, col] ·
// x[plane, r + i - K/2, col + j - K/2], plane = n·C + c.
// Grid: as conv_kernel, tiles of at most kWeightGradTileH × kMaxTileW. Block: Tiling::block, a
// whole number of warps. Shared (acc type): the padded x tile, then, once every thread has summed
// its rows into its own K² accumulators, [warps × K²] per-warp sums. Warps reduce by shuffles and thread
// e < K² adds the warps' sums in a fixed order: deterministic, no atomics.
template <int K, typename T>
__global__ void __launch_bounds__(kMaxThreads)
    weight_grad_kernel(GroupShape s, Tiling t, const T* __restrict__ x,
                       const T* __restrict__ grad_out, int partial_stride,
                       acc_t<T>* __restrict__ partial) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const BlockTile b = block_tile(s, t);
  const int cols = t.tile_w + K - 1;
  A* tile = reinterpret_cast<A*>(smem);
  load_padded_tile(x + b.plane * s.H * s.W, s.H, s.W, b.r0 - K / 2, b.c0 - K / 2,
                   t.tile_h + K - 1, cols, tile);
  __syncthreads();

  A acc[K * K] = {};
  const int col = b.c0 + kBW * threadIdx.x;
  for (int ri = threadIdx.y; col < s.W && ri < t.tile_h && b.r0 + ri < s.H; ri += blockDim.y) {
    const int64_t o = (b.plane * s.H + b.r0 + ri) * s.W + col;
    A gy[kBW];
    for (int u = 0; u < kBW; ++u) gy[u] = col + u < s.W ? to_acc(grad_out[o + u]) : A(0);
    weight_grad_row_block<kBW>(tile + ri * cols + kBW * threadIdx.x, cols, gy, K, acc);
  }
  __syncthreads();  // the tile is no longer read: its memory holds the per-warp sums

  A* warp_sums = tile;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, nthreads = blockDim.x * blockDim.y;
#pragma unroll
  for (int e = 0; e < K * K; ++e) {
    A v = acc[e];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (tid % 32 == 0) warp_sums[tid / 32 * K * K + e] = v;
  }
  __syncthreads();
  for (int e = tid; e < K * K; e += nthreads) {
    A sum = 0;
    for (int w = 0; w < nthreads / 32; ++w) sum += warp_sums[w * K * K + e];
    partial[(b.plane * t.tiles + b.tile) * partial_stride + e] = sum;
  }
}

// Calls launch(std::integral_constant<int, k>) for a supported kernel size k.
template <typename F>
void with_kernel_size(int k, F&& launch) {
  switch (k) {
    case 1: return launch(std::integral_constant<int, 1>());
    case 3: return launch(std::integral_constant<int, 3>());
    case 5: return launch(std::integral_constant<int, 5>());
    case 7: return launch(std::integral_constant<int, 7>());
    case 9: return launch(std::integral_constant<int, 9>());
    case 11: return launch(std::integral_constant<int, 11>());
    case 13: return launch(std::integral_constant<int, 13>());
    case 15: return launch(std::integral_constant<int, 15>());
  }
}
static_assert(kMaxKernelSize == 15, "with_kernel_size must list every odd size up to the maximum");

}  // namespace

int64_t conv_tiles(int H, int W) { return make_tiling(H, W, kConvTileH).tiles; }
int64_t weight_grad_tiles(int H, int W) { return make_tiling(H, W, kWeightGradTileH).tiles; }

template <typename T>
void depthwise_conv(const GroupShape& s, const T* in, const T* weight, const T* bias,
                    const T* addend, bool flip, T* out, cudaStream_t stream) {
  const Tiling t = make_tiling(s.H, s.W, kConvTileH);
  const int64_t blocks = s.N * s.c_count * t.tiles;
  if (blocks == 0) return;
  with_kernel_size(s.k, [&](auto k) {
    constexpr int K = decltype(k)::value;
    const size_t smem =
        ((t.tile_h + K - 1) * (t.tile_w + K - 1) + K * K) * sizeof(acc_t<T>);
    conv_kernel<K, T><<<blocks, t.block, smem, stream>>>(s, t, in, weight, bias, addend, flip, out);
  });
}

template <typename T>
void depthwise_conv_weight_grad(const GroupShape& s, const T* x, const T* grad_out,
                                int partial_stride, acc_t<T>* partial, cudaStream_t stream) {
  const Tiling t = make_tiling(s.H, s.W, kWeightGradTileH);
  const int64_t blocks = s.N * s.c_count * t.tiles;
  if (blocks == 0) return;
  with_kernel_size(s.k, [&](auto k) {
    constexpr int K = decltype(k)::value;
    const int warps = t.block.x * t.block.y / 32;
    const size_t smem =
        imax((t.tile_h + K - 1) * (t.tile_w + K - 1), warps * K * K) * sizeof(acc_t<T>);
    weight_grad_kernel<K, T><<<blocks, t.block, smem, stream>>>(s, t, x, grad_out, partial_stride,
                                                                 partial);
  });
}

#define FASTSEG_INSTANTIATE(T)                                                                 \
  template void depthwise_conv<T>(const GroupShape&, const T*, const T*, const T*, const T*,   \
                                  bool, T*, cudaStream_t);                                     \
  template void depthwise_conv_weight_grad<T>(const GroupShape&, const T*, const T*, int,      \
                                              acc_t<T>*, cudaStream_t);
FASTSEG_INSTANTIATE(float)
FASTSEG_INSTANTIATE(double)
FASTSEG_INSTANTIATE(__half)
FASTSEG_INSTANTIATE(__nv_bfloat16)
#undef FASTSEG_INSTANTIATE

}  // namespace cuda
}  // namespace mdc
}  // namespace fastseg
