// CPU kernels of dynamic_conv2d (forward and backward).
//
// y_n = conv2d(x_n, W_n) + b_n with W_n = Σ_k routing[n, k] · experts[k]. The dense products are
// ATen's (oneDNN) or the BLAS torch links (MKL); what this file adds is where the per-sample
// kernels live. Two plans, chosen per call from the shapes (choose_plan):
//
// * folded (small kernels, large images): every W_n is mixed into one [N·C_out, C_in/groups, kh, kw]
//   tensor and the batch runs as one grouped convolution with groups·N groups (the batch folded
//   into the groups); 3×3 kernels at stride 1, padding 1, groups 1 (every LightAWNet dynamic
//   conv) run the forward and the backward's input gradient as csrc/cpu/direct_conv.h's direct
//   convolution instead (forward 1.1–1.5× oneDNN at 64² – 128², 3.5× at 16 → 16 channels × 256²,
//   8× at 16 → 1; forward + backward at batch 8: 1.0–1.6×), or from 16 → 32 channels up as
//   csrc/cpu/winograd.h's Winograd convolution (choose_3x3). The backward reduces the per-sample
//   weight gradients (oneDNN's, of the folded convolution, or for those 3×3 ones with few output
//   channels direct_conv.h's weight_grad3x3) into the expert and routing gradients; its input
//   gradient mixes again (the 3×3 one from experts transposed and turned once, while the
//   convolution packs them). All per-sample kernels together are small here.
// * gemm (large kernels, small images), where all per-sample kernels together are as large as the
//   rest of the work: im2col + GEMM with the reduction split into blocks of input channels.
//   A block of W_n (some output rows × some input channels' taps) is mixed for a block of samples
//   into a per-thread buffer that stays in cache and is used at once: y_n += W_n-block ·
//   im2col(x_n)-block in the forward (for groups 1 csrc/cpu/mixed_gemm.h's register tiles over
//   rows mixed a few at a time instead, on chunks of im2col rows each thread builds in L1); in
//   the backward W_n-blockᵀ · grad_out_n → col2im gives the input gradient, and the block of
//   each per-sample weight gradient gW_n = grad_out_n · im2col(x_n)ᵀ is reduced while in cache
//   into grad_experts (Σ_n routing[n, k] · gW_n) and grad_routing (⟨gW_n, E_k⟩). Each expert
//   value is read once per block of samples. For 3×3 kernels at stride 1, padding 1 that weight
//   side is csrc/cpu/expert_grad3x3.h's kernel instead, which folds each register tile of gW_n
//   into both gradients as soon as it is summed, and from 16² outputs on their input gradient
//   is the folded plan's 3×3 convolution (grad_x_3x3).
//
// Neither plan keeps a per-sample kernel between forward and backward: the backward recomputes.
// Layouts: x and grad_out are used NCHW-contiguous (a channels-last or strided input is copied
// once); outputs come back in x's memory format. The forward checks its inputs for NaN/inf: the
// gemm plan checks x and the experts while it first reads them (im2col, mixing; for groups 1 x
// in a pass of its own, as each thread builds im2col rows of every sample), the folded plan
// x and the mixed kernels while the direct convolution copies them, or else x and the experts in
// parallel passes of their own (one read, where torch.isfinite in Python would also write a
// mask); routing and bias always in a pass (they are small).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "cpu/blas.h"
#include "cpu/direct_conv.h"
#include "cpu/expert_grad3x3.h"
#include "cpu/finite.h"
#include "cpu/mixed_gemm.h"
#include "cpu/simd.h"
#include "cpu/winograd.h"
#include "common/dynamic_conv.h"
#include "dynamic_conv.h"
#include "utils.h"
#include "cpu/output_cache.h"

namespace fastseg {
namespace dyconv {
namespace {

// Cache budgets of the gemm plan: what one thread keeps in its L2 cache at a time (a block of
// mixed kernels, of im2col rows, of weight gradients), and one block of samples' im2col in the
// forward (8 of those). FASTSEG_DYNAMIC_CONV_CPU_BLOCK_BYTES overrides the first: tests make it
// tiny so that small shapes cross every block boundary.
constexpr int64_t kBlockBytes = int64_t(1) << 20;
constexpr int64_t kColumnBlocks = 8;

int64_t block_bytes() {
  const char* env = std::getenv("FASTSEG_DYNAMIC_CONV_CPU_BLOCK_BYTES");
  if (env == nullptr || *env == '\0') return kBlockBytes;
  char* end = nullptr;
  const long long bytes = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && bytes > 0,
                    "FASTSEG_DYNAMIC_CONV_CPU_BLOCK_BYTES must be a positive integer, got ", env);
  return bytes;
}
// Columns of a kernel row mixed at a time: their expert values stay in L1 across samples.
constexpr int64_t kMixColumns = 512;
// Kernel values per parallel task of the folded plan's mixing (16 KB of each expert).
constexpr int64_t kMixSegment = 4096;
// Kernel values per segment of the folded plan's reduction (a multiple of every vector width).
constexpr int64_t kFoldedSegment = 4096;

struct Geometry {
  int64_t N, C_in, H, W, K, C_out, groups, ci, co, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo;
  int64_t taps() const { return kh * kw; }
  int64_t R() const { return ci * kh * kw; }  // one output channel's kernel: a GEMM's reduction
  int64_t P() const { return Ho * Wo; }       // output pixels of one sample
};

Geometry geometry(const at::Tensor& x, const at::Tensor& experts, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  Geometry g{};
  g.N = x.size(0), g.C_in = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.K = experts.size(0), g.C_out = experts.size(1), g.groups = groups;
  g.ci = g.C_in / groups, g.co = g.C_out / groups, g.kh = experts.size(3), g.kw = experts.size(4);
  g.sh = stride[0], g.sw = stride[1], g.ph = padding[0], g.pw = padding[1];
  g.dh = dilation[0], g.dw = dilation[1];
  g.Ho = conv_output_size(g.H, g.kh, g.sh, g.ph, g.dh);
  g.Wo = conv_output_size(g.W, g.kw, g.sw, g.pw, g.dw);
  return g;
}

void check_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "dynamic_conv2d (cpu): x must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "dynamic_conv2d (cpu): x must be float32 or float64, got ", x.scalar_type());
}

enum class Plan { folded, gemm };

// Whether the folded plan runs its 3×3 convolutions itself (conv3x3 below: direct or Winograd)
// instead of oneDNN.
bool direct(const Geometry& g) {
  return g.kh == 3 && g.kw == 3 && g.sh == 1 && g.sw == 1 && g.ph == 1 && g.pw == 1 && g.dh == 1 &&
         g.dw == 1 && g.groups == 1;
}

// The gemm plan pays an im2col (kh·kw copies of x) to avoid materialising every sample's kernel;
// it wins when a sample's kernel is at least as large as its im2col (groups = 1: C_out ≥ H_out·W_out;
// measured at LightAWNet's shapes: 256 channels at 8² and 16²). The forward and the backward
// choose separately (the backward recomputes what it needs from x, the experts and the routing):
// a forward whose 3×3 convolution the folded plan computes itself (direct(), below) takes the
// folded plan from 16² outputs up, where the gemm plan's forward takes 1.3–1.8× as long (batch
// 1 and 8, 64 → 128 to 256 → 256 channels; at 8² the folded plan's takes 1.1–1.6× the gemm
// plan's, so those keep it). The environment variable FASTSEG_DYNAMIC_CONV_CPU_PLAN=folded|gemm forces a
// plan for both (tests run both on any shape); =stacked forces fastseg/ops/dynamic_conv.py's third
// plan where it applies (groups 1), so a call that reaches this file with it picks by shape.
Plan choose_plan(const Geometry& g, bool forward) {
  if (const char* env = std::getenv("FASTSEG_DYNAMIC_CONV_CPU_PLAN")) {
    const std::string want(env);
    if (want == "folded") return Plan::folded;
    if (want == "gemm") return Plan::gemm;
    TORCH_CHECK_VALUE(want.empty() || want == "auto" || want == "stacked",
                      "FASTSEG_DYNAMIC_CONV_CPU_PLAN must be folded, gemm, stacked or auto, got ",
                      want);
  }
  if (forward && direct(g) && g.P() >= 256) return Plan::folded;
  // The backward of those 3×3 kernels from 16 output pixels per output channel down, and never
  // at 16 output channels or fewer: the gemm plan's expert gradients (expert_grad3x3.h) against
  // the folded plan's per-sample weight gradients (oneDNN's, reduced afterwards; up to 16 output
  // channels direct_conv's), both with the same input gradient from 16² on. The backward op, 11–15
  // alternating rounds, gemm / folded time, where the gemm plan is taken: 0.68 at 8 × 128 → 128
  // at 16², 0.84 at 8 × 128 at 32², 0.91 at 8 × 64 at 32², 0.92–0.99 at one sample of 128 at 16²
  // and 32², 1.04 and 1.17 at one and two samples of 64 at 32²; where it is not: 1.03 at 8 × 64
  // at 64², 1.05 at 8 × 32 at 32², 1.26 at 8 × 32 at 64², 1.8 and 2.5 at 8 × 16 at 16² and 32².
  if (!forward && direct(g))
    return g.C_out > 16 && 16 * g.C_out >= g.P() ? Plan::gemm : Plan::folded;
  // Other kernels' backward from a kernel of half the im2col's size on (measured with 3×3 kernels
  // before the bound above: the backward op alone, 15 alternating rounds, folded / gemm time:
  // 1.07–1.09 at 128 → 128 channels, 16², 1 and 8 samples, where the kernel is half the im2col).
  const int64_t kernel = g.C_out * g.R(), im2col = g.C_in * g.taps() * g.P();
  return (forward ? kernel : 2 * kernel) >= im2col ? Plan::gemm : Plan::folded;
}

template <typename T>
bool tensor_finite(const at::Tensor& t) {
  std::atomic<bool> finite{true};
  const T* p = t.data_ptr<T>();
  at::parallel_for(0, t.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    if (!all_finite(p + begin, end - begin)) finite = false;
  });
  return finite;
}

