"""Backend selection for fastseg's fused ops.

Every op has four implementations with one meaning:

* ``reference``: pure PyTorch; the definition of the semantics. Runs anywhere.
* ``cpu``: C++ kernels in the extension ``fastseg._C`` (CPU tensors).
* ``cuda``: CUDA C++ kernels in ``fastseg._C`` (CUDA tensors; needs a CUDA build of the extension).
* ``triton``: Triton kernels in ``fastseg.kernels`` (CUDA tensors; CPU tensors only under the
  Triton interpreter, ``TRITON_INTERPRET=1``).

Which one runs is decided per call, in this order of precedence:

1. an explicit ``backend=`` argument of an op or layer (anything but ``"auto"``);
2. :func:`use_backend` (a global setter that also works as a context manager);
3. the environment variable ``FASTSEG_BACKEND``;
4. ``"auto"``: the fastest fused backend available for the tensor's device (CUDA tensors: cuda,
   else triton, the cuda backend's calls having been the faster on an H200 for both models;
   CPU tensors: cpu, else reference).

A requested backend that cannot run on the tensor's device is replaced by the ``auto`` choice, with
one warning (per backend, device type and reason) that says why.
"""
from __future__ import annotations

import functools
import importlib
import os
import threading
import warnings

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
_CHOICES = BACKENDS + ("auto",)

_state = threading.local()
_global_backend: str | None = None
_warned: set[tuple[str, str, str]] = set()  # (backend, device type, reason): warn once each


def _check_name(name: str, argname: str = "backend") -> str:
    if not isinstance(name, str) or name not in _CHOICES:
        raise ValueError(f"{argname} must be one of {_CHOICES}, got {name!r}")
    return name


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled extension module ``fastseg._C``, or ``None`` (with the reason logged) if absent."""
    try:
        return importlib.import_module("fastseg._C")
    except ImportError as exc:  # not built: the package still works on the reference backend
        _extension_error.append(str(exc))
        return None


_extension_error: list[str] = []


def has_cuda_kernels() -> bool:
    """Whether ``fastseg._C`` was compiled with its CUDA sources (their kernels are registered)."""
    return extension() is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastseg::mixed_depthwise_conv2d", "CUDA")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"triton cannot be imported ({exc})"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_CPU_DTYPES = (torch.float32, torch.float64)


def unavailable_reason(backend: str, device_type: str, dtype: torch.dtype | None = None) -> str | None:
    """Why ``backend`` cannot run on ``dtype`` tensors of ``device_type`` (``"cpu"``/``"cuda"``),
    or ``None`` if it can."""
    _check_name(backend)
    if backend in ("reference", "auto"):
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs on CPU tensors, not {device_type} tensors"
        if dtype is not None and dtype not in _CPU_DTYPES:
            return f"the cpu backend computes in float32 and float64, not {dtype}"
        if extension() is None:
            return "the C++ extension fastseg._C is not built (" + "; ".join(_extension_error) + ")"
        return None
    if backend == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs on CUDA tensors, not {device_type} tensors"
        if extension() is None:
            return "the C++ extension fastseg._C is not built"
        if not has_cuda_kernels():
            return "fastseg._C was built without CUDA sources (rebuild with FASTSEG_CUDA=1)"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    # triton
    err = _triton_import_error()
    if err is not None:
        return err
    if device_type == "cpu" and not _interpreting():
        return "triton runs on CPU tensors only under the interpreter (TRITON_INTERPRET=1)"
    if device_type not in ("cpu", "cuda"):
        return f"triton does not run on {device_type} tensors"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Names of the backends that can run on ``device`` (default: CUDA if present, else CPU).

    Example: ``["reference", "cpu"]`` on a CPU-only machine with the extension built.
    """
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    return [b for b in BACKENDS if unavailable_reason(b, dev.type) is None]


def _auto(device_type: str, dtype: torch.dtype | None) -> str:
    order = ("cuda", "triton") if device_type == "cuda" else ("cpu",)
    for b in order:
        if unavailable_reason(b, device_type, dtype) is None:
            return b
    return "reference"


def requested_backend(backend: str = "auto") -> str:
    """The backend name in force for a call given its ``backend=`` argument (may be ``"auto"``)."""
    _check_name(backend)
    if backend != "auto":
        return backend
    scoped = getattr(_state, "stack", None)
    if scoped:
        return scoped[-1]
    if _global_backend is not None:
        return _global_backend
    env = os.environ.get("FASTSEG_BACKEND", "").strip()
    if env:
        return _check_name(env, "FASTSEG_BACKEND")
    return "auto"


def _assume_constant_result(fn):
    """What ``torch.compiler.assume_constant_result`` does (torch/_dynamo/decorators.py), without
    importing ``torch._dynamo`` to do it: that import costs more than ``import torch`` itself, and
    dynamo reads the mark only when it traces, by which time it is loaded. A test checks that the
    two set the same mark."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The concrete backend that runs a call on ``dtype`` tensors on ``device`` (never ``"auto"``).

    Under ``torch.compile`` it runs once at trace time and its answer is baked into the graph.
    """
    want = requested_backend(backend)
    if want == "auto":
        return _auto(device.type, dtype)
    why = unavailable_reason(want, device.type, dtype)
    if why is None:
        return want
    chosen = _auto(device.type, dtype)
    key = (want, device.type, why)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"fastseg: backend {want!r} is unavailable ({why}); using {chosen!r}",
                      RuntimeWarning, stacklevel=3)
    return chosen


class use_backend:
    """Select the backend for every fastseg op whose ``backend=`` is ``"auto"``.

    ``fastseg.use_backend("reference")`` sets it globally (``use_backend(None)`` clears it);
    ``with fastseg.use_backend("cpu"): ...`` sets it for a block only (per thread) and restores the
    previous choice on exit.
    """

    def __init__(self, name: str | None):
        global _global_backend
        if name is not None:
            _check_name(name, "name")
        self.name = name
        self._previous = _global_backend
        _global_backend = name

    def __enter__(self):
        global _global_backend
        # The constructor already set it globally; inside a `with` the choice is scoped instead.
        _global_backend = self._previous
        stack = getattr(_state, "stack", None)
        if stack is None:
            stack = _state.stack = []
        stack.append(self.name if self.name is not None else "auto")
        return self

    def __exit__(self, *exc):
        _state.stack.pop()
        return False
