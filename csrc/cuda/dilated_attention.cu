// CUDA kernels of dilated_attention2d (forward and backward), flash-style, on contiguous
// token-major [N, H, W, heads, d] raw pointers.
//
// Problem p = (n, a, b, h) (common/dilated_attention.h's problem_of) is the attention among the
// L = (H/s)·(W/s) tokens of parity group (a, b) of sample n, head h; token t's row, the index of
// its d-vector in q, k, v, out and of its entry in lse, is (n·H·W + group_pixel(t))·heads + h.
//
// Every kernel is one pass of the same loop: a thread owns one row of a problem (a query or a
// key) and one chunk of kChunk columns of that row's output, and streams the problem's other rows
// through shared memory, kOtherRows at a time. Against each staged row j it computes
//   score_j = scale · q·k   (every pass)   and   dp_j = dO·v   (grad_q, grad_k),
// both over chunks of kChunk columns (so any d_qk and d_v run with fixed registers), turns them
// into a weight w_j and accumulates acc += Σ_j w_j · sum_j[chunk]:
//
//   pass      own row   other rows   w_j                                 sum_j   output
//   forward   query i   keys j       p_ij (online softmax)               v_j     out_i, lse_i
//   grad_q    query i   keys j       dS_ij = P_ij · (dP_ij − D_i)        k_j     dq_i = scale·acc
//   grad_k    key j     queries i    dS_ij                               q_i     dk_j = scale·acc
//   grad_v    key j     queries i    P_ij = exp(score_ij − lse_i)        dO_i    dv_j = acc
//
// Scores and probabilities never leave registers; the backward recomputes P from lse. Each
// gradient element has one owner thread: no atomics, deterministic. The output's column chunks
// go to different blocks, each recomputing its rows' scores (and dp): this keeps every kernel
// within 128 registers for any head size, and costs nothing at LGMSNet's heads (d_qk = d_v = 8,
// one chunk); at LightAWNet's (d_qk 32, d_v 256: 32 chunks of v) the forward does about 4× the
// minimal FLOPs.
#include "cuda/dilated_attention.cuh"

#include <cmath>

#include "common/dilated_attention.h"
#include "cuda/elements.cuh"

