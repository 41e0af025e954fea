// Host emulation of the CUDA built-ins the fastseg kernels use, so that a kernel file compiled by
// the host compiler runs its real kernels on the CPU (tests/test_cuda_host_emulation.py).
//
// A launch runs its blocks one after another on one std::thread per thread of a block; they meet
// at a std::barrier for __syncthreads and after each block. __shared__ arrays become
// function-local statics, shared by the block's threads; threadIdx and blockIdx are thread-locals.
// Include it before the kernel file; the test rewrites `kernel<<<grid, block, 0, stream>>>(args)`
// into `fastseg_emu::launch(grid, block, kernel, args)`.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <barrier>
#include <cmath>
#include <thread>
#include <vector>

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static

inline thread_local uint3 threadIdx, blockIdx;

namespace fastseg_emu {

inline std::barrier<>* block_barrier = nullptr;

template <typename... Params, typename... Args>
void launch(unsigned grid, unsigned block, void (*kernel)(Params...), const Args&... args) {
  std::barrier<> barrier(block);
  block_barrier = &barrier;
  std::vector<std::thread> threads;
  threads.reserve(block);
  for (unsigned t = 0; t < block; ++t)
    threads.emplace_back([&, t] {
      threadIdx = {t, 0, 0};
      for (unsigned b = 0; b < grid; ++b) {
        blockIdx = {b, 0, 0};
        kernel(args...);
        barrier.arrive_and_wait();  // the block's shared statics are the next block's
      }
    });
  for (auto& thread : threads) thread.join();
}

}  // namespace fastseg_emu

inline void __syncthreads() { fastseg_emu::block_barrier->arrive_and_wait(); }
