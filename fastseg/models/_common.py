"""Pieces the models share: a conv-norm-activation unit and the input check."""
from __future__ import annotations

import torch
from torch import nn


def conv_bn_act(in_channels: int, out_channels: int, kernel_size: int, act: nn.Module,
                bias: bool = False) -> nn.Sequential:
    """Conv (``kernel_size``, 'same' padding) → BatchNorm → ``act``."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size,
                                   padding=kernel_size // 2, bias=bias),
                         nn.BatchNorm2d(out_channels), act)


def check_input(x: torch.Tensor, channels: int, multiple: int, model: str) -> None:
    """A clear error for inputs a model cannot take: rank, channels, H and W not divisible by
    ``multiple`` (naming the nearest valid sizes)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{model}: x must have shape [N, {channels}, H, W], got {shape}")
    if x.shape[1] != channels:
        raise ValueError(f"{model}: x has {x.shape[1]} channels but the model was built with "
                         f"in_channels={channels}")
    for name, size in (("H", x.shape[2]), ("W", x.shape[3])):
        if size % multiple or size == 0:
            lower = size // multiple * multiple
            nearest = [s for s in (lower, lower + multiple) if s > 0]
            raise ValueError(f"{model} needs H and W divisible by {multiple}; got {name}={size} "
                             f"(nearest valid: {' or '.join(map(str, nearest))}; pad or resize "
                             f"the input)")