namespace fastseg {
namespace attn {
namespace cuda {
namespace {

constexpr int kThreads = 128;  // own rows per block, one per thread
constexpr int kDeltaThreads = 256;

// Tiles of the pass kernels: kOtherRows rows staged per step, kChunk columns per operand chunk
// and per output chunk. Live across a step: score (and dp) of the staged rows and the kChunk
// accumulators; during a dot product also one operand chunk of the own row. With float
// accumulation that fits 128 registers without spilling (4 resident blocks of 128 threads per
// SM), measured with ptxas for sm_80 and sm_90: 16 staged rows in the forward and grad_v, 8 in
// grad_q and grad_k, which hold dp too (16 spill there on sm_80); 16-column chunks spill in every
// pass. float64 (the tests' gradchecks; the models run float/half/bfloat16) stages half as many
// rows and is compiled for 2 blocks per SM (≤ 255 registers) so that it does not spill either.
constexpr int kChunk = 8;
template <typename A, bool kDp>
constexpr int kOtherRows = (sizeof(A) == sizeof(float) ? 16 : 8) / (kDp ? 2 : 1);
template <typename A> constexpr int kMinBlocks = sizeof(A) == sizeof(float) ? 4 : 2;

enum class Pass { kForward, kGradQ, kGradK, kGradV };

// The operands of one pass; `own_*` are read at the thread's own row, `other_*` at the staged rows.
template <typename T>
struct PassArgs {
  AttentionShape s;
  const T* own_score;    // q·k: q in the query passes (forward, grad_q), k in the key passes
  const T* other_score;  // k, or q
  const T* own_dp;       // dO·v (grad_q, grad_k): dO in grad_q, v in grad_k
  const T* other_dp;     // v, or dO
  const T* other_sum;    // what acc sums over the other rows: v, k, q, dO
  int d_sum;             // its columns, also the output's
  const acc_t<T>* lse;   // [rows] of the queries (backward)
  const acc_t<T>* delta;  // [rows] D_i of the queries (grad_q, grad_k)
  T* out;                // [rows, d_sum]: out, dq, dk or dv
  acc_t<T>* lse_out;     // [rows] (forward)
};

// The kernels keep scores in base 2 (scale · log2 e folded into the scale): exp2f is one
// multi-function-unit instruction plus range handling, where expf first splits its argument, and
// its 2-ulp error is far inside the float tolerances. lse stays natural at the interface.
constexpr double kLog2e = 1.4426950408889634074, kLn2 = 0.6931471805599453094;
__device__ __forceinline__ float exp2_acc(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_acc(double x) { return exp2(x); }
__device__ __forceinline__ float log2_acc(float x) { return log2f(x); }
__device__ __forceinline__ double log2_acc(double x) { return log2(x); }

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// tile[j][c] = src[rows[j], c0 + c] in the accumulation type; zero past the operand's d columns
// and for the staged rows past the problem's last token (rows[j] < 0). Consecutive threads read
// consecutive columns of a row.
template <int kRows, typename T, typename A>
__device__ __forceinline__ void stage_tile(A (&tile)[kRows][kChunk], const T* __restrict__ src,
                                           int d, int c0, const int64_t (&rows)[kRows]) {
  constexpr int kSize = kRows * kChunk;
#pragma unroll
  for (int u = 0; u < (kSize + kThreads - 1) / kThreads; ++u) {
    const int e = threadIdx.x + kThreads * u, j = e / kChunk, c = c0 + e % kChunk;
    if (kSize % kThreads == 0 || e < kSize)
      tile[j][e % kChunk] = rows[j] >= 0 && c < d ? to_acc(src[rows[j] * d + c]) : A(0);
  }
}

// dots[j] += Σ_c own[row, c0 + c] · tile[j][c]. The own row's chunk is read into registers once
// (zero past d and for a thread without a row, whose results are never stored); every thread
// reads the same tile element at a time (a shared-memory broadcast).
template <int kRows, typename T, typename A>
__device__ __forceinline__ void add_dots(A (&dots)[kRows], const T* __restrict__ own, int64_t row,
                                         bool active, int d, int c0,
                                         const A (&tile)[kRows][kChunk]) {
  A x[kChunk];
#pragma unroll
  for (int c = 0; c < kChunk; ++c)
    x[c] = active && c0 + c < d ? to_acc(own[row * d + c0 + c]) : A(0);
#pragma unroll
  for (int j = 0; j < kRows; ++j)
#pragma unroll
    for (int c = 0; c < kChunk; ++c) dots[j] += x[c] * tile[j][c];
}

// The pass P (table at the top) for the block's (problem, tile of kThreads own rows, output
// chunk): block b covers chunk b % chunks, row tile (b / chunks) % row_tiles, problem
// b / (chunks · row_tiles), so the blocks of one problem, which stream the same rows, run
// together. Shared: the staged rows' indices (and their queries' lse, delta in the key passes),
// double-buffered so that the next step's are written during this one; kOther × kChunk tiles of
// the score operand, the dp operand (grad_q, grad_k) and the summed operand.
template <Pass P, typename T>
__device__ __forceinline__ void attention_pass(const PassArgs<T>& args) {
  using A = acc_t<T>;
  constexpr bool kDp = P == Pass::kGradQ || P == Pass::kGradK;
  constexpr int kOther = kOtherRows<A, kDp>;
  constexpr bool kQueryRows = P == Pass::kForward || P == Pass::kGradQ;
  static_assert(kOther <= kThreads);
  __shared__ int64_t other_row[2][kOther];
  __shared__ A other_lse2[2][kQueryRows ? 1 : kOther];
  __shared__ A other_delta[2][P == Pass::kGradK ? kOther : 1];
  __shared__ A score_tile[kOther][kChunk];
  __shared__ A dp_tile[kDp ? kOther : 1][kChunk];
  __shared__ A sum_tile[kOther][kChunk];

  const AttentionShape& s = args.s;
  const int dil = s.dilation, Wg = s.W / dil, L = s.H / dil * Wg;
  const int row_tiles = static_cast<int>(ceil_div(L, kThreads));
  const int chunks = static_cast<int>(ceil_div(args.d_sum, kChunk));
  const int64_t block = blockIdx.x;
  const int c_sum = static_cast<int>(block % chunks) * kChunk;
  const int own = static_cast<int>(block / chunks % row_tiles) * kThreads + threadIdx.x;
  const Problem pr = problem_of(block / (static_cast<int64_t>(chunks) * row_tiles), dil, s.heads);
  const int64_t image = pr.n * s.H * s.W;
  const auto row_of = [&](int t) {
    return (image + group_pixel(t, pr.a, pr.b, dil, Wg, s.W)) * s.heads + pr.h;
  };
  const bool active = own < L;
  const int64_t own_row = active ? row_of(own) : 0;
  const A scale = static_cast<A>(s.scale), scale2 = static_cast<A>(s.scale * kLog2e);

  A row_lse2 = 0, row_delta = 0;  // lse in base 2
  if constexpr (P == Pass::kGradQ) {
    if (active) row_lse2 = args.lse[own_row] * A(kLog2e), row_delta = args.delta[own_row];
  }
  const int score_chunks = static_cast<int>(ceil_div(s.d_qk, kChunk));
  const int phases = kDp ? imax(score_chunks, static_cast<int>(ceil_div(s.d_v, kChunk)))
                         : score_chunks;

  // Writes the indices (and query statistics) of the rows staged at step j0 to buffer `buf`.
  const auto index_rows = [&](int j0, int buf) {
    if (threadIdx.x < kOther) {
      const int j = j0 + threadIdx.x;
      const int64_t row = j < L ? row_of(j) : -1;
      other_row[buf][threadIdx.x] = row;
      if constexpr (!kQueryRows)
        other_lse2[buf][threadIdx.x] = row >= 0 ? args.lse[row] * A(kLog2e) : A(0);
      if constexpr (P == Pass::kGradK)
        other_delta[buf][threadIdx.x] = row >= 0 ? args.delta[row] : A(0);
    }
  };
  index_rows(0, 0);
  __syncthreads();

  A acc[kChunk] = {};
  A run_max = -static_cast<A>(INFINITY), run_sum = 0;  // the forward's online softmax
#pragma unroll 1
  for (int j0 = 0, buf = 0; j0 < L; j0 += kOther, buf ^= 1) {

    // Phase f stages and multiplies column chunk f of the score (and dp) operands; the summed
    // operand's chunk is staged with the first and used after the last.
    A score[kOther] = {}, dp[kDp ? kOther : 1] = {};
#pragma unroll 1
    for (int phase = 0; phase < phases; ++phase) {
      const int c0 = phase * kChunk;
      if (c0 < s.d_qk) stage_tile(score_tile, args.other_score, s.d_qk, c0, other_row[buf]);
      if constexpr (kDp) {
        if (c0 < s.d_v) stage_tile(dp_tile, args.other_dp, s.d_v, c0, other_row[buf]);
      }
      if (phase == 0) stage_tile(sum_tile, args.other_sum, args.d_sum, c_sum, other_row[buf]);
      __syncthreads();
      if (c0 < s.d_qk) add_dots(score, args.own_score, own_row, active, s.d_qk, c0, score_tile);
      if constexpr (kDp) {
        if (c0 < s.d_v) add_dots(dp, args.own_dp, own_row, active, s.d_v, c0, dp_tile);
      }
      if (phase + 1 < phases) __syncthreads();  // the next phase restages the operand tiles
    }

    // score[j] becomes the weight w_j of staged row j (zero past the problem's last token).
    if constexpr (P == Pass::kForward) {
      A tile_max = run_max;
#pragma unroll
      for (int j = 0; j < kOther; ++j) {
        score[j] = j0 + j < L ? score[j] * scale2 : -static_cast<A>(INFINITY);
        tile_max = imax(tile_max, score[j]);
      }
      // Every tile holds a token, so tile_max is finite from the first tile on (exp(-inf) = 0).
      const A rescale = exp2_acc(run_max - tile_max);
      run_sum *= rescale;
#pragma unroll
      for (int c = 0; c < kChunk; ++c) acc[c] *= rescale;
#pragma unroll
      for (int j = 0; j < kOther; ++j) {
        score[j] = exp2_acc(score[j] - tile_max);
        run_sum += score[j];
      }
      run_max = tile_max;
    } else {
#pragma unroll
      for (int j = 0; j < kOther; ++j) {
        // The query's statistics: the own row's in grad_q, staged row j's in the key passes.
        A lse2 = row_lse2, delta = row_delta;
        if constexpr (!kQueryRows) lse2 = other_lse2[buf][j];
        if constexpr (P == Pass::kGradK) delta = other_delta[buf][j];
        const A p = j0 + j < L ? exp2_acc(score[j] * scale2 - lse2) : A(0);
        if constexpr (kDp)
          score[j] = softmax_input_grad(p, dp[j], delta);
        else
          score[j] = p;
      }
    }
#pragma unroll
    for (int j = 0; j < kOther; ++j)
#pragma unroll
      for (int c = 0; c < kChunk; ++c) acc[c] += score[j] * sum_tile[j][c];
    if (j0 + kOther < L) index_rows(j0 + kOther, buf ^ 1);
    __syncthreads();  // publishes the next step's rows; the next step restages the tiles
  }

  if (!active) return;
  const A factor = P == Pass::kForward ? A(1) / run_sum : kDp ? scale : A(1);
  T* out = args.out + own_row * args.d_sum + c_sum;
#pragma unroll
  for (int c = 0; c < kChunk; ++c)
    if (c_sum + c < args.d_sum) store(out + c, acc[c] * factor);
  if constexpr (P == Pass::kForward) {
    if (c_sum == 0) args.lse_out[own_row] = (run_max + log2_acc(run_sum)) * A(kLn2);
  }
}

// One kernel per pass, so each compiles (and reports its registers) on its own.
// Grid: problems · cdiv(L, kThreads) · cdiv(d_sum, kChunk) blocks (attention_pass gives their
// order). Block: kThreads threads, one own row each.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks<acc_t<T>>) forward_kernel(PassArgs<T> args) {
  attention_pass<Pass::kForward>(args);
}
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks<acc_t<T>>) grad_q_kernel(PassArgs<T> args) {
  attention_pass<Pass::kGradQ>(args);
}
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks<acc_t<T>>) grad_k_kernel(PassArgs<T> args) {
  attention_pass<Pass::kGradK>(args);
}
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks<acc_t<T>>) grad_v_kernel(PassArgs<T> args) {
  attention_pass<Pass::kGradV>(args);
}

// delta[r] = D_r = Σ_c grad_out[r, c] · out[r, c] for each of the `rows` = N·H·W·heads queries.
// Grid: cdiv(rows, kDeltaThreads) blocks of kDeltaThreads threads, one query each.
template <typename T>
__global__ void __launch_bounds__(kDeltaThreads)
    delta_kernel(int64_t rows, int d_v, const T* __restrict__ grad_out, const T* __restrict__ out,
                 acc_t<T>* __restrict__ delta) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kDeltaThreads + threadIdx.x;
  if (r >= rows) return;
  acc_t<T> sum = 0;
  for (int c = 0; c < d_v; ++c) sum += to_acc(grad_out[r * d_v + c]) * to_acc(out[r * d_v + c]);
  delta[r] = sum;
}

