// Qualifiers for math shared by the CPU (host compiler) and CUDA (nvcc) kernels.
#pragma once

#if defined(__CUDACC__)
#define FASTSEG_HD __host__ __device__ __forceinline__
// Fixed-size inner loops: unrolled into registers on the GPU, vectorised on the CPU.
#define FASTSEG_VECTOR_LOOP _Pragma("unroll")
#define FASTSEG_VECTOR_SUM(var) _Pragma("unroll")
#else
#define FASTSEG_HD inline __attribute__((always_inline))
#define FASTSEG_VECTOR_LOOP _Pragma("omp simd")
#define FASTSEG_VECTOR_SUM_(clause) _Pragma(#clause)
#define FASTSEG_VECTOR_SUM(var) FASTSEG_VECTOR_SUM_(omp simd reduction(+ : var))
#endif

namespace fastseg {

template <typename T>
FASTSEG_HD T imin(T a, T b) { return a < b ? a : b; }
template <typename T>
FASTSEG_HD T imax(T a, T b) { return a > b ? a : b; }

// Accumulation type: float for float/half/bfloat16, double for double.
template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };
template <typename T> using acc_t = typename acc_type<T>::type;

}  // namespace fastseg
