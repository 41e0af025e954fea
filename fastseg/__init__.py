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
    "models": "fastseg.models",
}


def create_model(name: str, **kwargs):
    """The model ``name`` (see :func:`list_models`) built with ``kwargs``; see
    :func:`fastseg.models.create_model`."""
    from .models import create_model as create
    return create(name, **kwargs)


def list_models() -> list[str]:
    """Names of the models :func:`create_model` builds."""
    from .models import list_models as names
    return names()


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        globals()[name] = module
        return module
    raise AttributeError(f"module 'fastseg' has no attribute {name!r}")


__all__ = ["BACKENDS", "available_backends", "create_model", "list_models", "use_backend", "ops",
           "layers", "__version__"]
