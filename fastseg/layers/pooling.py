"""``MaxPool2x2``: ``nn.MaxPool2d(2)`` on :func:`fastseg.ops.max_pool2x2`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backend import _check_name
from ..ops.pool import max_pool2x2


class MaxPool2x2(nn.Module):
    """2×2 max pooling with stride 2, as ``nn.MaxPool2d(2)`` (no parameters). Input
    ``[N, C, H, W]``, output ``[N, C, H // 2, W // 2]`` in the input's memory format.

    On the ``cpu`` backend NCHW inputs run :func:`fastseg.ops.max_pool2x2`'s kernel; everything
    else, and under ``torch.compile`` (inductor lowers the pooling itself), ``F.max_pool2d``.
    """

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = _check_name(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[N, C, H, W]`` → ``[N, C, H // 2, W // 2]``."""
        if torch.compiler.is_compiling():
            return F.max_pool2d(x, 2)
        return max_pool2x2(x, backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