// --- mixing and reductions ---------------------------------------------------------------------

// out[n][o][i] = Σ_k routing[n][k] · experts[k·expert_stride + o·row_stride + i] for n < samples,
// o < rows, i < cols: a block of the samples' mixed kernels, rows of `cols` contiguous values.
// For up to 8 experts the rows are mixed a whole vector at a time with the routing weights and
// the experts' row pointers held in registers: GCC's vectorisation of the per-value sum used
// half-width (256-bit) vectors on AVX-512 builds and reloaded the row pointers from the stack
// each step.
template <typename T>
void mix_kernels(const T* routing, int64_t samples, int64_t K, const T* experts,
                 int64_t expert_stride, int64_t row_stride, int64_t rows, int64_t cols, T* out) {
  simd::dispatch_up_to_8(K, [&]<int KC>() {
    const int k_count = KC > 0 ? KC : static_cast<int>(K);
    for (int64_t o = 0; o < rows; ++o) {
      for (int64_t i0 = 0; i0 < cols; i0 += kMixColumns) {
        const int64_t len = std::min(kMixColumns, cols - i0);
        const T* e = experts + o * row_stride + i0;
        for (int64_t n = 0; n < samples; ++n) {
          T* __restrict w = out + (n * rows + o) * cols + i0;
          const T* r = routing + n * K;
          int64_t i = 0;
          if constexpr (KC > 0) {
            constexpr int L = simd::kLanes<T>;
            T rk[KC];
            const T* ek[KC];
            for (int k = 0; k < KC; ++k) rk[k] = r[k], ek[k] = e + k * expert_stride;
            for (; i + L <= len; i += L) {
              simd::Vec<T> sum = simd::load(ek[0] + i) * rk[0];
              for (int k = 1; k < KC; ++k) sum += simd::load(ek[k] + i) * rk[k];
              *reinterpret_cast<simd::UnalignedVec<T>*>(w + i) = sum;
            }
          }
#pragma omp simd  // (the whole row for more than 8 experts)
          for (int64_t j = i; j < len; ++j)
            w[j] = static_cast<T>(mixed_weight<acc_t<T>>(r, k_count, e, expert_stride, j));
        }
      }
    }
  });
}

// [N, C_out] mixed biases b_n = Σ_k routing[n, k] · bias[k].
at::Tensor mix_bias(const at::Tensor& routing, const at::Tensor& bias) {
  at::Tensor out = at::empty({routing.size(0), bias.size(1)}, bias.options());
  AT_DISPATCH_FLOATING_TYPES(bias.scalar_type(), "dynamic_conv2d_mix_bias", [&] {
    mix_kernels(routing.data_ptr<scalar_t>(), routing.size(0), routing.size(1),
                bias.data_ptr<scalar_t>(), bias.size(1), 0, 1, bias.size(1),
                out.data_ptr<scalar_t>());
  });
  return out;
}

// grad_experts[k][o][i] (+)= Σ_n routing[n][k] · gw[n][o][i] over a block (see reduce_weight_grads)
// for KC experts.
template <int KC, typename T>
void reduce_expert_grads(const T* gw, int64_t gw_stride, int samples, int64_t rows, int64_t len,
                         const T* routing, int64_t K, int64_t expert_stride, int64_t row_stride,
                         T* grad_experts, bool add) {
  constexpr int BW = 64 / sizeof(T);  // one 512-bit vector
  const auto block = [&]<int W>(int64_t gi, int64_t at) {
    acc_t<T> acc[KC][W] = {};
    if (add)
      for (int k = 0; k < KC; ++k)
        for (int t = 0; t < W; ++t) acc[k][t] = grad_experts[k * expert_stride + at + t];
    expert_grad_block<W, KC>(routing, K, samples, gw + gi, gw_stride, acc);
    for (int k = 0; k < KC; ++k)
      for (int t = 0; t < W; ++t) grad_experts[k * expert_stride + at + t] = static_cast<T>(acc[k][t]);
  };
  for (int64_t o = 0; o < rows; ++o) {
    int64_t i = 0;
    for (; i + BW <= len; i += BW) block.template operator()<BW>(o * len + i, o * row_stride + i);
    for (; i < len; ++i) block.template operator()<1>(o * len + i, o * row_stride + i);
  }
}

// grad_routing[s·K + k] += Σ_{o,i} gw[s][o][i] · experts[k][o][i] over a block (see
// reduce_weight_grads) for NS samples and KC experts: NS·KC vector accumulators.
template <int KC, int NS, typename T>
void reduce_routing_grads(const T* gw, int64_t gw_stride, int64_t rows, int64_t len,
                          const T* experts, int64_t expert_stride, int64_t row_stride, int64_t K,
                          acc_t<T>* grad_routing) {
  using A = acc_t<T>;
  constexpr int BW = 64 / sizeof(T);
  A full[NS][KC][BW] = {};
  A one[NS][KC][1] = {};
  for (int64_t o = 0; o < rows; ++o) {
    const T* e = experts + o * row_stride;
    const T* g = gw + o * len;
    int64_t i = 0;
    for (; i + BW <= len; i += BW)
      for (int s = 0; s < NS; ++s) routing_grad_block<BW, KC>(g + s * gw_stride + i, e + i, expert_stride, full[s]);
    for (; i < len; ++i)
      for (int s = 0; s < NS; ++s) routing_grad_block<1, KC>(g + s * gw_stride + i, e + i, expert_stride, one[s]);
  }
  for (int s = 0; s < NS; ++s)
    for (int k = 0; k < KC; ++k) {
      A sum = one[s][k][0];
      for (int t = 0; t < BW; ++t) sum += full[s][k][t];
      grad_routing[s * K + k] += sum;
    }
}

