"""Memory-format rules shared by the op registrations (``fastseg.ops``) and the Triton launchers
(``fastseg.kernels``). It imports neither, so the kernels stay a leaf below the ops.

Kernels compute on NCHW-contiguous buffers; an op's output comes back in its input's memory format
(channels-last stays channels-last, anything else becomes NCHW-contiguous). ``csrc/utils.h``
mirrors these rules for the C++ ops.
"""
from __future__ import annotations

import torch


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """Memory format of an op's output for input ``x`` (mirrors ``csrc/utils.h``)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def empty_like_output(x: torch.Tensor, shape=None) -> torch.Tensor:
    """An uninitialised tensor with ``x``'s dtype/device and :func:`output_memory_format`."""
    return torch.empty(tuple(x.shape) if shape is None else shape, dtype=x.dtype, device=x.device,
                       memory_format=output_memory_format(x))
