"""The published models, rebuilt on :mod:`fastseg.layers`, and their registry.

``fastseg.create_model(name, **kwargs)`` builds one by name; ``fastseg.list_models()`` lists the
names; :func:`from_original` loads a checkpoint of the authors' code (:func:`to_original` writes
one).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .lgmsnet import LGMSNet
from .lightawnet import LightAWNet
from .convert import from_original, to_original

__all__ = ["LGMSNet", "LightAWNet", "create_model", "from_original", "list_models", "to_original"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {"lgmsnet": LGMSNet, "lightawnet": LightAWNet}


def list_models() -> list[str]:
    """Names :func:`create_model` accepts, e.g. ``["lgmsnet", "lightawnet"]``."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """The model ``name`` (case-insensitive) built with ``kwargs`` (``in_channels``,
    ``num_classes``, ``backend``, ...)."""
    key = name.lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {list_models()}")
    return _REGISTRY[key](**kwargs)