// Reduces a block of the samples' weight gradients, `rows` kernel rows of `len` elements:
// gw[n·gw_stride + o·len + i] (packed rows), experts[k·expert_stride + o·row_stride + i] and
// grad_experts laid out like experts:
//   grad_experts[k][o][i] (+)= Σ_n routing[n][k] · gw[n][o][i]       (+= with `accumulate`)
//   grad_routing[n·K + k]     += Σ_{o,i} gw[n][o][i] · experts[k][o][i]
// One pass for the expert gradients, then one per group of 4 samples for the routing gradients
// (4 samples × 4 experts: 16 vector accumulators); experts in groups of up to 4. Compile-time
// counts keep the accumulators in registers.
template <typename T>
void reduce_weight_grads(const T* gw, int64_t samples, int64_t gw_stride, int64_t rows,
                         int64_t len, const T* routing, int64_t K, const T* experts,
                         int64_t expert_stride, int64_t row_stride, T* grad_experts,
                         bool accumulate, acc_t<T>* grad_routing) {
  for (int64_t k0 = 0; k0 < K; k0 += 4) {
    simd::dispatch_up_to_8(std::min<int64_t>(4, K - k0), [&]<int KC>() {
      if constexpr (KC > 0 && KC <= 4) {
        reduce_expert_grads<KC>(gw, gw_stride, static_cast<int>(samples), rows, len, routing + k0,
                                K, expert_stride, row_stride, grad_experts + k0 * expert_stride,
                                accumulate);
        for (int64_t n0 = 0; n0 < samples; n0 += 4) {
          const auto pass = [&]<int NS>() {
            reduce_routing_grads<KC, NS>(gw + n0 * gw_stride, gw_stride, rows, len,
                                         experts + k0 * expert_stride, expert_stride, row_stride,
                                         K, grad_routing + n0 * K + k0);
          };
          switch (std::min<int64_t>(4, samples - n0)) {
            case 4: pass.template operator()<4>(); break;
            case 3: pass.template operator()<3>(); break;
            case 2: pass.template operator()<2>(); break;
            default: pass.template operator()<1>(); break;
          }
        }
      }
    });
  }
}

// sums[o] = Σ_p t[o·P + p] for o < rows.
template <typename T>
void row_sums(const T* t, int64_t rows, int64_t P, T* sums) {
  for (int64_t o = 0; o < rows; ++o) {
    acc_t<T> sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t p = 0; p < P; ++p) sum += static_cast<acc_t<T>>(t[o * P + p]);
    sums[o] = static_cast<T>(sum);
  }
}

// --- im2col / col2im -----------------------------------------------------------------------------

// im2col of input channels [c_begin, c_end) of one sample x [C_in, H, W]: row
// ((c - c_begin)·kh + i)·kw + j of `col` ([(c_end - c_begin)·kh·kw, Ho·Wo]) holds what tap (i, j)
// reads for every output pixel (0 in padding).
template <typename T>
void im2col(const T* x, const Geometry& g, int64_t c_begin, int64_t c_end, T* col) {
  const int64_t P = g.P();
  if (g.sh == 1 && g.sw == 1) {
    // Stride 1: the plane is copied into a zero-padded one, [H + 2·ph, W + 2·pw], from which
    // every tap's row of output pixels is a run of Wo contiguous values: no per-row bounds (at
    // 8² a row is 8 values, and the bounds cost more than the copy).
    const int64_t Hp = g.H + 2 * g.ph, Wp = g.W + 2 * g.pw;
    thread_local std::vector<T> padded;
    padded.assign(Hp * Wp, T(0));
    for (int64_t c = c_begin; c < c_end; ++c) {
      const T* plane = x + c * g.H * g.W;
      for (int64_t h = 0; h < g.H; ++h)
        std::copy(plane + h * g.W, plane + (h + 1) * g.W, padded.data() + (h + g.ph) * Wp + g.pw);
      for (int64_t i = 0; i < g.kh; ++i)
        for (int64_t j = 0; j < g.kw; ++j) {
          T* dst = col + (((c - c_begin) * g.kh + i) * g.kw + j) * P;
          for (int64_t oh = 0; oh < g.Ho; ++oh) {
            const T* __restrict src = padded.data() + (oh + i * g.dh) * Wp + j * g.dw;
            T* __restrict d = dst + oh * g.Wo;
#pragma omp simd
            for (int64_t ow = 0; ow < g.Wo; ++ow) d[ow] = src[ow];
          }
        }
    }
    return;
  }
  for (int64_t c = c_begin; c < c_end; ++c) {
    const T* plane = x + c * g.H * g.W;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t oh_lo = first_inside(i, g.sh, g.ph, g.dh);
      const int64_t oh_hi = end_inside(i, g.H, g.Ho, g.sh, g.ph, g.dh);
      for (int64_t j = 0; j < g.kw; ++j) {
        T* dst = col + (((c - c_begin) * g.kh + i) * g.kw + j) * P;
        const int64_t ow_lo = std::min(first_inside(j, g.sw, g.pw, g.dw), g.Wo);
        const int64_t ow_hi = std::max(end_inside(j, g.W, g.Wo, g.sw, g.pw, g.dw), ow_lo);
        // Plain loops rather than memcpy/fill calls: rows are often only a few values long.
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          T* __restrict d = dst + oh * g.Wo;
          if (oh < oh_lo || oh >= oh_hi) {
            for (int64_t ow = 0; ow < g.Wo; ++ow) d[ow] = T(0);
            continue;
          }
          const T* src = plane + input_coord(oh, i, g.sh, g.ph, g.dh) * g.W +
                         input_coord(ow_lo, j, g.sw, g.pw, g.dw) - ow_lo * g.sw;
          for (int64_t ow = 0; ow < ow_lo; ++ow) d[ow] = T(0);
          if (g.sw == 1) {
#pragma omp simd
            for (int64_t ow = ow_lo; ow < ow_hi; ++ow) d[ow] = src[ow];
          } else {
            for (int64_t ow = ow_lo; ow < ow_hi; ++ow) d[ow] = src[ow * g.sw];
          }
          for (int64_t ow = ow_hi; ow < g.Wo; ++ow) d[ow] = T(0);
        }
      }
    }
  }
}

// Where a convolution at stride 1 has outputs as wide as its input (Wo = W: 'same' padding),
// output pixel p of tap (i, j) reads the plane's pixel p + (i·dh − ph)·W + j·dw − pw, where that
// lies inside the plane: a row of im2col is the flattened plane shifted, with a fixed mask per tap
// and vector. These masks: bit l of [tap][v] is set where pixel v·L + l reads inside the plane
// (L = simd::kLanes<T>). Empty for other geometries.
template <typename T>
std::vector<uint32_t> shifted_row_masks(const Geometry& g) {
  constexpr int L = simd::kLanes<T>;
  if (g.sh != 1 || g.sw != 1 || g.Wo != g.W) return {};
  const int64_t P = g.P(), vectors = (P + L - 1) / L;
  std::vector<uint32_t> masks(g.taps() * vectors, 0);
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j)
      for (int64_t p = 0; p < P; ++p) {
        const int64_t ih = p / g.Wo + i * g.dh - g.ph, iw = p % g.Wo + j * g.dw - g.pw;
        if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W)
          masks[(i * g.kw + j) * vectors + p / L] |= 1u << (p % L);
      }
  return masks;
}

