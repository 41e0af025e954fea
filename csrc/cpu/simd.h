// The vector types of the register-blocked CPU kernels (direct_conv.h, pointwise.h), as GCC
// vector extensions: one vector is the widest the build targets, 64 bytes with AVX-512 and 32
// otherwise (AVX2; -march decides, see setup.py).
#pragma once

#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace fastseg {
namespace simd {

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#else
constexpr int kVectorBytes = 32;
#endif

template <typename T>
using Vec __attribute__((vector_size(kVectorBytes))) = T;
template <typename T>
using UnalignedVec __attribute__((vector_size(kVectorBytes), aligned(sizeof(T)))) = T;
template <typename T>
constexpr int kLanes = kVectorBytes / sizeof(T);

template <typename T>
inline Vec<T> load(const T* p) { return *reinterpret_cast<const UnalignedVec<T>*>(p); }

// The first address from p on that is aligned to the vector (p must have room for up to
// kLanes<T> − 1 values more).
template <typename T>
inline T* aligned(T* p) {
  const auto address = reinterpret_cast<std::uintptr_t>(p);
  return p + (kVectorBytes - address % kVectorBytes) % kVectorBytes / sizeof(T);
}

// Stores the first `lanes` values of v to p (all of them with one vector store when lanes is
// kLanes<T>): a tile's last vector of a row that ends inside it.
template <typename T>
__attribute__((always_inline)) inline void store_lanes(T* p, const Vec<T>& v, int lanes) {
  if (lanes == kLanes<T>) {
    *reinterpret_cast<UnalignedVec<T>*>(p) = v;
  } else {
    for (int l = 0; l < lanes; ++l) p[l] = v[l];
  }
}

// Lanes l of p whose bit l of `lanes` is set, the others 0; the others are not read (no fault
// where they lie outside the buffer). One masked load with AVX2 and AVX-512: im2col's rows, whose
// pixels in the padding are 0.
template <typename T>
__attribute__((always_inline)) inline Vec<T> load_masked(const T* p, uint32_t lanes) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>)
    return (Vec<T>)_mm512_maskz_loadu_ps(static_cast<__mmask16>(lanes), p);
  else
    return (Vec<T>)_mm512_maskz_loadu_pd(static_cast<__mmask8>(lanes), p);
#elif defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i set = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(lanes)), bit);
    return (Vec<T>)_mm256_maskload_ps(p, _mm256_cmpeq_epi32(set, bit));
  } else {
    const __m256i bit = _mm256_setr_epi64x(1, 2, 4, 8);
    const __m256i set = _mm256_and_si256(_mm256_set1_epi64x(lanes), bit);
    return (Vec<T>)_mm256_maskload_pd(p, _mm256_cmpeq_epi64(set, bit));
  }
#else
  Vec<T> v{};
  for (int l = 0; l < kLanes<T>; ++l)
    if (lanes >> l & 1) v[l] = p[l];
  return v;
#endif
}

// Lanes l of p with lo <= l < hi (lo and hi may lie outside [0, kLanes<T>]), the others 0 and not
// read, as load_masked.
template <typename T>
__attribute__((always_inline)) inline Vec<T> load_range(const T* p, int64_t lo, int64_t hi) {
  constexpr int L = kLanes<T>;
  lo = lo < 0 ? 0 : lo > L ? L : lo;
  hi = hi < lo ? lo : hi > L ? L : hi;
  return load_masked(p, ((1u << hi) - 1) & ~((1u << lo) - 1));
}

// The first `lanes` values at p, the others 0 and not read (one plain vector load when lanes is
// kLanes<T>): a tile's last vector of a row that ends inside it.
template <typename T>
__attribute__((always_inline)) inline Vec<T> load_lanes(const T* p, int lanes) {
  return lanes == kLanes<T> ? load(p) : load_range(p, 0, lanes);
}

// Stores v to p (aligned to the vector; called as stream<T>) with a non-temporal store: the
// cache line is written without being read first and is not kept in the caches. Such stores are
// not ordered with other stores: a thread calls stream_fence() after its last one, before another
// thread reads them. (A plain store without AVX.)
template <typename T>
__attribute__((always_inline)) inline void stream(T* p, const Vec<T>& v) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) _mm512_stream_ps(p, (__m512)v);
  else _mm512_stream_pd(p, (__m512d)v);
#elif defined(__AVX__)
  if constexpr (std::is_same_v<T, float>) _mm256_stream_ps(p, (__m256)v);
  else _mm256_stream_pd(p, (__m256d)v);
#else
  *reinterpret_cast<Vec<T>*>(p) = v;
#endif
}

__attribute__((always_inline)) inline void stream_fence() { _mm_sfence(); }

// Whether p is aligned to the vector.
template <typename T>
inline bool is_aligned(const T* p) {
  return reinterpret_cast<std::uintptr_t>(p) % kVectorBytes == 0;
}

// Outer-product register tiles (expert_grad3x3.h, mixed_gemm.h): kOuterRows rows × kOuterVectors
// vectors of accumulators, one broadcast per row and kOuterVectors loads per step. AVX-512: 6 × 4
// accumulators + 4 loaded vectors + a broadcast of 32 registers; AVX2: 2 × 4 + 4 + 1 of 16.
constexpr int kOuterVectors = 4;
#if defined(__AVX512F__)
constexpr int kOuterRows = 6;
#else
constexpr int kOuterRows = 2;
#endif

