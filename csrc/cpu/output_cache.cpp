// The CPU kernels' output cache (see output_cache.h) and its three ops.
#include "cpu/output_cache.h"

#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

namespace fastseg::cpu {
namespace {

int64_t limit_from_environment() {
  const char* value = std::getenv("FASTSEG_OUTPUT_CACHE_MB");
  if (value == nullptr || *value == '\0') return kDefaultLimitMiB << 20;
  char* end = nullptr;
  const long long mib = std::strtoll(value, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && mib >= 0, "FASTSEG_OUTPUT_CACHE_MB must be a whole number of MiB >= 0, got '",
                    value, "'");
  return int64_t(mib) << 20;
}

class OutputCache {
 public:
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
    const int64_t nbytes = c10::multiply_integers(sizes) * int64_t(options.dtype().itemsize());
    if (nbytes >= kOutputCacheMinBytes) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (limit_ < 0) limit_ = limit_from_environment();
      if (nbytes <= limit_) {
        // most recently used first: its pages are the likeliest to be in cache still
        for (auto it = entries_.rbegin(); it != entries_.rend(); ++it) {
          if (it->nbytes != nbytes || int64_t(it->storage.nbytes()) != nbytes || it->storage.use_count() != 1) continue;
          Entry entry = *it;
          entries_.erase(std::next(it).base());
          entries_.push_back(entry);
          const c10::Storage& storage = entry.storage;
          at::Tensor t = at::empty({0}, options);
          if (format == at::MemoryFormat::ChannelsLast)
            t.set_(storage, 0, sizes, c10::get_channels_last_strides_2d(sizes));
          else
            t.set_(storage, 0, sizes, c10::contiguous_strides(sizes));
          return t;
        }
        at::Tensor t = at::empty(sizes, options.memory_format(format));
        entries_.push_back({t.storage(), nbytes});
        bytes_ += nbytes;
        trim(limit_);
        return t;
      }
    }
    return at::empty(sizes, options.memory_format(format));
  }

  int64_t set_limit(int64_t bytes) {
    TORCH_CHECK_VALUE(bytes >= 0, "the output cache limit must be >= 0 bytes, got ", bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t previous = limit_ < 0 ? limit_from_environment() : limit_;
    limit_ = bytes;
    trim(limit_);
    return previous;
  }

  int64_t release() {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t released = 0;
    std::vector<Entry> kept;
    for (auto& entry : entries_) {
      if (entry.storage.use_count() == 1)
        released += entry.nbytes;
      else
        kept.push_back(std::move(entry));
    }
    entries_ = std::move(kept);
    bytes_ -= released;
    return released;
  }

  std::pair<int64_t, int64_t> bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t used = 0, unused = 0;
    for (const auto& entry : entries_) (entry.storage.use_count() == 1 ? unused : used) += entry.nbytes;
    return {used, unused};
  }

 private:
  // least recently used first
  void trim(int64_t limit) {
    size_t drop = 0;
    while (drop < entries_.size() && bytes_ > limit) bytes_ -= entries_[drop++].nbytes;
    entries_.erase(entries_.begin(), entries_.begin() + drop);
  }

  struct Entry {
    c10::Storage storage;
    int64_t nbytes;  // when handed out (a tensor may resize its storage since)
  };
  std::mutex mutex_;
  std::vector<Entry> entries_;  // least recently used first
  int64_t bytes_ = 0;           // sum of entries_' nbytes
  int64_t limit_ = -1;          // -1: not read from the environment yet
};

// Never destroyed: storages it references may be freed at exit after static destructors ran.
OutputCache& cache() {
  static OutputCache* instance = new OutputCache();
  return *instance;
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  return cache().empty(sizes, options, format);
}

int64_t set_output_cache_limit(int64_t bytes) { return cache().set_limit(bytes); }

int64_t release_cached_outputs() { return cache().release(); }

std::pair<int64_t, int64_t> cached_output_bytes() { return cache().bytes(); }

}  // namespace fastseg::cpu

TORCH_LIBRARY_FRAGMENT(fastseg, m) {
  m.def("set_output_cache_limit(int bytes) -> int", &fastseg::cpu::set_output_cache_limit);
  m.def("release_cached_outputs() -> int", &fastseg::cpu::release_cached_outputs);
  m.def("cached_output_bytes() -> int[]", [] {
    const auto [used, unused] = fastseg::cpu::cached_output_bytes();
    return std::vector<int64_t>{used, unused};
  });
}