// Rows [j_begin, j_end) of one sample's im2col (as im2col's: row (c·kh + i)·kw + j for input
// channel c and tap (i, j)), straight from the planes, vectors stored whole: `col` needs one
// vector of room past its rows, as a row's last vector may run into the next row (written after
// it). With `masks` (shifted_row_masks) a row is its P/L masked loads of the shifted plane;
// otherwise, at unit stride along W, each row of Wo output pixels is read a vector at a time with
// loads masked to the plane's inside (other strides: value by value), and rows outside the plane
// are stored as zero vectors. mixed_gemm.h builds each sample's chunk of rows this way, per
// thread while in L1 (the forward op at 8 × 256 channels at 8², 8 alternating rounds of 100
// calls, medians: 2.56 ms with one im2col pass over the batch whose rows every thread then read
// from L3, 2.12 with the shifted plane; the variants tried are in bench/RESULTS.md).
template <typename T>
void im2col_rows(const T* x, const Geometry& g, const uint32_t* masks, int64_t j_begin,
                 int64_t j_end, T* col) {
  using V = simd::UnalignedVec<T>;
  constexpr int L = simd::kLanes<T>;
  const int64_t taps = g.taps(), P = g.P();
  int64_t c = j_begin / taps, i = j_begin % taps / g.kw, j = j_begin % g.kw;
  const int64_t vectors = (P + L - 1) / L;
  for (int64_t row = j_begin; row < j_end; ++row) {
    T* const start = col + (row - j_begin) * P;
    T* d = start;
    if (masks != nullptr) {
      const T* src = x + c * g.H * g.W + (i * g.dh - g.ph) * g.W + j * g.dw - g.pw;
      const uint32_t* m = masks + (i * g.kw + j) * vectors;
      for (int64_t v = 0; v < vectors; ++v)
        *reinterpret_cast<V*>(d + v * L) = simd::load_masked(src + v * L, m[v]);
    } else {
      const int64_t oh_lo = std::min(first_inside(i, g.sh, g.ph, g.dh), g.Ho);
      const int64_t oh_hi = std::max(end_inside(i, g.H, g.Ho, g.sh, g.ph, g.dh), oh_lo);
      // output columns [lo, hi) read inside the plane
      const int64_t lo = std::min(first_inside(j, g.sw, g.pw, g.dw), g.Wo);
      const int64_t hi = std::max(end_inside(j, g.W, g.Wo, g.sw, g.pw, g.dw), lo);
      for (T* const end = d + oh_lo * g.Wo; d < end; d += L)
        *reinterpret_cast<V*>(d) = simd::Vec<T>{};
      d = start + oh_lo * g.Wo;
      // output column 0's input (src may point before the plane: those lanes are masked off)
      const T* src =
          x + (c * g.H + input_coord(oh_lo, i, g.sh, g.ph, g.dh)) * g.W + j * g.dw - g.pw;
      for (int64_t oh = oh_lo; oh < oh_hi; ++oh, d += g.Wo, src += g.sh * g.W) {
        if (g.sw == 1) {
          for (int64_t ow = 0; ow < g.Wo; ow += L)
            *reinterpret_cast<V*>(d + ow) = simd::load_range(src + ow, lo - ow, hi - ow);
        } else {
          for (int64_t ow = 0; ow < g.Wo; ++ow)
            d[ow] = ow >= lo && ow < hi ? src[ow * g.sw] : T(0);
        }
      }
      for (; d < start + P; d += L) *reinterpret_cast<V*>(d) = simd::Vec<T>{};
    }
    if (++j == g.kw) {
      j = 0;
      if (++i == g.kh) i = 0, ++c;
    }
  }
}

// The adjoint of im2col for `channels` input channels: grad_x [channels, H, W] = Σ over taps of
// the rows of `col` ([channels·kh·kw, Ho·Wo]) scattered back to the pixels they were read from.
template <typename T>
void col2im(const T* col, const Geometry& g, int64_t channels, T* grad_x) {
  const int64_t P = g.P();
  if (g.sh == 1 && g.sw == 1) {
    // Stride 1: every tap's rows are added whole into a zero-padded plane, [H + 2·ph, W + 2·pw],
    // whose inside is then copied out: no per-tap bounds and no partial rows (at 8², the
    // bounded rows of 7 values ran as scalar tails: the col2im took 0.33 ms of the backward at
    // 8 × 256 at 8² on a Xeon). Same sums in the same order.
    const int64_t Hp = g.H + 2 * g.ph, Wp = g.W + 2 * g.pw;
    thread_local std::vector<T> padded;
    padded.resize(Hp * Wp);
    for (int64_t c = 0; c < channels; ++c) {
      std::fill(padded.begin(), padded.end(), T(0));
      for (int64_t i = 0; i < g.kh; ++i)
        for (int64_t j = 0; j < g.kw; ++j) {
          const T* src = col + ((c * g.kh + i) * g.kw + j) * P;
          for (int64_t oh = 0; oh < g.Ho; ++oh) {
            T* __restrict d = padded.data() + (oh + i * g.dh) * Wp + j * g.dw;
            const T* __restrict s = src + oh * g.Wo;
#pragma omp simd
            for (int64_t ow = 0; ow < g.Wo; ++ow) d[ow] += s[ow];
          }
        }
      T* plane = grad_x + c * g.H * g.W;
      for (int64_t h = 0; h < g.H; ++h) {
        const T* inside = padded.data() + (h + g.ph) * Wp + g.pw;
        std::copy(inside, inside + g.W, plane + h * g.W);
      }
    }
    return;
  }
  std::fill(grad_x, grad_x + channels * g.H * g.W, T(0));
  for (int64_t c = 0; c < channels; ++c) {
    T* plane = grad_x + c * g.H * g.W;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t oh_lo = first_inside(i, g.sh, g.ph, g.dh);
      const int64_t oh_hi = end_inside(i, g.H, g.Ho, g.sh, g.ph, g.dh);
      for (int64_t j = 0; j < g.kw; ++j) {
        const T* src = col + ((c * g.kh + i) * g.kw + j) * P;
        const int64_t ow_lo = first_inside(j, g.sw, g.pw, g.dw);
        const int64_t ow_hi = end_inside(j, g.W, g.Wo, g.sw, g.pw, g.dw);
        if (ow_lo >= ow_hi) continue;
        for (int64_t oh = oh_lo; oh < oh_hi; ++oh) {
          T* d = plane + input_coord(oh, i, g.sh, g.ph, g.dh) * g.W +
                 input_coord(ow_lo, j, g.sw, g.pw, g.dw);
          const T* s = src + oh * g.Wo + ow_lo;
          const int64_t n = ow_hi - ow_lo;
          if (g.sw == 1) {
#pragma omp simd
            for (int64_t t = 0; t < n; ++t) d[t] += s[t];
          } else {
            for (int64_t t = 0; t < n; ++t) d[t * g.sw] += s[t];
          }
        }
      }
    }
  }
}

