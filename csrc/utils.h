// Host-side helpers shared by the torch bindings of every op.
#pragma once

#include <ATen/ATen.h>

namespace fastseg {

// Outputs keep the input's layout: channels-last stays channels-last, anything else becomes
// NCHW-contiguous. Mirrors fastseg/ops/_registry.py:output_memory_format (the fake kernels).
inline at::MemoryFormat output_memory_format(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

// Kernels compute on NCHW-contiguous buffers; returns `buffer` in `x`'s output layout.
inline at::Tensor to_output_layout(const at::Tensor& buffer, const at::Tensor& x) {
  return buffer.contiguous(output_memory_format(x));
}

}  // namespace fastseg
