// CUDA kernels of dynamic_conv2d (forward and backward) on NCHW-contiguous raw pointers.
//
// Sample n's kernel is W_n = Σ_k routing[n, k] · experts[k]. No kernel stores it: a block mixes the
// tile of W_n it needs from the K expert tiles (common/dynamic_conv.h's mixed_weight) while it
// stages that tile in shared memory, and uses it at once.
//
// * forward, input gradient: implicit GEMMs of one (sample, group) per block tile. The forward
//   computes y_n[co, p] = Σ_r W_n[co, r] · X_n[r, p] over the window entries r = (ci, i, j), X_n
//   being x_n's im2col matrix, gathered on the fly (zero in the padding). The input gradient is
//   the transposed product gx_n[ci, q] = Σ_{(co, i, j)} W_n[co, ci, i, j] · gy_n[co, o], gathered
//   over the output positions o that reach input pixel q through tap (i, j) (o·stride = q + pad -
//   tap·dilation): strides and dilations need no special cases.
// * weight gradient: a block owns a tile of the weight (output channels × window entries) and a
//   range of output pixels, and loops over the samples: it computes that tile of the per-sample
//   weight gradient gW_n = gy_n · X_nᵀ, then folds it straight into Σ_n routing[n, k] · gW_n (in
//   the block's own rows of a partial buffer, no atomics) and into ⟨gW_n, experts[k]⟩ (a block
//   reduction in a fixed order): deterministic, and no per-sample gradient is ever written.
//
// Tiles: 256 threads as 16 × 16; a thread computes TM × TN outputs (rows ty + 16·i, columns
// tx + 16·j); the operands are staged kStep reduction steps at a time in shared memory, in the
// accumulation type, so half/bfloat16 are converted once per staged element.
#include "cuda/dynamic_conv.cuh"

#include <type_traits>

#include "common/dynamic_conv.h"
#include "cuda/elements.cuh"

namespace fastseg {
namespace dyconv {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// Two resident blocks per SM at least: ptxas keeps each kernel within 128 registers per thread.
constexpr int kMinBlocks = 2;
constexpr int kStep = 16;  // reduction entries (forward, input grad) or pixels (weight grad) staged
// Blocks of the weight-gradient launch aimed at: a few per SM of a large GPU.
constexpr int64_t kWeightGradBlocks = 1024;

// A storage element read as its accumulation type. The build defines __CUDA_NO_HALF_CONVERSIONS__,
// so the shared helpers, which convert with static_cast, read half/bfloat16 through this view.
template <typename T> struct Element { using type = T; };
struct Half {
  __half value;
  __host__ __device__ operator float() const { return __half2float(value); }
};
struct BFloat16 {
  __nv_bfloat16 value;
  __host__ __device__ operator float() const { return __bfloat162float(value); }
};
template <> struct Element<__half> { using type = Half; };
template <> struct Element<__nv_bfloat16> { using type = BFloat16; };
static_assert(sizeof(Half) == sizeof(__half) && sizeof(BFloat16) == sizeof(__nv_bfloat16));

template <typename T>
__device__ __forceinline__ const typename Element<T>::type* elements(const T* p) {
  return reinterpret_cast<const typename Element<T>::type*>(p);
}
template <typename T>
__device__ __forceinline__ acc_t<T> load(const T* p, int64_t i) {
  return static_cast<acc_t<T>>(elements(p)[i]);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// acc[i][j] += Σ_step a[step][ty + 16·i] · b[step][tx + 16·j] over the staged steps.
template <int TM, int TN, int BM, int BN, typename A>
__device__ __forceinline__ void multiply_staged(const A (&a)[kStep][BM], const A (&b)[kStep][BN],
                                                A (&acc)[TM][TN]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int step = 0; step < kStep; ++step) {
    A a_col[TM], b_row[TN];
#pragma unroll
    for (int i = 0; i < TM; ++i) a_col[i] = a[step][ty + 16 * i];
#pragma unroll
    for (int j = 0; j < TN; ++j) b_row[j] = b[step][tx + 16 * j];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] += a_col[i] * b_row[j];
  }
}

// The forward as a GEMM per (sample, group): rows m < C_out / groups (output channels of group g),
// columns p < H_out · W_out, reduction r < (C_in / groups) · kh · kw with r = (ci · kh + i) · kw + j,
// the experts' own layout. The gather keeps, per column, the input coordinates of tap (0, 0).
template <typename T>
struct ForwardGemm {
  using A = acc_t<T>;
  ConvShape s;
  const T *x, *experts, *routing, *bias;
  T* y;

