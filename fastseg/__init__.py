"""fastseg: fused kernels, drop-in layers and lightweight medical image segmentation models.

Import cost is kept low: the op registry and layers load here; data, metrics and losses load on
first use (``fastseg.data``, ``fastseg.metrics``, ``fastseg.losses``).
"""
import importlib

from .backend import BACKENDS, available_backends, use_backend
from . import ops, layers

__version__ = "0.1.0"

_LAZY = {
    "data": "fastseg.data",
    "engine": "fastseg.engine",
    "metrics": "fastseg.metrics",
    "losses": "fastseg.losses",
}


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        globals()[name] = module
        return module
    raise AttributeError(f"module 'fastseg' has no attribute {name!r}")


__all__ = ["BACKENDS", "available_backends", "use_backend", "ops", "layers", "__version__"]