int64_t problems(const AttentionShape& s) {
  return s.N * s.dilation * s.dilation * s.heads;
}

int64_t rows(const AttentionShape& s) { return s.N * s.H * s.W * s.heads; }

int64_t pass_blocks(const AttentionShape& s, int d_sum) {
  const int64_t L = static_cast<int64_t>(s.H / s.dilation) * (s.W / s.dilation);
  return problems(s) * ceil_div(L, kThreads) * ceil_div(d_sum, kChunk);
}

template <typename T>
void launch_pass(void (*kernel)(PassArgs<T>), const PassArgs<T>& args, cudaStream_t stream) {
  kernel<<<static_cast<unsigned>(pass_blocks(args.s, args.d_sum)), kThreads, 0, stream>>>(args);
}

}  // namespace

int64_t max_blocks(const AttentionShape& s) {
  return imax(pass_blocks(s, imax(s.d_qk, s.d_v)), ceil_div(rows(s), kDeltaThreads));
}

template <typename T>
void forward(const AttentionShape& s, const T* q, const T* k, const T* v, T* out, acc_t<T>* lse,
             cudaStream_t stream) {
  const PassArgs<T> args{s, q, k, nullptr, nullptr, v, s.d_v, nullptr, nullptr, out, lse};
  launch_pass(forward_kernel<T>, args, stream);
}

