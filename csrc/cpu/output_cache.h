// Output memory of the CPU kernels: large outputs reuse the storage of earlier outputs that no
// tensor holds any more, instead of fresh memory whose pages fault in on first write.
//
// PyTorch's CPU tensors come from the C library's malloc, which maps every request above its mmap
// threshold (at most 32 MiB; often less) afresh and unmaps it when freed. In a training loop each
// step's large activations and gradients are then new mappings, zero-filled by the kernel one
// 4 KiB page fault at a time: ≈ 12 ms for a 32 MiB output on the machines of bench/RESULTS.md,
// more than the kernel that writes it takes ("The output cache"). `empty_output` keeps a strong
// reference to the storage of every output of at least kOutputCacheMinBytes it hands out; a
// later request of the same byte size takes a storage whose only reference is the cache's, i.e.
// one whose tensors are all gone (use_count() == 1), most recently used first.
//
// Bounds: the storages the cache references, in use or not, total at most its limit (least
// recently used dropped first), so the memory it keeps alive that no tensor uses is below the
// limit at all times. The limit starts at FASTSEG_OUTPUT_CACHE_MB (MiB; default kDefaultLimitMiB,
// 0 switches the cache off) and is set by `set_output_cache_limit`; `release_cached_outputs`
// drops every storage no tensor uses. Python: fastseg.memory.
#pragma once

#include <ATen/ATen.h>

#include <utility>

namespace fastseg::cpu {

// Smaller requests are served from malloc's heap, whose pages are mostly mapped already.
constexpr int64_t kOutputCacheMinBytes = int64_t(1) << 20;
constexpr int64_t kDefaultLimitMiB = 2048;

// An uninitialised tensor of `sizes` in `format` (Contiguous or ChannelsLast), like
// at::empty(sizes, options.memory_format(format)); its memory may be an earlier output's.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                        at::MemoryFormat format = at::MemoryFormat::Contiguous);

// Sets the limit in bytes (0: off, and every cached storage released) and returns the previous one.
int64_t set_output_cache_limit(int64_t bytes);

// Drops the storages no tensor uses; returns their bytes.
int64_t release_cached_outputs();

// Bytes of the storages the cache references: (in use by some tensor, used by none).
std::pair<int64_t, int64_t> cached_output_bytes();

}  // namespace fastseg::cpu
