"""The registration pattern every fused op follows.

Each kernel entry point is one ``torch.library`` custom op in the ``fastseg`` namespace:

* the C++ ops (backends ``cpu`` and ``cuda``) are declared with ``TORCH_LIBRARY`` in
  ``csrc/ops.cpp``; the Triton ops are declared here with :func:`torch.library.custom_op`;
* every op has a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces it
  without a graph break;
* the forward op gets autograd through :func:`torch.library.register_autograd`, and its backward
  is a custom op of its own.

Kernels compute on NCHW-contiguous buffers. Channels-last and non-contiguous inputs are copied
once to that layout on entry (documented per op); outputs come back in the input's memory format
(channels-last stays channels-last): :mod:`fastseg._layout` decides it, for the kernels and for
the fake implementations alike.
"""
from __future__ import annotations

import torch

from ..backend import extension


def cpp_op(name: str):
    """``torch.ops.fastseg.<name>`` if the extension is built, else ``None``."""
    if extension() is None:
        return None
    return getattr(torch.ops.fastseg, name)


def register_cpp(name: str, fake_fwd, fake_bwd, setup_context, backward) -> None:
    """Attach fake implementations and autograd to the C++ op pair ``name`` / ``name_backward``."""
    if extension() is None:
        return
    torch.library.register_fake(f"fastseg::{name}")(fake_fwd)
    torch.library.register_fake(f"fastseg::{name}_backward")(fake_bwd)
    torch.library.register_autograd(f"fastseg::{name}", backward, setup_context=setup_context)