template <typename T>
void backward(const AttentionShape& s, const T* grad_out, const T* q, const T* k, const T* v,
              const T* out, const acc_t<T>* lse, acc_t<T>* delta, T* grad_q, T* grad_k, T* grad_v,
              cudaStream_t stream) {
  delta_kernel<T><<<static_cast<unsigned>(ceil_div(rows(s), kDeltaThreads)), kDeltaThreads, 0,
                    stream>>>(rows(s), s.d_v, grad_out, out, delta);
  const PassArgs<T> q_args{s, q, k, grad_out, v, k, s.d_qk, lse, delta, grad_q, nullptr};
  const PassArgs<T> k_args{s, k, q, v, grad_out, q, s.d_qk, lse, delta, grad_k, nullptr};
  const PassArgs<T> v_args{s, k, q, nullptr, nullptr, grad_out, s.d_v, lse, nullptr, grad_v,
                           nullptr};
  launch_pass(grad_q_kernel<T>, q_args, stream);
  launch_pass(grad_k_kernel<T>, k_args, stream);
  launch_pass(grad_v_kernel<T>, v_args, stream);
}

#define FASTSEG_INSTANTIATE(T)                                                                 \
  template void forward<T>(const AttentionShape&, const T*, const T*, const T*, T*, acc_t<T>*, \
                           cudaStream_t);                                                      \
  template void backward<T>(const AttentionShape&, const T*, const T*, const T*, const T*,     \
                            const T*, const acc_t<T>*, acc_t<T>*, T*, T*, T*, cudaStream_t);
FASTSEG_INSTANTIATE(float)
FASTSEG_INSTANTIATE(double)
FASTSEG_INSTANTIATE(__half)
FASTSEG_INSTANTIATE(__nv_bfloat16)
#undef FASTSEG_INSTANTIATE

}  // namespace cuda
}  // namespace attn
}  // namespace fastseg
