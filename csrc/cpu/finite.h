// The CPU kernels' NaN/inf input check, run on data they are about to use (so it is in cache).
#pragma once

#include <cstdint>

namespace fastseg {

// Whether every value of p[0, n) is finite: Σ p[i]·0 is 0 unless some p[i] is NaN or ±inf. The
// sum vectorises; a short-circuit `&&` reduction over |p[i]| ≤ max did not, and cost spatial_gate's
// forward half its time.
template <typename T>
bool all_finite(const T* p, int64_t n) {
  T zero = 0;
#pragma omp simd reduction(+ : zero)
  for (int64_t i = 0; i < n; ++i) zero += p[i] * T(0);
  return zero == T(0);
}

}  // namespace fastseg