  struct Column {
    int ih, iw;  // input coordinates of tap (0, 0)
    bool inside;
  };
  __device__ int rows() const { return s.C_out / s.groups; }
  __device__ int columns() const { return s.H_out * s.W_out; }
  __device__ int reduction() const { return s.C_in / s.groups * s.kh * s.kw; }
  __device__ Column column(int p) const {
    const int oh = p / s.W_out, ow = p % s.W_out;
    return {static_cast<int>(input_coord(oh, 0, s.stride_h, s.pad_h, s.dil_h)),
            static_cast<int>(input_coord(ow, 0, s.stride_w, s.pad_w, s.dil_w)), p < columns()};
  }
  // W_n[g · rows + m, r]
  __device__ A a(int64_t n, int g, int m, int r) const {
    const int64_t R = reduction();
    return mixed_weight<A>(elements(routing) + n * s.K, s.K, elements(experts), s.C_out * R,
                           (g * rows() + m) * R + r);
  }
  // X_n[r, p] = x[n, g · C_in / groups + ci, ih + i · dil_h, iw + j · dil_w]
  __device__ A b(int64_t n, int g, int r, const Column& col) const {
    const int taps = s.kh * s.kw, ci = r / taps, tap = r % taps;
    const int ih = col.ih + tap / s.kw * s.dil_h, iw = col.iw + tap % s.kw * s.dil_w;
    if (!col.inside || ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) return A(0);
    const int c = g * (s.C_in / s.groups) + ci;
    return load(x, (n * s.C_in + c) * s.H * s.W + static_cast<int64_t>(ih) * s.W + iw);
  }
  __device__ void store_output(int64_t n, int g, int m, int p, A value) const {
    const int c = g * rows() + m;
    if (bias) value += mixed_weight<A>(elements(routing) + n * s.K, s.K, elements(bias), s.C_out, c);
    store(y + (n * s.C_out + c) * s.H_out * s.W_out + p, value);
  }
};

// The input gradient as a GEMM per (sample, group): rows m < C_in / groups (input channels),
// columns q < H · W, reduction r < (C_out / groups) · kh · kw with r = (co · kh + i) · kw + j.
template <typename T>
struct InputGradGemm {
  using A = acc_t<T>;
  ConvShape s;
  const T *grad_out, *experts, *routing;
  T* grad_x;

