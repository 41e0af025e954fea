"""fastseg: fused kernels, drop-in layers and lightweight medical image segmentation models.

``import fastseg`` imports nothing heavy: torch, the op registry, the layers, data, metrics and
losses load on first use of the name that needs them (``fastseg.ops``, ``fastseg.use_backend``,
``fastseg.data`` ...), so the command line starts without paying for what it does not run.
Custom ops register when their module loads, i.e. before any op can be called.
"""
import importlib

__version__ = "0.1.0"

# name -> (module, attribute of it or None for the module itself)
_LAZY = {
    "backend": ("fastseg.backend", None),
    "ops": ("fastseg.ops", None),
    "layers": ("fastseg.layers", None),
    "models": ("fastseg.models", None),
    "data": ("fastseg.data", None),
    "engine": ("fastseg.engine", None),
    "metrics": ("fastseg.metrics", None),
    "losses": ("fastseg.losses", None),
    "BACKENDS": ("fastseg.backend", "BACKENDS"),
    "available_backends": ("fastseg.backend", "available_backends"),
    "use_backend": ("fastseg.backend", "use_backend"),
    "memory": ("fastseg.memory", None),
    "retain_freed_memory": ("fastseg.memory", "retain_freed_memory"),
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
    if name not in _LAZY:
        raise AttributeError(f"module 'fastseg' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["BACKENDS", "available_backends", "create_model", "list_models", "retain_freed_memory",
           "use_backend", "ops", "layers", "__version__"]