// Thread t's slice of a [threads, size] scratch buffer.
template <typename T>
T* slot(const at::Tensor& scratch) {
  return scratch.data_ptr<T>() + at::get_thread_num() * scratch.size(1);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// --- the folded plan ---------------------------------------------------------------------------

// [N·C_out, C_in/groups, kh, kw]: every sample's mixed kernel.
at::Tensor mix_all(const Geometry& g, const at::Tensor& experts, const at::Tensor& routing) {
  at::Tensor w = at::empty({g.N * g.C_out, g.ci, g.kh, g.kw}, experts.options());
  AT_DISPATCH_FLOATING_TYPES(experts.scalar_type(), "dynamic_conv2d_mix", [&] {
    const scalar_t* e = experts.data_ptr<scalar_t>();
    const scalar_t* r = routing.data_ptr<scalar_t>();
    scalar_t* out = w.data_ptr<scalar_t>();
    const int64_t kernel = g.C_out * g.R();
    // In parallel over segments of the kernel (a batch of one sample has one thread's work
    // otherwise), every sample's segment in turn while the segment's expert values are in cache.
    at::parallel_for(0, ceil_div(kernel, kMixSegment), 1, [&](int64_t begin, int64_t end) {
      const int64_t i0 = begin * kMixSegment, len = std::min(kernel, end * kMixSegment) - i0;
      for (int64_t n = 0; n < g.N; ++n)
        mix_kernels(r + n * g.K, 1, g.K, e + i0, kernel, 0, 1, len, out + n * kernel + i0);
    });
  });
  return w;
}

// Which algorithm runs a direct() 3×3 convolution (the forward, and the input gradient with C_in
// and C_out exchanged): csrc/cpu/winograd.h where its transforms pay for themselves, else
// csrc/cpu/direct_conv.h. Measured side by side (bench/RESULTS.md, "Ops: `dynamic_conv2d`"):
// Winograd 1.2–1.7× faster from 16 → 32 to 128 → 128 channels at 32² – 128², 1.15–1.3× at 128 →
// 256 and 256 → 256 at 16² (batch 1); slower with a single channel on either side (the transforms
// per product: 0.4–0.7×), about as fast at 16 → 16 (0.9–1.1×: the transforms stream as many
// bytes as the products take time), and slower where a sample's transformed kernels outgrow the
// caches (256 → 256 at batch 8: 0.4–0.6×; 16 values per kernel of 9). Not where a row of 2×2
// tiles is narrower than a vector (16² in float32 with AVX-512), whose tiles are gathered and
// scattered lane by lane: on an AMD EPYC the two were even there (128 at 16², batch 8, 0.97–1.00×),
// on a Xeon (two 512-bit FMA units) Winograd took 1.05–1.35× the direct convolution's forward
// time and 1.08–1.18× its forward + backward (64 → 64 to 128 → 256 at 16², batch 1 and 8).
// FASTSEG_DYNAMIC_CONV_CPU_3X3=direct|winograd forces one (tests run both on every shape).
constexpr int64_t kWinogradKernelBytes = int64_t(2) << 20;  // a sample's transformed kernels
enum class Conv3x3 { direct, winograd };

Conv3x3 choose_3x3(int64_t C_in, int64_t C_out, int64_t W, int64_t item) {
  if (const char* env = std::getenv("FASTSEG_DYNAMIC_CONV_CPU_3X3")) {
    const std::string want(env);
    if (want == "direct") return Conv3x3::direct;
    if (want == "winograd") return Conv3x3::winograd;
    TORCH_CHECK_VALUE(want.empty() || want == "auto",
                      "FASTSEG_DYNAMIC_CONV_CPU_3X3 must be direct, winograd or auto, got ", want);
  }
  return std::min(C_in, C_out) >= 16 && C_in + C_out > 32 && W >= 16 &&
                 !winograd::narrow_rows(W, item) &&
                 C_in * C_out * winograd::kPositions * item <= kWinogradKernelBytes
             ? Conv3x3::winograd
             : Conv3x3::direct;
}

// direct_conv::conv3x3's contract, by the algorithm choose_3x3 picks. The samples' (mixed,
// packed) kernels are made a chunk of samples at a time, 8 budgets of them (8 MB by default:
// three samples' at 256 → 256 channels in float32; in L3 while the chunk's tasks read them).
// Every chunk mixes from all the experts, so fewer chunks read them less often: forward op at
// 8 × 256 at 16² on a Xeon, 3 alternating runs of 40 calls, 9.9–10.4 ms with chunks of 4 MB (one
// sample), 8.3–8.8 with 8 MB, 8.3–8.5 with 16 MB; the backward (its input gradient) 20.4–21.1 →
// 19.4–20.1.
template <typename T>
direct_conv::Finite conv3x3(const T* x, const T* w, int64_t w_stride,
                            const direct_conv::MixRows<T>* mix,
                            const direct_conv::MixedFrom<T>* mixed_from, const T* bias,
                            int64_t b_stride, T* y, int64_t N, int64_t C_in, int64_t C_out,
                            int64_t H, int64_t W) {
  const int64_t chunk_bytes = 8 * block_bytes();
  if (choose_3x3(C_in, C_out, W, sizeof(T)) == Conv3x3::winograd)
    return winograd::conv3x3<T>(x, w, w_stride, mix, bias, b_stride, y, N, C_in, C_out, H, W,
                                block_bytes(), chunk_bytes);
  return direct_conv::conv3x3<T>(x, w, w_stride, mix, bias, b_stride, y, N, C_in, C_out, H, W,
                                 block_bytes() / 4, chunk_bytes, mixed_from);
}

at::Tensor forward_folded(const Geometry& g, const at::Tensor& x, const at::Tensor& experts,
                          const at::Tensor& routing, const at::Tensor& bias) {
  std::optional<at::Tensor> folded_bias;
  if (bias.defined()) folded_bias = mix_bias(routing, bias).view({-1});
  if (direct(g)) {
    // the kernels are mixed while the direct convolution packs them
    at::Tensor y = cpu::empty_output({g.N, g.C_out, g.Ho, g.Wo}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dynamic_conv2d_direct", [&] {
      const scalar_t* e = experts.data_ptr<scalar_t>();
      const scalar_t* r = routing.data_ptr<scalar_t>();
      const int64_t row = g.R(), kernel = g.C_out * row;
      const direct_conv::MixRows<scalar_t> mix = [&](int64_t n, int64_t co, int channels,
                                                     scalar_t* out) {
        mix_kernels(r + n * g.K, 1, g.K, e + co * row, kernel, row, channels, row, out);
      };
      const direct_conv::MixedFrom<scalar_t> from{r, g.K, e, kernel, row};
      const direct_conv::Finite finite = conv3x3<scalar_t>(
          x.data_ptr<scalar_t>(), e, 0, &mix, &from,
          folded_bias ? folded_bias->data_ptr<scalar_t>() : nullptr, g.C_out,
          y.data_ptr<scalar_t>(), g.N, g.C_in, g.C_out, g.H, g.W);
      // A NaN or inf expert value makes every mixed kernel non-finite (finite routing weights:
      // NaN·α and ∞·0 are NaN); a non-finite mix of finite experts (overflow) is not an error.
      TORCH_CHECK_VALUE(finite.w || tensor_finite<scalar_t>(experts),
                        "dynamic_conv2d: experts contains NaN or inf");
      TORCH_CHECK_VALUE(finite.x, "dynamic_conv2d: x contains NaN or inf");
    });
    return y;
  }
  const at::Tensor w = mix_all(g, experts, routing);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dynamic_conv2d_check", [&] {
    TORCH_CHECK_VALUE(tensor_finite<scalar_t>(experts), "dynamic_conv2d: experts contains NaN or inf");
    TORCH_CHECK_VALUE(tensor_finite<scalar_t>(x), "dynamic_conv2d: x contains NaN or inf");
  });
  return at::convolution(x.view({1, g.N * g.C_in, g.H, g.W}), w, folded_bias, {g.sh, g.sw},
                         {g.ph, g.pw}, {g.dh, g.dw}, false, {0, 0}, g.groups * g.N)
      .view({g.N, g.C_out, g.Ho, g.Wo});
}

// The folded backward's per-sample weight gradients of a direct() 3×3 convolution come from
// direct_conv::weight_grad3x3 up to this many output channels, from oneDNN's grouped convolution
// above. The backward op, both side by side in one process (15 alternating rounds, median of the
// per-round ratios): weight_grad3x3 3.9–6× faster at 16 → 1 channel (LightAWNet's head; 8×256²,
// 1×256²), 1.44–1.47× at 16 → 16 at 8×128², 0.89–1.24× at 16 → 16 (2×128², 1×256²) and 16 → 8;
// 0.62–0.85× from 32 output channels up (16 → 32 at 8×128² to 128 → 256 at 8×16²), where
// oneDNN's blocked kernels reuse each loaded value more.
constexpr int64_t kDirectWeightGradChannels = 16;