  struct Column {
    int ih, iw;  // input coordinates plus padding: o · stride = (ih, iw) - tap · dilation
    bool inside;
  };
  __device__ int rows() const { return s.C_in / s.groups; }
  __device__ int columns() const { return s.H * s.W; }
  __device__ int reduction() const { return s.C_out / s.groups * s.kh * s.kw; }
  __device__ Column column(int q) const {
    return {q / s.W + s.pad_h, q % s.W + s.pad_w, q < columns()};
  }
  // W_n[g · C_out / groups + co, m, i, j]
  __device__ A a(int64_t n, int g, int m, int r) const {
    const int taps = s.kh * s.kw, co = r / taps, tap = r % taps;
    const int64_t expert = static_cast<int64_t>(s.C_out) * rows() * taps;
    return mixed_weight<A>(elements(routing) + n * s.K, s.K, elements(experts), expert,
                           (static_cast<int64_t>(g * (s.C_out / s.groups) + co) * rows() + m) * taps + tap);
  }
  // grad_out[n, g · C_out / groups + co, oh, ow] where tap (i, j) of output (oh, ow) reads
  // input (ih, iw); zero where no output does.
  __device__ A b(int64_t n, int g, int r, const Column& col) const {
    const int taps = s.kh * s.kw, co = r / taps, tap = r % taps;
    const int oh_scaled = col.ih - tap / s.kw * s.dil_h, ow_scaled = col.iw - tap % s.kw * s.dil_w;
    if (!col.inside || oh_scaled < 0 || ow_scaled < 0 || oh_scaled % s.stride_h != 0 ||
        ow_scaled % s.stride_w != 0)
      return A(0);
    const int oh = oh_scaled / s.stride_h, ow = ow_scaled / s.stride_w;
    if (oh >= s.H_out || ow >= s.W_out) return A(0);
    const int c = g * (s.C_out / s.groups) + co;
    return load(grad_out, (n * s.C_out + c) * s.H_out * s.W_out + static_cast<int64_t>(oh) * s.W_out + ow);
  }
  __device__ void store_output(int64_t n, int g, int m, int q, A value) const {
    store(grad_x + (n * s.C_in + g * rows() + m) * s.H * s.W + q, value);
  }
};

// out[n, g][m, p] = Σ_r a(n, g, m, r) · b(n, g, r, p) for a BM × BN tile of (m, p).
// Grid: N · groups · cdiv(columns, BN) · cdiv(rows, BM) blocks, block b covering row tile
// b % row_tiles, column tile (b / row_tiles) % column_tiles, then (n, g) — blocks that gather
// the same operand tile run together. Block: 256 threads. Shared: a [kStep × BM] tile of the
// mixed kernel and a [kStep × BN] tile of the gathered operand (acc type).
template <typename Gemm, int BM, int BN>
__global__ void __launch_bounds__(kThreads, kMinBlocks) implicit_gemm_kernel(Gemm gemm) {
  using A = typename Gemm::A;
  constexpr int TM = BM / 16, TN = BN / 16;
  static_assert(kThreads % BN == 0 && BM * kStep % kThreads == 0 && BN * kStep % kThreads == 0);
  __shared__ A a_tile[kStep][BM];
  __shared__ A b_tile[kStep][BN];

  const int rows = gemm.rows(), columns = gemm.columns(), reduction = gemm.reduction();
  const int64_t row_tiles = (rows + BM - 1) / BM, column_tiles = (columns + BN - 1) / BN;
  const int64_t block = blockIdx.x;
  const int m0 = static_cast<int>(block % row_tiles) * BM;
  const int p0 = static_cast<int>(block / row_tiles % column_tiles) * BN;
  const int64_t sample_group = block / (row_tiles * column_tiles);
  const int64_t n = sample_group / gemm.s.groups;
  const int g = static_cast<int>(sample_group % gemm.s.groups);

  // Thread t stages columns p0 + t % BN of b_tile (the same ones at every step) and entries
  // e = t + kThreads · u of a_tile (row e / kStep, step e % kStep: consecutive threads read
  // consecutive kernel entries).
  const int tid = threadIdx.x;
  const typename Gemm::Column col = gemm.column(p0 + tid % BN);
  A acc[TM][TN] = {};
  for (int r0 = 0; r0 < reduction; r0 += kStep) {
#pragma unroll
    for (int u = 0; u < BM * kStep / kThreads; ++u) {
      const int e = tid + kThreads * u, m = m0 + e / kStep, r = r0 + e % kStep;
      a_tile[e % kStep][e / kStep] = m < rows && r < reduction ? gemm.a(n, g, m, r) : A(0);
    }
#pragma unroll
    for (int u = 0; u < BN * kStep / kThreads; ++u) {
      const int step = (tid + kThreads * u) / BN, r = r0 + step;
      b_tile[step][tid % BN] = r < reduction ? gemm.b(n, g, r, col) : A(0);
    }
    __syncthreads();
    multiply_staged<TM, TN>(a_tile, b_tile, acc);
    __syncthreads();
  }

  const int tx = tid % 16, ty = tid / 16;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int m = m0 + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int p = p0 + tx + 16 * j;
      if (m < rows && p < columns) gemm.store_output(n, g, m, p, acc[i][j]);
    }
  }
}