// An outer-product tile's sums over `steps` steps: acc[r][v] += rows[r][s] · panel[s·stride + v·L]
// for s < steps (per step: PV vector loads, one broadcast per row, RB·PV FMAs).
template <typename T, int RB, int PV>
__attribute__((always_inline)) inline void outer_product_sums(const T* const* rows, const T* panel,
                                                              int64_t stride, int64_t steps,
                                                              Vec<T> (&acc)[RB][PV]) {
  for (int64_t s = 0; s < steps; ++s) {
    Vec<T> xv[PV];
#pragma GCC unroll 4
    for (int v = 0; v < PV; ++v) xv[v] = load(panel + s * stride + v * kLanes<T>);
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      const T b = rows[r][s];
#pragma GCC unroll 4
      for (int v = 0; v < PV; ++v) acc[r][v] += b * xv[v];
    }
  }
}

// Calls f.template operator()<N>() with N = n as a compile-time constant for n in 1..8 (expert
// counts, samples folded together: loops over them then unroll and their values stay in
// registers), else with N = 0 (the caller's general case).
template <typename F>
void dispatch_up_to_8(int64_t n, F&& f) {
  switch (n) {
    case 1: return f.template operator()<1>();
    case 2: return f.template operator()<2>();
    case 3: return f.template operator()<3>();
    case 4: return f.template operator()<4>();
    case 5: return f.template operator()<5>();
    case 6: return f.template operator()<6>();
    case 7: return f.template operator()<7>();
    case 8: return f.template operator()<8>();
    default: return f.template operator()<0>();
  }
}

// A tile's accumulators: acc[c][v] = b[c] in every lane (0 where b is null).
template <typename T, int CB, int PV>
__attribute__((always_inline)) inline void fill(Vec<T> (&acc)[CB][PV], const T* b) {
#pragma GCC unroll 8
  for (int c = 0; c < CB; ++c) {
    const T init = b ? b[c] : T(0);
#pragma GCC unroll 4
    for (int v = 0; v < PV; ++v) acc[c][v] = Vec<T>{} + init;
  }
}

// 16 × 16 float32 transposes (channels-last ↔ planes, mixed_depthwise_conv.cpp): 16 vectors of
// 16 values (64 bytes whatever the build targets; GCC splits them on AVX2), transposed in
// registers by four rounds: round K swaps the two off-diagonal K × K blocks of every 2K × 2K
// diagonal square, K = 8, 4, 2, 1.
using Float32x16 __attribute__((vector_size(64))) = float;
using UnalignedFloat32x16 __attribute__((vector_size(64), aligned(4))) = float;

// (On AVX2 builds GCC notes that passing a 64-byte vector differs from AVX-512's ABI; these are
// inlined, never called across translation units: setup.py passes -Wno-psabi.)
__attribute__((always_inline)) inline Float32x16 load16(const float* p) {
  return *reinterpret_cast<const UnalignedFloat32x16*>(p);
}
__attribute__((always_inline)) inline void store16(float* p, Float32x16 v) {
  *reinterpret_cast<UnalignedFloat32x16*>(p) = v;
}

namespace detail {
// Rows a and a + K, with K × K blocks: a keeps its own lanes j without bit K and takes b's block
// before them; b takes a's block after them and keeps its own.
template <int K, std::size_t... J>
__attribute__((always_inline)) inline void swap_blocks(Float32x16& a, Float32x16& b, std::index_sequence<J...>) {
  const Float32x16 upper = __builtin_shufflevector(a, b, ((J & K) ? 16 + J - K : J)...);
  const Float32x16 lower = __builtin_shufflevector(a, b, ((J & K) ? 16 + J : J + K)...);
  a = upper;
  b = lower;
}
template <int K>
__attribute__((always_inline)) inline void transpose_round(Float32x16 (&v)[16]) {
#pragma GCC unroll 16
  for (int a = 0; a < 16; ++a)
    if (!(a & K)) swap_blocks<K>(v[a], v[a + K], std::make_index_sequence<16>{});
}
}  // namespace detail

// 8 rows of 16 values, v[r][j], → the 16 columns as 16 runs of 8 values, in 8 vectors: lane
// 8·(j mod 2) + r of v[j / 2] (rows r interleaved, as a GEMM or direct_conv packs a block of 8
// kernel rows). Four rounds, each exchanging a bit of the vector index with a bit of the lane
// index (the lane's 1, 2, 4, then 8 with the vector's 1, 2, 4, then 1), after which result
// vector m is in v[0, 2, 4, 6, 1, 3, 5, 7][m]; the last lines put them in order.
__attribute__((always_inline)) inline void transpose8x16(Float32x16 (&v)[8]) {
  const auto round = [&]<int K, int B>() {
#pragma GCC unroll 8
    for (int a = 0; a < 8; ++a)
      if (!(a & B)) detail::swap_blocks<K>(v[a], v[a + B], std::make_index_sequence<16>{});
  };
  round.template operator()<1, 1>();
  round.template operator()<2, 2>();
  round.template operator()<4, 4>();
  round.template operator()<8, 1>();
  // vector (b2 b1 b0) holds columns 2·m, 2·m + 1 with m = 4·b0 + 2·b2 + b1
  const Float32x16 t[8] = {v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]};
  v[0] = t[0], v[1] = t[2], v[2] = t[4], v[3] = t[6], v[4] = t[1], v[5] = t[3], v[6] = t[5],
  v[7] = t[7];
}

// v[r][c] → v[c][r]
__attribute__((always_inline)) inline void transpose16(Float32x16 (&v)[16]) {
  detail::transpose_round<8>(v);
  detail::transpose_round<4>(v);
  detail::transpose_round<2>(v);
  detail::transpose_round<1>(v);
}

}  // namespace simd
}  // namespace fastseg
