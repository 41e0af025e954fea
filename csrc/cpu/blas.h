// Row-major GEMM on raw pointers through the BLAS torch links (MKL or OpenBLAS), for kernels that
// multiply blocks of their own buffers: no tensor is created per call.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

// The Fortran BLAS interface of the library torch is linked against (MKL or OpenBLAS export it;
// ATen calls the same functions). Weak: where torch exports none, gemm goes through at::mm.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace fastseg {

// Row-major C[m×n] (+)= op(A)·op(B), op(A) m×k and op(B) k×n, where A and B are stored row-major
// with leading dimensions lda, ldb (of the stored, untransposed matrices).
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
          const T* b, int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  constexpr bool is_float = std::is_same_v<T, float>;
  const auto blas = is_float ? reinterpret_cast<void*>(&sgemm_) : reinterpret_cast<void*>(&dgemm_);
  constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
  if (blas != nullptr && std::max({m, n, k, lda, ldb, ldc}) <= kMaxInt) {
    // Column-major BLAS sees every row-major matrix transposed: compute Cᵀ = op(B)ᵀ·op(A)ᵀ.
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
    const T one = 1, beta = accumulate ? 1 : 0;
    if constexpr (is_float) {
      sgemm_(&tb, &ta, &M, &N, &K, &one, b, &LDA, a, &LDB, &beta, c, &LDC);
    } else {
      dgemm_(&tb, &ta, &M, &N, &K, &one, b, &LDA, a, &LDB, &beta, c, &LDC);
    }
    return;
  }
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto wrap = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    at::Tensor t = at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, options);
    return trans ? t.t() : t;
  };
  const at::Tensor A = trans_a ? wrap(a, k, m, lda, true) : wrap(a, m, k, lda, false);
  const at::Tensor B = trans_b ? wrap(b, n, k, ldb, true) : wrap(b, k, n, ldb, false);
  at::Tensor C = wrap(c, m, n, ldc, false);
  if (accumulate) {
    C.addmm_(A, B);
  } else {
    at::mm_out(C, A, B);
  }
}

}  // namespace fastseg
