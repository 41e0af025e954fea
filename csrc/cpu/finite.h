// The CPU kernels' NaN/inf input check, run on data they are about to use (so it is in cache).
#pragma once

#include <cstdint>

namespace fastseg {

// Whether every value of p[0, n) is finite: Σ p[i]·0 is 0 unless some p[i] is NaN or ±inf. The
// sum vectorises; a short-circuit `&&` reduction over |p[i]| ≤ max did not, and cost spatial_gate's
// forward half its time. Four independent vector sums: with one, each 64-byte step waited for
// the previous add (the chain's latency, not the loads, set the speed: a fifth of cross_gate's
// forward on data in L1).
template <typename T>
bool all_finite(const T* p, int64_t n) {
  constexpr int kLanes = 64 / sizeof(T), kSums = 4;
  T sums[kSums][kLanes] = {};
  int64_t i = 0;
  for (; i + kSums * kLanes <= n; i += kSums * kLanes)
    for (int s = 0; s < kSums; ++s)
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) sums[s][l] += p[i + s * kLanes + l] * T(0);
  // The lanes and the tail as an integer `or` of comparisons (a float sum of them is added in
  // order, one dependent add per value).
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int l = 0; l < kLanes; ++l)
    bad |= ((sums[0][l] + sums[1][l]) + (sums[2][l] + sums[3][l])) != T(0);
#pragma omp simd reduction(| : bad)
  for (int64_t j = i; j < n; ++j) bad |= p[j] * T(0) != T(0);
  return bad == 0;
}

}  // namespace fastseg