// [K, C_in, C_out, 3, 3]: each expert [C_out, C_in, 3, 3] transposed and turned by 180°,
// turned[k][i][o][t] = experts[k][o][i][8 − t] (groups 1), in parallel over (k, i).
template <typename T>
at::Tensor turn_experts(const Geometry& g, const at::Tensor& experts) {
  at::Tensor turned = at::empty({g.K, g.C_in, g.C_out, 3, 3}, experts.options());
  const T* e = experts.data_ptr<T>();
  T* out = turned.data_ptr<T>();
  at::parallel_for(0, g.K * g.C_in, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ki = begin; ki < end; ++ki) {
      const int64_t k = ki / g.C_in, i = ki % g.C_in;
      T* dst = out + ki * g.C_out * 9;
      for (int64_t o = 0; o < g.C_out; ++o) {
        const T* src = e + ((k * g.C_out + o) * g.C_in + i) * 9;
        for (int t = 0; t < 9; ++t) dst[o * 9 + t] = src[8 - t];
      }
    }
  });
  return turned;
}

// (grad_x, grad_experts [K, C_out·R], grad_routing without the bias term, Σ_hw grad_out [N, C_out]).
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The input gradient of a 3×3 convolution at stride 1, padding 1 (direct(g)): the 3×3 convolution
// of grad_out with every kernel transposed (C_in ↔ C_out) and turned by 180°. Mixing is linear:
// the experts are turned so once, and each sample's kernel is mixed from them while the
// convolution packs it, as in the forward.
at::Tensor grad_x_3x3(const Geometry& g, const at::Tensor& grad_out, const at::Tensor& experts,
                      const at::Tensor& routing) {
  at::Tensor grad_x = cpu::empty_output({g.N, g.C_in, g.H, g.W}, grad_out.options());
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "dynamic_conv2d_direct_grad_x", [&] {
    const at::Tensor turned = turn_experts<scalar_t>(g, experts);  // [K, C_in, C_out, 3, 3]
    const scalar_t* e = turned.data_ptr<scalar_t>();
    const scalar_t* r = routing.data_ptr<scalar_t>();
    const int64_t row = g.C_out * 9, kernel = g.C_in * row;
    const direct_conv::MixRows<scalar_t> mix = [&](int64_t n, int64_t ci, int channels,
                                                   scalar_t* out) {
      mix_kernels(r + n * g.K, 1, g.K, e + ci * row, kernel, row, channels, row, out);
    };
    const direct_conv::MixedFrom<scalar_t> from{r, g.K, e, kernel, row};
    conv3x3<scalar_t>(grad_out.data_ptr<scalar_t>(), e, 0, &mix, &from, nullptr, 0,
                      grad_x.data_ptr<scalar_t>(), g.N, g.C_out, g.C_in, g.H, g.W);
  });
  return grad_x;
}

Grads backward_folded(const Geometry& g, const at::Tensor& grad_out, const at::Tensor& x,
                      const at::Tensor& experts, const at::Tensor& routing) {
  const bool direct_grad_x = direct(g);
  at::Tensor grad_x, grad_w;
  if (direct_grad_x && g.C_out <= kDirectWeightGradChannels) {
    grad_w = at::empty({g.N * g.C_out, g.C_in, 3, 3}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dynamic_conv2d_direct_grad_w", [&] {
      direct_conv::weight_grad3x3<scalar_t>(x.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
                                            grad_w.data_ptr<scalar_t>(), g.N, g.C_in, g.C_out,
                                            g.H, g.W, block_bytes());
    });
  } else {
    // oneDNN's weight gradient reads only the kernel's shape: where the input gradient is ours
    // (below), no kernel is mixed for it.
    const at::Tensor w = direct_grad_x
                             ? at::empty({g.N * g.C_out, g.ci, g.kh, g.kw}, experts.options())
                             : mix_all(g, experts, routing);
    std::tie(grad_x, grad_w, std::ignore) = at::convolution_backward(
        grad_out.view({1, g.N * g.C_out, g.Ho, g.Wo}), x.view({1, g.N * g.C_in, g.H, g.W}), w,
        std::nullopt, {g.sh, g.sw}, {g.ph, g.pw}, {g.dh, g.dw}, false, {0, 0}, g.groups * g.N,
        {!direct_grad_x, true, false});
  }
  if (direct_grad_x) grad_x = grad_x_3x3(g, grad_out, experts, routing);
  // The reduction in segments of the kernel, in parallel: a segment's gradients of all samples
  // and its expert values stay in cache across the reduction's passes. Per-segment partial
  // routing gradients, summed in segment order afterwards: deterministic.
  const int64_t kernel = g.C_out * g.R(), segments = ceil_div(kernel, kFoldedSegment);
  at::Tensor grad_experts = cpu::empty_output({g.K, kernel}, x.options());
  at::Tensor grad_routing_parts = at::zeros({segments, g.N, g.K}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dynamic_conv2d_reduce", [&] {
    const scalar_t* gw = grad_w.data_ptr<scalar_t>();
    at::parallel_for(0, segments, 1, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        const int64_t i0 = s * kFoldedSegment, len = std::min(kFoldedSegment, kernel - i0);
        reduce_weight_grads(gw + i0, g.N, kernel, 1, len, routing.data_ptr<scalar_t>(), g.K,
                            experts.data_ptr<scalar_t>() + i0, kernel, 0,
                            grad_experts.data_ptr<scalar_t>() + i0, false,
                            grad_routing_parts.data_ptr<acc_t<scalar_t>>() + s * g.N * g.K);
      }
    });
  });
  return {grad_x.view({g.N, g.C_in, g.H, g.W}), grad_experts, grad_routing_parts.sum(0),
          grad_out.sum({2, 3})};
}

// --- the gemm plan -----------------------------------------------------------------------------

// How the gemm plan splits its work.
struct Blocking {
  int64_t samples;      // forward: samples per block (their im2col fits kColumnBlocks budgets)
  int64_t rows;         // forward: output channels per task
  int64_t channels;     // forward: input channels per mixed block (rows × their taps)
  int64_t bwd_channels; // backward: input channels per task
  int64_t bwd_samples;  // backward: samples per block of a task (their im2col rows fit the budget)
  int64_t bwd_rows;     // backward: output channels per block of weight gradients
  int64_t mix_samples;  // backward: samples per block of mixed W-blocks (input gradient)
};

// `most` split into equal blocks of at most `fit` (at least 1): the block size.
int64_t balanced(int64_t fit, int64_t most) {
  const int64_t size = std::clamp<int64_t>(fit, 1, most);
  return ceil_div(most, ceil_div(most, size));
}

// Each budget bounds one per-thread buffer (the mixed W-blocks two, below), so that one thread's
// buffers and the experts' block it works on stay in its L2 cache together; tasks are split so
// that every thread gets at least two where the channels allow it. Blocks of input channels span
// a multiple of 64 bytes of kernel row where they can (16 channels of 3×3 taps in float32), so
// the vector loops over a block's columns have no scalar tails.
Blocking blocking(const Geometry& g, int64_t elem) {
  Blocking b{};
  const int64_t budget = block_bytes();
  const int64_t tasks_per_group = ceil_div(2 * at::get_num_threads(), g.groups);
  const int64_t taps = g.taps(), P = g.P();
  const int64_t align = (64 / elem) / std::gcd(taps, 64 / elem);
  const auto channels = [&](int64_t fit, int64_t most) {
    const int64_t c = std::clamp<int64_t>(fit, 1, most);
    return c >= align && c < g.ci ? c / align * align : c;
  };
  b.samples = balanced(kColumnBlocks * budget / (g.C_in * taps * P * elem), g.N);
  b.rows = ceil_div(g.co, std::min(tasks_per_group, g.co));
  b.channels = channels(budget / (b.samples * b.rows * taps * elem), g.ci);
  // Backward: a task's input channels span at least 128 elements of a kernel row where there
  // are enough.
  b.bwd_channels = std::min(ceil_div(g.ci, std::min(tasks_per_group, g.ci)),
                            ceil_div(ceil_div(128, taps), align) * align);
  const int64_t cols = b.bwd_channels * taps;
  b.bwd_samples = balanced(budget / (cols * P * elem), g.N);
  b.bwd_rows = balanced(budget / (b.bwd_samples * cols * elem), g.co);
  // The mixed W-blocks take two budgets: each block of samples reads the task's expert columns
  // once more (at 256 channels, 8², batch 8: one read of the 9.4 MB of experts instead of two;
  // the backward op, 8 alternating rounds, median 5.57 → 5.45 ms, mix_kernels' `perf` samples
  // −26 %, MKL's products on the larger blocks unchanged).
  b.mix_samples = balanced(2 * budget / (g.co * cols * elem), b.bwd_samples);
  return b;
}

