"""Segmentation losses on logits (``fastseg.losses``); defined in :mod:`fastseg.engine.losses`."""
from .engine.losses import *  # noqa: F401,F403
from .engine.losses import __all__  # noqa: F401
