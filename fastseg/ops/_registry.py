"""The registration pattern every fused op follows.

Each kernel entry point is one ``torch.library`` custom op in the ``fastseg`` namespace:

* the C++ ops (backends ``cpu`` and ``cuda``) are declared with ``TORCH_LIBRARY`` in
  ``csrc/ops.cpp``; the Triton ops are declared here with :func:`torch.library.custom_op`;
* every op has a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces it
  without a graph break;
* the forward op gets autograd through :func:`torch.library.register_autograd`, and its backward
  is a custom op of its own.

Kernels compute on NCHW-contiguous buffers (``batch_norm_act`` computes channels-last inputs in
their own layout). Channels-last and non-contiguous inputs are copied once to that layout on entry
(documented per op); outputs come back in the input's memory format
(channels-last stays channels-last): :mod:`fastseg._layout` decides it, for the kernels and for
the fake implementations alike.

Under ``torch.autocast`` every public op casts its floating-point tensor arguments to one dtype
first (:func:`autocast_inputs`) and computes with autocast off, so a model of fastseg layers
trains with mixed precision as a plain PyTorch one does.
"""
from __future__ import annotations

import functools
import math

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


def check_finite(named) -> None:
    """``ValueError`` naming the first of ``named`` (``(name, tensor or None)`` pairs) that holds
    NaN or inf; nothing while compiling, nothing for tensors off the CPU. One reduction per
    tensor: a NaN or inf element makes the sum non-finite, so only a non-finite sum (which finite
    values can also give, by overflow) is looked at element by element.

    GPU tensors are not checked: reading a reduction's result back makes the host wait for all
    the work queued on the device, once per tensor and call. On H200s at the models' shapes, the
    fused ops' calls took a median 1.2–2.0× as long (per family and backend) in a run with the
    checks as in one without, where the eager references moved 1.0–1.4× (bench/RESULTS.md,
    "GPU")."""
    if torch.compiler.is_compiling():
        return
    for name, t in named:
        if t is None or not t.is_floating_point() or t.device.type != "cpu":
            continue
        t = t.detach()  # no autograd record of the check
        # math.isfinite on the Python float: one reduction and one read, where torch.isfinite
        # on the 0-d sum adds four more small ops per tensor (≈ 10 µs of a batch-1 model's step
        # each time)
        if not math.isfinite(t.sum().item()) and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf")


def _cast_floats(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    return value


def _floats(values):
    for value in values:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                yield value
        elif isinstance(value, (list, tuple)):
            yield from _floats(value)


def autocast_inputs(op):
    """Decorator of a public op: under ``torch.autocast`` for its tensors' device, the
    floating-point tensor arguments (also inside lists) are cast to one dtype and the op runs
    with autocast disabled.

    The dtype is the widest among them (autocast's "promote" policy, as for ``torch.cat``): a
    bfloat16 activation meeting a float32 weight computes in float32, float16 q/k/v of an
    attention stay float16. On CPU it is at least float32, the type the C++ kernels compute
    in. Outside autocast the op is called unchanged.
    """
    @functools.wraps(op)
    def wrapper(*args, **kwargs):
        floats = list(_floats([*args, *kwargs.values()]))
        if not floats:
            return op(*args, **kwargs)
        device_type = floats[0].device.type
        if not torch.is_autocast_enabled(device_type):
            return op(*args, **kwargs)
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in floats))
        if device_type == "cpu":
            dtype = torch.promote_types(dtype, torch.float32)
        args = _cast_floats(args, dtype)
        kwargs = {k: _cast_floats(v, dtype) for k, v in kwargs.items()}
        with torch.autocast(device_type, enabled=False):
            return op(*args, **kwargs)
    return wrapper
