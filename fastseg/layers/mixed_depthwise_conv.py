"""``MixedDepthwiseConv2d`` and ``DepthwiseConv2d``: the drop-in layers for
:func:`fastseg.ops.mixed_depthwise_conv2d`."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from ..backend import _check_name, requested_backend, resolve_backend
from ..ops.mixed_depthwise_conv import equal_splits, mixed_depthwise_conv2d


class MixedDepthwiseConv2d(nn.Module):
    """Depthwise convs with a different odd kernel size per channel group (LGMSNet's LMS block).

    Input and output ``[N, channels, H, W]``. Group ``g`` covers ``splits[g]`` consecutive channels
    (default: equal, remainder to the first group) with kernel ``kernel_sizes[g]``, stride 1 and
    'same' padding. Parameters ``weights.{g}`` ``[C_g, 1, k_g, k_g]`` and ``biases.{g}`` ``[C_g]``
    have the shapes and the default initialisation of per-group ``nn.Conv2d(C_g, C_g, k_g,
    groups=C_g)``, so weights move between this layer and such convs unchanged.
    """

    def __init__(self, channels: int, kernel_sizes: Sequence[int] = (3, 5, 7, 9),
                 splits: Optional[Sequence[int]] = None, bias: bool = True, residual: bool = False,
                 backend: str = "auto"):
        super().__init__()
        kernel_sizes = [int(k) for k in kernel_sizes]
        if not kernel_sizes or any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel_sizes must be positive odd integers, got {kernel_sizes}")
        if splits is None:
            splits = equal_splits(channels, len(kernel_sizes))
        splits = [int(s) for s in splits]
        if len(splits) != len(kernel_sizes) or any(s <= 0 for s in splits) or sum(splits) != channels:
            raise ValueError(f"splits must be {len(kernel_sizes)} positive counts summing to "
                             f"channels={channels}, got {splits}")
        self.channels, self.kernel_sizes, self.splits = channels, kernel_sizes, splits
        self.residual = residual
        self.backend = _check_name(backend)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(c, 1, k, k)) for c, k in zip(splits, kernel_sizes))
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(c)) for c in splits) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s default init per group (kaiming-uniform weights, fan-in bound biases)."""
        for g, w in enumerate(self.weights):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            if self.biases is not None:
                bound = 1.0 / math.sqrt(w[0].numel())
                nn.init.uniform_(self.biases[g], -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[N, channels, H, W]`` → ``[N, channels, H, W]``."""
        return mixed_depthwise_conv2d(x, list(self.weights),
                                      list(self.biases) if self.biases is not None else None,
                                      self.residual, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_sizes={tuple(self.kernel_sizes)}, splits={tuple(self.splits)}, "
                f"bias={self.biases is not None}, residual={self.residual}, backend={self.backend!r}")


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels,
    bias=bias)``: the same parameters (``weight`` ``[channels, 1, k, k]``, ``bias``
    ``[channels]``), initialisation and state_dict keys, computed by the fused
    :func:`~fastseg.ops.mixed_depthwise_conv2d` with a single group on every backend but
    ``"reference"`` (which runs ``nn.Conv2d``). Input and output ``[N, channels, H, W]``; odd
    ``kernel_size``, stride 1, 'same' padding.

    Forward + backward of LightAWNet's 7×7 depthwise convs (batch 8, cpu, one process, min of 10;
    bench/RESULTS.md, "Models"): 1 channel at 128² 34.8 → 2.1 ms, 16 at 64² 25.0 → 5.7 ms, 32 at
    32² 16.2 → 5.4 ms. On planes of at most :attr:`small_plane` pixels oneDNN's depthwise conv is
    faster (min of 15: 32 at 16² 2.9 against 3.3 ms, 128 at 16² 10.5 against 12.1 ms, 256 at 8²
    7.1 against 10.0 ms; at 32² the fused op is 2.2–2.4× faster), so there the ``cpu`` backend
    runs ``nn.Conv2d``'s path.
    """

    #: on the cpu backend, planes of at most this many pixels (H·W) take nn.Conv2d's path
    small_plane = 16 * 16

    def __init__(self, channels: int, kernel_size: int, bias: bool = True, backend: str = "auto"):
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2,
                         groups=channels, bias=bias)
        self.backend = _check_name(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[N, channels, H, W]`` → ``[N, channels, H, W]``."""
        small = x.device.type == "cpu" and x.dim() == 4 and x.shape[-2] * x.shape[-1] <= self.small_plane
        if requested_backend(self.backend) == "reference" or (
                small and resolve_backend(self.backend, x.device, x.dtype) == "cpu"):
            return super().forward(x)
        return mixed_depthwise_conv2d(x, [self.weight], None if self.bias is None else [self.bias],
                                      backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"