// Σ over the block of each thread's v, in a fixed order; the result is valid in thread 0.
// `scratch` holds kThreads / 32 values; the caller synchronises before reusing it.
template <typename A>
__device__ A block_sum(A v, A* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  A sum = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) sum += scratch[w];
  return sum;
}

struct WeightGradTiling {
  int co_tiles, r_tiles;
  int64_t tiles, splits, steps_per_split;
};

template <int BM, int BN>
WeightGradTiling weight_grad_tiling(const ConvShape& s) {
  WeightGradTiling t;
  const int64_t co = s.C_out / s.groups, R = static_cast<int64_t>(s.C_in / s.groups) * s.kh * s.kw;
  t.co_tiles = static_cast<int>(ceil_div(co, BM));
  t.r_tiles = static_cast<int>(ceil_div(R, BN));
  t.tiles = static_cast<int64_t>(s.groups) * t.co_tiles * t.r_tiles;
  // Split the pixels only as far as needed for enough blocks, leaving each split several steps.
  const int64_t steps = ceil_div(static_cast<int64_t>(s.H_out) * s.W_out, kStep);
  const int64_t want = imax<int64_t>(1, imin(ceil_div(kWeightGradBlocks, t.tiles), steps / 4));
  t.steps_per_split = ceil_div(steps, want);
  t.splits = ceil_div(steps, t.steps_per_split);
  return t;
}

