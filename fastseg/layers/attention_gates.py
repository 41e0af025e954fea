"""Drop-in layers for the attention gates (:mod:`fastseg.ops.attention_gates`).

Each layer keeps its parameters in the plain PyTorch modules the unfused network would use
(``nn.Conv2d`` 1×1, ``nn.Linear``, ``nn.BatchNorm2d``), under the same names, so state_dicts move
between a plain implementation and these layers unchanged; ``forward`` passes the weights to the
fused op as ``[out, in]`` matrices.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..backend import _check_name
from ..ops.attention_gates import (attention_gate, channel_gate, cross_gate, gated_pointwise,
                                   spatial_gate)

__all__ = ["SpatialGate", "GatedPointwise", "SqueezeExcite", "CrossGate", "AttentionGate"]


def _matrix(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.view(conv.out_channels, conv.in_channels)


class SpatialGate(nn.Module):
    """``x ⊙ σ(conv(x))`` with ``conv = nn.Conv2d(channels, 1, 1)``: one gate value per pixel.

    Input and output ``[N, channels, H, W]``. Parameters: ``conv.weight`` ``[1, channels, 1, 1]``,
    ``conv.bias`` ``[1]``.
    """

    def __init__(self, channels: int, backend: str = "auto"):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)
        self.backend = _check_name(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[N, channels, H, W]`` → ``[N, channels, H, W]``."""
        return spatial_gate(x, _matrix(self.conv), self.conv.bias, backend=self.backend)


class GatedPointwise(nn.Module):
    """LightAWNet's "spatial attention → concat → 1×1": ``s = σ(attention(a))``,
    ``proj(concat[a, a·s])``, fused without the concat or ``a·s``.

    Input ``[N, in_channels, H, W]``, output ``[N, out_channels, H, W]``. Parameters:
    ``attention`` an ``nn.Conv2d(in_channels, 1, 1)``, ``proj`` an
    ``nn.Conv2d(2·in_channels, out_channels, 1)`` whose weight's first ``in_channels`` input
    channels act on ``a`` and the rest on ``a·s`` (the original's concat order).
    """

    def __init__(self, in_channels: int, out_channels: int, backend: str = "auto"):
        super().__init__()
        self.attention = nn.Conv2d(in_channels, 1, 1)
        self.proj = nn.Conv2d(2 * in_channels, out_channels, 1)
        self.backend = _check_name(backend)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """a ``[N, in_channels, H, W]`` → ``[N, out_channels, H, W]``."""
        w_a, w_b = _matrix(self.proj).chunk(2, dim=1)
        return gated_pointwise(a, _matrix(self.attention), self.attention.bias, w_a, w_b,
                               self.proj.bias, backend=self.backend)


class SqueezeExcite(nn.Module):
    """Squeeze-excitation ``z ⊙ σ(fc2(ReLU(fc1(GAP(z))))) (+ skip)``, ``z = x`` or, with
    ``upsample=True``, x's bilinear ×2 upsample (align_corners=False) fused in: LightAWNet's
    decoder stage "upsample → SE → + skip".

    Input ``[N, channels, h, w]``; output and ``skip`` ``[N, channels, H, W]`` (``2h × 2w`` with
    ``upsample``). Parameters: ``fc1`` ``nn.Linear(channels, channels // reduction, bias=False)``,
    ``fc2`` ``nn.Linear(channels // reduction, channels, bias=False)``.
    """

    def __init__(self, channels: int, reduction: int = 8, upsample: bool = False,
                 backend: str = "auto"):
        super().__init__()
        if reduction <= 0 or channels // reduction == 0:
            raise ValueError(f"reduction must be in 1..{channels} for {channels} channels, got {reduction}")
        self.upsample = upsample
        self.fc1 = nn.Linear(channels, channels // reduction, bias=False)
        self.fc2 = nn.Linear(channels // reduction, channels, bias=False)
        self.backend = _check_name(backend)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x ``[N, channels, h, w]`` (+ skip) → ``[N, channels, H, W]``."""
        return channel_gate(x, self.fc1.weight, self.fc2.weight, skip, self.upsample,
                            backend=self.backend)

    def extra_repr(self) -> str:
        return f"upsample={self.upsample}, backend={self.backend!r}"


class CrossGate(nn.Module):
    """``a ⊙ σ(resize_bilinear(b → a's H, W))``: LightAWNet's two branches gating each other.

    Inputs a ``[N, C, H, W]``, b ``[N, C, h, w]``; output ``[N, C, H, W]``. No parameters.
    """

    def __init__(self, align_corners: bool = True, backend: str = "auto"):
        super().__init__()
        self.align_corners = align_corners
        self.backend = _check_name(backend)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a ``[N, C, H, W]``, b ``[N, C, h, w]`` → ``[N, C, H, W]``."""
        return cross_gate(a, b, self.align_corners, backend=self.backend)

    def extra_repr(self) -> str:
        return f"align_corners={self.align_corners}, backend={self.backend!r}"


def _projection(c_in: int, c_out: int, batch_norm: bool) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 1)]
    return nn.Sequential(*layers, nn.BatchNorm2d(c_out)) if batch_norm else nn.Sequential(*layers)


def _folded(proj: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight [out, in], bias [out])`` of a 1×1 conv followed (or not) by an eval-mode BatchNorm."""
    conv = proj[0]
    weight, bias = _matrix(conv), conv.bias
    if len(proj) == 1:
        return weight, bias
    bn = proj[1]
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return weight * scale[:, None], (bias - bn.running_mean) * scale + bn.bias


class AttentionGate(nn.Module):
    """The Attention U-Net additive gate (MONAI's ``AttentionBlock``):
    ``x ⊙ σ(psi(ReLU(W_x(x) + W_g(g))))``.

    Inputs x ``[N, x_channels, H, W]`` (the skip features) and g ``[N, g_channels, h, w]`` (the
    gating signal; resampled bilinearly to ``H × W`` when coarser); output like x. Parameters:
    ``W_x`` / ``W_g`` / ``psi``, each an ``nn.Sequential`` of a 1×1 ``nn.Conv2d`` (to
    ``inter_channels``, resp. 1) and, with ``batch_norm=True``, an ``nn.BatchNorm2d``.

    With batch norm, eval mode folds the statistics into the weights and runs the fused op;
    training mode needs the batch statistics of the projections, so it runs the plain modules
    (the unfused composition), as the fused op cannot hold a training-mode BatchNorm.
    """

    def __init__(self, x_channels: int, g_channels: int, inter_channels: Optional[int] = None,
                 batch_norm: bool = False, backend: str = "auto"):
        super().__init__()
        inter_channels = inter_channels or max(1, x_channels // 2)
        self.batch_norm = batch_norm
        self.W_x = _projection(x_channels, inter_channels, batch_norm)
        self.W_g = _projection(g_channels, inter_channels, batch_norm)
        self.psi = _projection(inter_channels, 1, batch_norm)
        self.backend = _check_name(backend)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """x ``[N, x_channels, H, W]``, g ``[N, g_channels, h, w]`` → ``[N, x_channels, H, W]``."""
        if g.dim() == 4 and x.dim() == 4 and g.shape[-2:] != x.shape[-2:]:
            g = F.interpolate(g, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.batch_norm and self.training:
            return x * torch.sigmoid(self.psi(F.relu(self.W_x(x) + self.W_g(g))))
        (w_x, b_x), (w_g, b_g), (psi_w, psi_b) = _folded(self.W_x), _folded(self.W_g), _folded(self.psi)
        return attention_gate(x, g, w_x, w_g, b_x + b_g, psi_w, psi_b, backend=self.backend)
