"""Segmentation metrics (``fastseg.metrics``); defined in :mod:`fastseg.engine.metrics`."""
from .engine.metrics import *  # noqa: F401,F403
from .engine.metrics import __all__  # noqa: F401