// Block (t, s) owns weight tile t (BM output channels × BN window entries of group g, tiles
// row-major over [groups, co_tiles, r_tiles]) and the output pixels of split s. For each sample
// n it computes gW[c, r] = Σ_{p in split} grad_out[n, c, p] · X_n[r, p] in registers, then
//   grad_experts_partial[s, k, c, r] (=, then +=) routing[n, k] · gW[c, r]   (owned by one thread)
//   grad_routing_partial[s, t, n, k] = Σ_tile gW · experts[k]                (block_sum)
// Grid: (tiles, splits). Block: 256 threads. Shared: a [kStep × BM] tile of grad_out and a
// [kStep × BN] tile of X_n (acc type).
template <typename T, int BM, int BN>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    weight_grad_kernel(ConvShape s, WeightGradTiling tiling, const T* __restrict__ grad_out,
                       const T* __restrict__ x, const T* __restrict__ experts,
                       const T* __restrict__ routing, acc_t<T>* __restrict__ grad_experts_partial,
                       acc_t<T>* __restrict__ grad_routing_partial) {
  using A = acc_t<T>;
  constexpr int TM = BM / 16, TN = BN / 16, X_PER_THREAD = BN * kStep / kThreads;
  static_assert(BM * kStep % kThreads == 0 && BN * kStep % kThreads == 0);
  __shared__ A grad_tile[kStep][BM];
  __shared__ A x_tile[kStep][BN];
  __shared__ A scratch[kThreads / 32];

  const int co_per_group = s.C_out / s.groups, ci_per_group = s.C_in / s.groups;
  const int taps = s.kh * s.kw, R = ci_per_group * taps, P = s.H_out * s.W_out;
  const int tile = blockIdx.x, split = blockIdx.y;
  const int g = tile / (tiling.co_tiles * tiling.r_tiles);
  const int co0 = tile / tiling.r_tiles % tiling.co_tiles * BM, r0 = tile % tiling.r_tiles * BN;
  const int p_begin = static_cast<int>(split * tiling.steps_per_split * kStep);
  const int p_end = static_cast<int>(imin<int64_t>(P, p_begin + tiling.steps_per_split * kStep));
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;

  // Thread t stages x_tile entries e = t + kThreads · u: window entry r0 + e / kStep at pixel
  // step e % kStep (consecutive threads read consecutive pixels). The entry's channel and tap
  // offsets are the same for every pixel and sample.
  // x_dy, x_dx: input_coord(o, tap, ...) - o · stride, the tap's offset from o · stride.
  int x_channel[X_PER_THREAD], x_dy[X_PER_THREAD], x_dx[X_PER_THREAD];
#pragma unroll
  for (int u = 0; u < X_PER_THREAD; ++u) {
    const int r = r0 + (tid + kThreads * u) / kStep, tap = r % taps;
    x_channel[u] = r < R ? g * ci_per_group + r / taps : -1;
    x_dy[u] = static_cast<int>(input_coord(0, tap / s.kw, s.stride_h, s.pad_h, s.dil_h));
    x_dx[u] = static_cast<int>(input_coord(0, tap % s.kw, s.stride_w, s.pad_w, s.dil_w));
  }

  const int64_t expert_size = static_cast<int64_t>(s.C_out) * R;
  for (int64_t n = 0; n < s.N; ++n) {
    A grad_w[TM][TN] = {};
    for (int p0 = p_begin; p0 < p_end; p0 += kStep) {
#pragma unroll
      for (int u = 0; u < BM * kStep / kThreads; ++u) {
        const int e = tid + kThreads * u, co = co0 + e / kStep, p = p0 + e % kStep;
        grad_tile[e % kStep][e / kStep] =
            co < co_per_group && p < p_end
                ? load(grad_out, (n * s.C_out + g * co_per_group + co) * P + p)
                : A(0);
      }
#pragma unroll
      for (int u = 0; u < X_PER_THREAD; ++u) {
        const int e = tid + kThreads * u, p = p0 + e % kStep;
        const int ih = p / s.W_out * s.stride_h + x_dy[u], iw = p % s.W_out * s.stride_w + x_dx[u];
        x_tile[e % kStep][e / kStep] =
            x_channel[u] >= 0 && p < p_end && ih >= 0 && ih < s.H && iw >= 0 && iw < s.W
                ? load(x, (n * s.C_in + x_channel[u]) * s.H * s.W + static_cast<int64_t>(ih) * s.W + iw)
                : A(0);
      }
      __syncthreads();
      multiply_staged<TM, TN>(grad_tile, x_tile, grad_w);
      __syncthreads();
    }

    const T* routing_n = routing + n * s.K;
    for (int k = 0; k < s.K; ++k) {
      const A r_nk = load(routing_n, k);
      A dot = 0;
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const int co = co0 + ty + 16 * i;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          const int r = r0 + tx + 16 * j;
          if (co >= co_per_group || r >= R) continue;
          const int64_t w = (static_cast<int64_t>(g) * co_per_group + co) * R + r;
          A* partial = grad_experts_partial + (split * s.K + k) * expert_size + w;
          *partial = (n == 0 ? A(0) : *partial) + r_nk * grad_w[i][j];
          dot += grad_w[i][j] * load(experts, k * expert_size + w);
        }
      }
      dot = block_sum(dot, scratch);
      if (tid == 0)
        grad_routing_partial[((split * tiling.tiles + tile) * s.N + n) * s.K + k] = dot;
      __syncthreads();  // scratch is reused by the next block_sum
    }
  }
}

// The tile shapes: narrow tiles for the few output (or input) channels of small layers.
template <typename F>
void with_conv_tile(int rows, F&& launch) {
  if (rows <= 16) return launch(std::integral_constant<int, 16>(), std::integral_constant<int, 128>());
  if (rows <= 32) return launch(std::integral_constant<int, 32>(), std::integral_constant<int, 128>());
  return launch(std::integral_constant<int, 64>(), std::integral_constant<int, 64>());
}

template <typename F>
void with_weight_grad_tile(int co_per_group, F&& launch) {
  if (co_per_group <= 16)
    return launch(std::integral_constant<int, 16>(), std::integral_constant<int, 64>());
  return launch(std::integral_constant<int, 32>(), std::integral_constant<int, 64>());
}