at::Tensor forward_gemm(const Geometry& g, const at::Tensor& x, const at::Tensor& experts,
                        const at::Tensor& routing, const at::Tensor& bias) {
  const Blocking b = blocking(g, x.element_size());
  const int64_t P = g.P(), R = g.R(), taps = g.taps(), rows_per_group = ceil_div(g.co, b.rows);
  at::Tensor y = cpu::empty_output({g.N, g.C_out, P}, x.options());
  // groups 1: mixed_gemm.h's products instead of the BLAS blocks below (forward at batch 8, 21
  // alternating rounds, twice, new / BLAS time: 0.63 and 0.77 at 256 channels, 8²; 0.83 and 0.84
  // at 128, 8²; 0.80 and 0.86 at one sample of 256, 8²), on im2col rows that each thread builds
  // per chunk while they are in L1 (see im2col_rows).
  const bool own_products = g.groups == 1;
  at::Tensor col = at::empty({own_products ? 0 : b.samples * g.C_in * taps * P}, x.options());
  at::Tensor scratch = at::empty(
      {at::get_num_threads(), own_products ? 0 : b.samples * b.rows * b.channels * taps}, x.options());
  const at::Tensor mixed_bias = bias.defined() ? mix_bias(routing, bias) : at::Tensor();
  std::atomic<bool> x_finite{true}, experts_finite{true};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dynamic_conv2d_forward_gemm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* e = experts.data_ptr<scalar_t>();
    const scalar_t* r = routing.data_ptr<scalar_t>();
    const scalar_t* bp = mixed_bias.defined() ? mixed_bias.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t plane = g.H * g.W, sample_cols = g.C_in * taps * P;
    if (own_products) {
      x_finite = tensor_finite<scalar_t>(x);
      const std::vector<uint32_t> masks = shifted_row_masks<scalar_t>(g);
      const auto col_rows = [&](int64_t n, int64_t j0, int64_t j1, scalar_t* out) {
        im2col_rows(xp + n * g.C_in * plane, g, masks.empty() ? nullptr : masks.data(), j0, j1,
                    out);
      };
      const auto mix = [&](int64_t n0, int64_t samples, int64_t o0, int64_t rows, int64_t j0,
                           int64_t cols, scalar_t* out) {
        mix_kernels(r + n0 * g.K, samples, g.K, e + o0 * R + j0, g.C_out * R, R, rows, cols, out);
      };
      experts_finite = mixed_gemm::forward<scalar_t>(col_rows, e, mix, bp, g.N, g.C_out, R, P, g.K,
                                                     yp, block_bytes());
      return;
    }
    scalar_t* colp = col.data_ptr<scalar_t>();
    for (int64_t n0 = 0; n0 < g.N; n0 += b.samples) {
      const int64_t count = std::min(b.samples, g.N - n0);
      at::parallel_for(0, count * g.C_in, 1, [&](int64_t begin, int64_t end) {
        for (int64_t nc = begin; nc < end; ++nc) {
          const int64_t n = nc / g.C_in, c = nc % g.C_in;
          const scalar_t* xn = xp + (n0 + n) * g.C_in * plane;
          if (!all_finite(xn + c * plane, plane)) x_finite = false;
          im2col(xn, g, c, c + 1, colp + n * sample_cols + c * taps * P);
        }
      });
      at::parallel_for(0, g.groups * rows_per_group, 1, [&](int64_t begin, int64_t end) {
        scalar_t* w = slot<scalar_t>(scratch);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t group = task / rows_per_group, o0 = (task % rows_per_group) * b.rows;
          const int64_t rows = std::min(b.rows, g.co - o0), row0 = group * g.co + o0;
          if (bp != nullptr)
            for (int64_t n = 0; n < count; ++n)
              for (int64_t o = 0; o < rows; ++o) {
                scalar_t* out = yp + ((n0 + n) * g.C_out + row0 + o) * P;
                std::fill(out, out + P, bp[(n0 + n) * g.C_out + row0 + o]);
              }
          for (int64_t c0 = 0; c0 < g.ci; c0 += b.channels) {
            const int64_t cols = std::min(b.channels, g.ci - c0) * taps;
            const scalar_t* block = e + row0 * R + c0 * taps;
            if (n0 == 0)
              for (int64_t k = 0; k < g.K; ++k)
                for (int64_t o = 0; o < rows; ++o)
                  if (!all_finite(block + k * g.C_out * R + o * R, cols)) experts_finite = false;
            mix_kernels(r + n0 * g.K, count, g.K, block, g.C_out * R, R, rows, cols, w);
            for (int64_t n = 0; n < count; ++n)
              gemm(false, false, rows, P, cols, w + n * rows * cols, cols,
                   colp + n * sample_cols + (group * R + c0 * taps) * P, P,
                   c0 > 0 || bp != nullptr, yp + ((n0 + n) * g.C_out + row0) * P, P);
          }
        }
      });
    }
  });
  TORCH_CHECK_VALUE(x_finite, "dynamic_conv2d: x contains NaN or inf");
  TORCH_CHECK_VALUE(experts_finite, "dynamic_conv2d: experts contains NaN or inf");
  return y.view({g.N, g.C_out, g.Ho, g.Wo});
}

