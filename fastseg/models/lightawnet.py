"""LightAWNet (Wang et al., J. Appl. Clin. Med. Phys. 2024, DOI 10.1002/acm2.14584): a lightweight
adaptive weighting network on dynamic convolutions.

Built from :mod:`fastseg.layers` only: :class:`~fastseg.layers.DynamicConv2d` (4 experts, sigmoid
routing, the original's unscaled normal init), :class:`~fastseg.layers.GatedPointwise` (the
blocks' spatial attention → concat → 1×1 without the concat), :class:`~fastseg.layers.CrossGate`
(the two branches gating each other), :class:`~fastseg.layers.GlobalSelfAttention2d` (the
bottleneck) and :class:`~fastseg.layers.SqueezeExcite` with the decoder's ×2 upsample and skip
fused in. With the defaults (1 input channel, 1 class) it has 2,838,179 parameters, as the
authors' model. The original applies a sigmoid to its output; this model returns the logits
(apply the sigmoid, or a softmax for ``num_classes > 1``, in the loss or at prediction).
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers import (BatchNormAct2d, CrossGate, DepthwiseConv2d, DynamicConv2d, GatedPointwise,
                      GlobalSelfAttention2d, MaxPool2x2, PointwiseConv2d, SqueezeExcite)
from ._common import bn_act, check_input, fuse_for_inference, store_arguments

__all__ = ["LightAWNet"]


class DynamicConvBN(nn.Sequential):
    """LightAWNet's adaptive weighting: DynamicConv2d (3×3, 4 experts, sigmoid routing, no bias,
    normal init) → BatchNorm (eps 1e-6), no activation (a BatchNormAct2d with the identity: the
    fused norm on the cpu backend, nn.BatchNorm2d's parameters and state_dict keys)."""

    def __init__(self, in_channels: int, out_channels: int, backend: str = "auto"):
        super().__init__(DynamicConv2d(in_channels, out_channels, 3, num_experts=4,
                                       routing="sigmoid", init="normal", backend=backend),
                         BatchNormAct2d(out_channels, "identity", eps=1e-6, backend=backend))


class Block(nn.Module):
    """Encoder block ``[N, C_in, H, W]`` → ``[N, C_out, H, W]``::

        a = LeakyReLU(BN(PW_{C_in→4C_in}(DW7×7(x))))
        h = PW_{8C_in→C_in}(concat[a, a·σ(PW_{4C_in→1}(a))]) + x      # GatedPointwise
        y = BN(DynamicConv(C_in→C_out)(h))
    """

    def __init__(self, in_channels: int, out_channels: int, backend: str = "auto"):
        super().__init__()
        self.depthwise = DepthwiseConv2d(in_channels, 7, backend=backend)
        self.expand = nn.Sequential(PointwiseConv2d(in_channels, 4 * in_channels, backend=backend),
                                    *bn_act(4 * in_channels, nn.LeakyReLU(), backend=backend))
        self.gate = GatedPointwise(4 * in_channels, in_channels, backend=backend)
        self.dynamic = DynamicConvBN(in_channels, out_channels, backend)

    def forward(self, x):
        return self.dynamic(self.gate(self.expand(self.depthwise(x))) + x)


class Decoder(nn.Module):
    """Decoder stage: ``z = LeakyReLU(BN(PW_{C_in→C_out}(x)))``, bilinear ×2, squeeze-excitation
    (C_out/8 hidden), ``+ skip`` (the last three fused), then ``BN(DynamicConv(C_out→C_out))``.
    x ``[N, C_in, h, w]``, skip ``[N, C_out, 2h, 2w]`` → ``[N, C_out, 2h, 2w]``."""

    def __init__(self, in_channels: int, out_channels: int, backend: str = "auto"):
        super().__init__()
        self.reduce = nn.Sequential(PointwiseConv2d(in_channels, out_channels, backend=backend),
                                    *bn_act(out_channels, nn.LeakyReLU(), backend=backend))
        self.excite = SqueezeExcite(out_channels, reduction=8, upsample=True, backend=backend)
        self.dynamic = DynamicConvBN(out_channels, out_channels, backend)

    def forward(self, x, skip):
        return self.dynamic(self.excite(self.reduce(x), skip))


class LightAWNet(nn.Module):
    """LightAWNet with widths 16-32-64-128-256 (models.md §1.3).

    Args:
        in_channels: image channels (1: the original's grayscale input).
        num_classes: output channels (logits).
        backend: op backend of the fused layers (:mod:`fastseg.backend`).

    Input ``[N, in_channels, H, W]`` with H and W divisible by 16; output ``[N, num_classes, H,
    W]`` logits.
    """

    input_multiple = 16  #: H and W must be multiples of this (the encoder's total downsampling)

    def __init__(self, in_channels: int = 1, num_classes: int = 1, backend: str = "auto"):
        super().__init__()
        b = store_arguments(self, in_channels, num_classes, backend)
        self.encoder1 = Block(in_channels, 16, **b)
        self.encoder2 = Block(16, 32, **b)
        self.encoder3 = Block(32, 64, **b)
        self.encoder4 = Block(64, 128, **b)          # branch a at 1/8
        self.side4 = PointwiseConv2d(64, 128, **b)   # branch b at 1/8
        self.side5 = PointwiseConv2d(128, 256, **b)
        self.encoder5 = Block(128, 256, **b)         # branch a at 1/16
        self.attention = GlobalSelfAttention2d(256, **b)
        self.skip4 = PointwiseConv2d(256, 128, **b)
        self.gate = CrossGate(align_corners=True, **b)
        self.decoder4 = Decoder(256, 128, **b)
        self.decoder3 = Decoder(128, 64, **b)
        self.decoder2 = Decoder(64, 32, **b)
        self.decoder1 = Decoder(32, 16, **b)
        self.head = DynamicConvBN(16, num_classes, backend)
        self.pool = MaxPool2x2(backend)  # 2×2 max pooling (no parameters)
        for module in self.modules():
            if isinstance(module, PointwiseConv2d):
                # compiled: its 1×1 convs through the CPU kernel (PointwiseConv2d.compiled_kernel;
                # bench/RESULTS.md, "Models", runs 6 and 8)
                module.compiled_kernel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[N, in_channels, H, W]`` (H, W divisible by 16) → logits ``[N, num_classes, H, W]``."""
        check_input(x, self.in_channels, self.input_multiple, "LightAWNet")
        x1 = self.encoder1(x)
        x2 = self.encoder2(self.pool(x1))
        x3 = self.encoder3(self.pool(x2))
        x3d = self.pool(x3)
        a4 = self.encoder4(x3d)
        b4 = self.side4(x3d)
        a4g = self.gate(self.pool(a4), b4)             # pool(a4) · σ(resize(b4 → 1/16))
        b5 = self.side5(self.gate(b4, a4))             # PW(σ(a4) · b4)
        a5 = self.encoder5(a4g)
        c = self.attention(self.gate(a5, b5))          # a5 · σ(resize(b5 → 1/16))
        s4 = self.skip4(self.gate(b5, a5))             # PW(b5 · σ(resize(a5 → 1/8)))
        d = self.decoder4(c, s4)
        d = self.decoder3(d, x3)
        d = self.decoder2(d, x2)
        d = self.decoder1(d, x1)
        return self.head(d)

    def fuse_for_inference(self) -> "LightAWNet":
        """Fold the BatchNorms the preceding (or a following 1×1) conv can absorb exactly into it,
        in place; eval mode only (``RuntimeError`` otherwise). Outputs are unchanged up to
        float rounding; returns the model. See :func:`fastseg.models._common.fuse_for_inference`
        for how the norms fold (those after the dynamic convs into their experts and an
        in-place output shift)."""
        return fuse_for_inference(self)