// Blocks of an implicit_gemm_kernel launch of `rows` × `columns` per (sample, group).
int64_t conv_blocks(const ConvShape& s, int rows, int64_t columns) {
  int64_t blocks = 0;
  with_conv_tile(rows, [&](auto bm, auto bn) {
    blocks = s.N * s.groups * ceil_div(columns, decltype(bn)::value) *
             ceil_div(rows, decltype(bm)::value);
  });
  return blocks;
}

template <typename Gemm>
void launch_gemm(const Gemm& gemm, int rows, int64_t blocks, cudaStream_t stream) {
  if (blocks == 0) return;
  with_conv_tile(rows, [&](auto bm, auto bn) {
    implicit_gemm_kernel<Gemm, decltype(bm)::value, decltype(bn)::value>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(gemm);
  });
}

}  // namespace

int64_t forward_blocks(const ConvShape& s) {
  return conv_blocks(s, s.C_out / s.groups, static_cast<int64_t>(s.H_out) * s.W_out);
}

int64_t input_grad_blocks(const ConvShape& s) {
  return conv_blocks(s, s.C_in / s.groups, static_cast<int64_t>(s.H) * s.W);
}

WeightGradGrid weight_grad_grid(const ConvShape& s) {
  WeightGradGrid grid{};
  with_weight_grad_tile(s.C_out / s.groups, [&](auto bm, auto bn) {
    const WeightGradTiling t = weight_grad_tiling<decltype(bm)::value, decltype(bn)::value>(s);
    grid = {t.tiles, t.splits};
  });
  return grid;
}

template <typename T>
void forward(const ConvShape& s, const T* x, const T* experts, const T* routing, const T* bias,
             T* y, cudaStream_t stream) {
  launch_gemm(ForwardGemm<T>{s, x, experts, routing, bias, y}, s.C_out / s.groups,
              forward_blocks(s), stream);
}

template <typename T>
void input_grad(const ConvShape& s, const T* grad_out, const T* experts, const T* routing,
                T* grad_x, cudaStream_t stream) {
  launch_gemm(InputGradGemm<T>{s, grad_out, experts, routing, grad_x}, s.C_in / s.groups,
              input_grad_blocks(s), stream);
}

template <typename T>
void weight_grad(const ConvShape& s, const T* grad_out, const T* x, const T* experts,
                 const T* routing, acc_t<T>* grad_experts_partial, acc_t<T>* grad_routing_partial,
                 cudaStream_t stream) {
  with_weight_grad_tile(s.C_out / s.groups, [&](auto bm, auto bn) {
    constexpr int BM = decltype(bm)::value, BN = decltype(bn)::value;
    const WeightGradTiling t = weight_grad_tiling<BM, BN>(s);
    if (t.tiles == 0 || s.N == 0) return;
    weight_grad_kernel<T, BM, BN>
        <<<dim3(static_cast<unsigned>(t.tiles), static_cast<unsigned>(t.splits)), kThreads, 0,
           stream>>>(
        s, t, grad_out, x, experts, routing, grad_experts_partial, grad_routing_partial);
  });
}

#define FASTSEG_INSTANTIATE(T)                                                                   \
  template void forward<T>(const ConvShape&, const T*, const T*, const T*, const T*, T*,         \
                           cudaStream_t);                                                        \
  template void input_grad<T>(const ConvShape&, const T*, const T*, const T*, T*, cudaStream_t); \
  template void weight_grad<T>(const ConvShape&, const T*, const T*, const T*, const T*,         \
                               acc_t<T>*, acc_t<T>*, cudaStream_t);
FASTSEG_INSTANTIATE(float)
FASTSEG_INSTANTIATE(double)
FASTSEG_INSTANTIATE(__half)
FASTSEG_INSTANTIATE(__nv_bfloat16)
#undef FASTSEG_INSTANTIATE

}  // namespace cuda
}  // namespace dyconv
}  // namespace fastseg