Grads backward_gemm(const Geometry& g, const at::Tensor& grad_out, const at::Tensor& x,
                    const at::Tensor& experts, const at::Tensor& routing) {
  const Blocking b = blocking(g, x.element_size());
  // 3×3 kernels at stride 1, padding 1 (direct(g)): the weight side is expert_grad3x3.h's kernel
  // (the backward op at batch 8, 21 alternating rounds, twice, new / BLAS time: 0.74 and 0.90 at
  // 256 channels, 8²; 0.81 and 0.86 at 256, 16²; 0.90 and 0.95 at 128, 16²; 1.01 and 1.05 at one
  // sample of 256, 8²), and the loop below computes only the input gradient.
  const bool blas_weight_side = !direct(g);
  // From 16² outputs on, the input side of those kernels is grad_x_3x3 (the folded plan's), not
  // the loop's per-sample BLAS products: forward + backward through autograd, 21 paired rounds,
  // three runs, BLAS / conv time: 1.06–1.09 at 128 channels, 16², 1.02–1.04 at 256, 16² (batch
  // 8), 0.97–1.01 at one sample of 128, 16², but 0.78–0.82 at 256, 8², which keeps the products.
  const bool conv_input_side = direct(g) && g.P() >= 256;
  const int64_t P = g.P(), R = g.R(), taps = g.taps();
  const int64_t blocks_per_group = ceil_div(g.ci, b.bwd_channels);
  const int64_t tasks = g.groups * blocks_per_group;
  const int64_t block_cols = b.bwd_channels * taps;
  at::Tensor grad_x = conv_input_side ? grad_x_3x3(g, grad_out, experts, routing)
                                      : cpu::empty_output({g.N, g.C_in, g.H, g.W}, x.options());
  at::Tensor grad_experts = cpu::empty_output({g.K, g.C_out * R}, x.options());
  at::Tensor grad_sum = at::empty({g.N, g.C_out}, x.options());
  // Per-task partial routing gradients, summed in task order afterwards: deterministic.
  at::Tensor grad_routing_parts = at::zeros({tasks, g.N, g.K}, x.options());
  // Per thread: im2col rows of the task's channels, mixed W-blocks, weight-gradient blocks, and
  // the input-gradient columns of one sample.
  const int64_t col_size = blas_weight_side ? b.bwd_samples * block_cols * P : 0;
  const int64_t mix_size = conv_input_side ? 0 : b.mix_samples * g.co * block_cols;
  const int64_t gw_size = blas_weight_side ? b.bwd_samples * b.bwd_rows * block_cols : 0;
  const int64_t gcol_size = conv_input_side ? 0 : block_cols * P;
  at::Tensor scratch = at::empty({at::get_num_threads(), col_size + mix_size + gw_size + gcol_size},
                                 x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dynamic_conv2d_backward_gemm", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gyp = grad_out.data_ptr<scalar_t>();
    const scalar_t* e = experts.data_ptr<scalar_t>();
    const scalar_t* r = routing.data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    scalar_t* gep = grad_experts.data_ptr<scalar_t>();
    A* grp = grad_routing_parts.data_ptr<A>();
    at::parallel_for(0, g.N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n)
        row_sums(gyp + n * g.C_out * P, g.C_out, P, grad_sum.data_ptr<scalar_t>() + n * g.C_out);
    });
    if (conv_input_side) return;
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      scalar_t* colb = slot<scalar_t>(scratch);
      scalar_t* w = colb + col_size;
      scalar_t* gw = w + mix_size;
      scalar_t* gcol = gw + gw_size;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t group = task / blocks_per_group;
        const int64_t c0 = (task % blocks_per_group) * b.bwd_channels;
        const int64_t channels = std::min(b.bwd_channels, g.ci - c0), cols = channels * taps;
        const int64_t col0 = c0 * taps;  // the block's first column within a kernel row
        const scalar_t* e_group = e + group * g.co * R + col0;
        for (int64_t n0 = 0; n0 < g.N; n0 += b.bwd_samples) {
          const int64_t count = std::min(b.bwd_samples, g.N - n0);
          for (int64_t n = 0; blas_weight_side && n < count; ++n)
            im2col(xp + (n0 + n) * g.C_in * g.H * g.W, g, group * g.ci + c0,
                   group * g.ci + c0 + channels, colb + n * cols * P);
          // Weight side: gW_n-blocks of bwd_rows output channels, reduced while in cache.
          for (int64_t o0 = 0; blas_weight_side && o0 < g.co; o0 += b.bwd_rows) {
            const int64_t rows = std::min(b.bwd_rows, g.co - o0), row0 = group * g.co + o0;
            for (int64_t n = 0; n < count; ++n)
              gemm(false, true, rows, cols, P, gyp + ((n0 + n) * g.C_out + row0) * P, P,
                   colb + n * cols * P, P, false, gw + n * rows * cols, cols);
            reduce_weight_grads(gw, count, rows * cols, rows, cols, r + n0 * g.K, g.K,
                                e + row0 * R + col0, g.C_out * R, R, gep + row0 * R + col0, n0 > 0,
                                grp + (task * g.N + n0) * g.K);
          }
          // Input side: W_n-block for every output channel of the group, W_nᵀ · grad_out_n, col2im.
          for (int64_t m0 = n0; m0 < n0 + count; m0 += b.mix_samples) {
            const int64_t mixed = std::min(b.mix_samples, n0 + count - m0);
            mix_kernels(r + m0 * g.K, mixed, g.K, e_group, g.C_out * R, R, g.co, cols, w);
            for (int64_t n = 0; n < mixed; ++n) {
              gemm(true, false, cols, P, g.co, w + n * g.co * cols, cols,
                   gyp + ((m0 + n) * g.C_out + group * g.co) * P, P, false, gcol, P);
              col2im(gcol, g, channels, gxp + ((m0 + n) * g.C_in + group * g.ci + c0) * g.H * g.W);
            }
          }
        }
      }
    });
  });
  if (blas_weight_side) return {grad_x, grad_experts, grad_routing_parts.sum(0), grad_sum};
  at::Tensor grad_routing = at::empty({g.N, g.K}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dynamic_conv2d_expert_grads3x3", [&] {
    expert_grad::expert_grads3x3<scalar_t>(
        x.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(), experts.data_ptr<scalar_t>(),
        routing.data_ptr<scalar_t>(), g.N, g.C_in, g.C_out, g.H, g.W, g.K,
        grad_experts.data_ptr<scalar_t>(), grad_routing.data_ptr<acc_t<scalar_t>>(),
        block_bytes() / 2);
  });
  return {grad_x, grad_experts, grad_routing, grad_sum};
}

// --- entry points ------------------------------------------------------------------------------

// Contiguous copies of the parameters (no copy when already contiguous) and x as NCHW.
struct Inputs {
  at::Tensor x, experts, routing, bias;
};

Inputs prepare(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& routing,
               const std::optional<at::Tensor>& bias) {
  return {x.contiguous(), experts.contiguous(), routing.contiguous(),
          bias.has_value() ? bias->contiguous() : at::Tensor()};
}

at::Tensor forward_cpu(const at::Tensor& x_in, const at::Tensor& experts_in,
                       const at::Tensor& routing_in, const std::optional<at::Tensor>& bias_in,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t groups) {
  check_dynamic_conv(x_in, experts_in, routing_in, bias_in, stride, padding, dilation, groups);
  check_cpu(x_in);
  // The ATen calls below are implementation details: no autograd graph of their own.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto [x, experts, routing, bias] = prepare(x_in, experts_in, routing_in, bias_in);
  const Geometry g = geometry(x, experts, stride, padding, dilation, groups);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dynamic_conv2d_check", [&] {
    TORCH_CHECK_VALUE(tensor_finite<scalar_t>(routing), "dynamic_conv2d: routing contains NaN or inf");
    TORCH_CHECK_VALUE(!bias.defined() || tensor_finite<scalar_t>(bias),
                      "dynamic_conv2d: bias contains NaN or inf");
  });
  at::Tensor y;
  if (choose_plan(g, /*forward=*/true) == Plan::gemm) {
    y = forward_gemm(g, x, experts, routing, bias);
  } else {
    y = forward_folded(g, x, experts, routing, bias);  // checks x and the experts
  }
  return to_output_layout(y, x_in);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& experts_in,
    const at::Tensor& routing_in, const std::optional<at::Tensor>& bias_in, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_dynamic_conv(x_in, experts_in, routing_in, bias_in, stride, padding, dilation, groups);
  check_cpu(x_in);
  // The ATen calls below are implementation details: no autograd graph of their own.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto [x, experts, routing, bias] = prepare(x_in, experts_in, routing_in, bias_in);
  const Geometry g = geometry(x, experts, stride, padding, dilation, groups);
  TORCH_CHECK_VALUE(grad_out_in.dim() == 4 && grad_out_in.size(0) == g.N &&
                        grad_out_in.size(1) == g.C_out && grad_out_in.size(2) == g.Ho &&
                        grad_out_in.size(3) == g.Wo && grad_out_in.scalar_type() == x.scalar_type(),
                    "dynamic_conv2d_backward: grad_out must be [", g.N, ", ", g.C_out, ", ", g.Ho,
                    ", ", g.Wo, "] of x's dtype, got ", grad_out_in.sizes(), " ",
                    grad_out_in.scalar_type());
  const at::Tensor grad_out = grad_out_in.contiguous();
  auto [grad_x, grad_experts, grad_routing, grad_sum] =
      choose_plan(g, /*forward=*/false) == Plan::gemm ? backward_gemm(g, grad_out, x, experts, routing)
                                   : backward_folded(g, grad_out, x, experts, routing);
  // Bias terms: Σ_hw grad_out per (sample, channel) gives grad_bias and, through the mixed bias,
  // grad_routing's second term.
  if (bias.defined()) grad_routing.addmm_(grad_sum, bias.t());
  return {to_output_layout(grad_x, x_in), grad_experts.view(experts.sizes()), grad_routing,
          at::mm(routing.t(), grad_sum)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("dynamic_conv2d", &forward_cpu);
  m.impl("dynamic_conv2d_backward", &backward_cpu);
}

}  // namespace dyconv
}  // namespace fastseg
