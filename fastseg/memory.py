"""Process-wide CPU memory settings: keep freed tensor memory for reuse instead of returning it to
the operating system.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves every request above its
mmap threshold (at most 32 MB) with a fresh ``mmap`` and unmaps it on free, so in a training loop
every large activation and gradient is a new mapping whose pages fault in, zero-filled by the
kernel, on first touch, step after step (a LGMSNet training step of batch 8 at 256²: 1–2 million
page faults; bench/RESULTS.md, "The allocator"). :func:`retain_freed_memory` makes glibc serve
all requests from its heap and never shrink it, so once the heap has settled (a few steps: PyTorch
asks for 64-byte-aligned memory, which an exactly-sized freed chunk cannot serve until freed
neighbours have merged with it) each step reuses earlier steps' pages.
The process keeps its peak footprint until it exits, and the heap can fragment into more memory
than the peak of what is alive (LGMSNet's fused 256² training step: 2.7 → 3.1 GB), so this suits
a process that repeats one kind of step (training, evaluation, prediction, benchmarks) rather than
a long-lived service. ``fastseg train``, ``evaluate`` and ``predict`` apply it unless the
environment sets ``FASTSEG_RETAIN_FREED_MEMORY=0``.

Independently of that, and without any process-wide setting, the fused CPU kernels reuse their own
large outputs' memory: :func:`set_output_cache_limit`, :func:`release_cached_outputs`,
:func:`cached_output_bytes`.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

# glibc's <malloc.h> parameter numbers
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

ENV = "FASTSEG_RETAIN_FREED_MEMORY"


def retain_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse, for the rest of this process: no
    ``mmap`` for large requests (``M_MMAP_MAX`` = 0) and no heap trimming (``M_TRIM_THRESHOLD`` =
    the largest size). Applies to allocations made after the call; memory already mapped is
    released as before.

    Returns:
        True where applied (Linux with glibc), False elsewhere (other C libraries, macOS, Windows),
        where nothing changes.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt takes an int; glibc stores the trim threshold as a size_t, so -1 is the largest size.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))


def retain_freed_memory_from_environment(default: bool) -> bool:
    """:func:`retain_freed_memory` when ``FASTSEG_RETAIN_FREED_MEMORY`` is ``1``, or is unset and
    ``default`` is true; otherwise nothing. Returns whether it was applied.

    Raises:
        ValueError: the variable is set to anything but ``0`` or ``1``.
    """
    value = os.environ.get(ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{ENV} must be 0 or 1, got {value!r}")
    if value == "0" or (value == "" and not default):
        return False
    return retain_freed_memory()


# The CPU kernels' output cache (csrc/cpu/output_cache.h): outputs and input gradients of at least
# 1 MiB reuse the storage of earlier ones that no tensor holds any more.

def _ops():
    """``torch.ops.fastseg``, or None where the C++ extension is not built."""
    from .backend import extension
    if extension() is None:
        return None
    import torch
    return torch.ops.fastseg


def set_output_cache_limit(limit_bytes: int) -> int:
    """Set how many bytes of output storage the fused CPU kernels' cache may reference, in use or
    not; 0 switches it off and releases what it holds. The first limit is
    ``FASTSEG_OUTPUT_CACHE_MB`` (MiB; default 2048).

    The cache: every output or input gradient of at least 1 MiB that a ``cpu`` kernel returns is
    referenced by the cache too; a later output of the same byte size takes the storage of one
    that no tensor holds any more (most recently used first), instead of fresh memory whose pages
    the operating system zero-fills one fault at a time (≈ 12 ms for a 32 MiB output on the
    machines of bench/RESULTS.md, "The output cache"). What it keeps alive that no tensor uses is
    below the limit at all times; :func:`release_cached_outputs` frees it.

    Returns:
        The previous limit in bytes (0 where the C++ extension is not built: nothing is cached).

    Raises:
        ValueError: ``limit_bytes`` is negative.
    """
    if limit_bytes < 0:
        raise ValueError(f"limit_bytes must be >= 0, got {limit_bytes}")
    ops = _ops()
    return 0 if ops is None else int(ops.set_output_cache_limit(int(limit_bytes)))


def release_cached_outputs() -> int:
    """Free the cached output storages that no tensor uses; returns their bytes."""
    ops = _ops()
    return 0 if ops is None else int(ops.release_cached_outputs())


def cached_output_bytes() -> tuple[int, int]:
    """Bytes of the storages the output cache references: ``(in use by a tensor, used by none)``."""
    ops = _ops()
    if ops is None:
        return 0, 0
    used, unused = ops.cached_output_bytes()
    return int(used), int(unused)
