"""How every Triton launcher in ``fastseg.kernels`` starts a kernel, so that the launches it would
make can be listed without running them.

Launchers call :func:`launch` instead of ``kernel[grid](...)``. Normally that runs the kernel.
Inside :func:`record_launches` it only records a :class:`Launch` (kernel, grid, arguments,
compile-time constants, ``num_warps``); called on tensors of the ``meta`` device, a launcher then
yields exactly the configurations it would compile for those shapes, without memory or a GPU. The
static GPU check (``python -m fastseg gpu-report``) compiles those for real GPU targets.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, NamedTuple


class Launch(NamedTuple):
    """One kernel launch: ``kernel[grid](*args, num_warps=num_warps, **constexprs)``."""
    kernel: Any
    grid: tuple
    args: tuple
    constexprs: dict
    num_warps: int


_recording: contextvars.ContextVar = contextvars.ContextVar("fastseg_launches", default=None)


def launch(kernel, grid, *args, num_warps: int = 4, **constexprs) -> None:
    """Run ``kernel`` on ``grid`` with ``args`` (or only record it inside :func:`record_launches`)."""
    recorded = _recording.get()
    if recorded is not None:
        recorded.append(Launch(kernel, tuple(grid), args, constexprs, num_warps))
        return
    kernel[tuple(grid)](*args, num_warps=num_warps, **constexprs)


@contextlib.contextmanager
def record_launches():
    """Collect the launches made in the block into the yielded list instead of running them."""
    recorded: list[Launch] = []
    token = _recording.set(recorded)
    try:
        yield recorded
    finally:
        _recording.reset(token)
