"""LGMSNet (Dong et al., ECAI 2025, arXiv 2508.15476): local and global multiscale blocks.

Built from :mod:`fastseg.layers` only: the local multiscale (LMS) block on
:class:`~fastseg.layers.MixedDepthwiseConv2d` (3/5/7/9 depthwise kernels on four channel groups,
with the block's residual fused in), the global multiscale (GMS) block on
:class:`~fastseg.layers.SparseTransformer2d` (attention inside the 2 × 2 parity groups of the
pixel grid). With the defaults (3 input channels, 1 class) it has 2,321,393 parameters, as the
authors' model. Returns logits ``[N, num_classes, H, W]``.
"""
from __future__ import annotations

from torch import nn
import torch
import torch.nn.functional as F

from .._layout import output_memory_format
from ..backend import resolve_backend
from ..layers import MaxPool2x2, MixedDepthwiseConv2d, PointwiseConv2d, SparseTransformer2d
from ._common import bn_act, check_input, conv_bn_act, fuse_for_inference, gelu_bn, store_arguments

__all__ = ["LGMSNet"]


class LocalMultiscaleBlock(nn.Module):
    """LMS block, ``[N, C, H, W]`` → ``[N, C, H, W]`` (``C`` divisible by 4)::

        y = GELU(GN(4, C)(mixed_dw_{3,5,7,9}(x) + x))
        y = SiLU(BN(Conv3×3_{C/4→C}(SiLU(BN(PW_{C→C/4}(y))))))
        out = y + x
    """

    def __init__(self, channels: int, backend: str = "auto"):
        super().__init__()
        self.mixed = MixedDepthwiseConv2d(channels, (3, 5, 7, 9), residual=True, backend=backend)
        self.norm = nn.GroupNorm(4, channels)
        self.reduce = conv_bn_act(channels, channels // 4, 1, nn.SiLU(), backend=backend)
        self.expand = conv_bn_act(channels // 4, channels, 3, nn.SiLU(), backend=backend)

    def forward(self, x):
        y = F.gelu(self.norm(self.mixed(x)))
        return self.expand(self.reduce(y)) + x


class GlobalMultiscaleBlock(nn.Module):
    """GMS block, ``[N, in_channels, H, W]`` → ``[N, channels, H, W]`` (H, W even)::

        h = SiLU(BN(PW(SiLU(BN(Conv3×3_{in→C}(x))))))
        t, c = h[:, :Ct], h[:, Ct:]
        c = c + BN(PW_grouped(ReLU(BN(DW3×3(c)))))         # local branch
        t = SparseTransformer2d(Ct, mlp_dim)(t)            # 4 heads × 8, parity groups
        h = SiLU(BN(PW(concat[t, c])))
        out = SiLU(BN(Conv3×3_{in + C → C}(concat[h, x])))
    """

    def __init__(self, in_channels: int, channels: int, transformer_channels: int, mlp_dim: int,
                 backend: str = "auto"):
        super().__init__()
        local = channels - transformer_channels
        self.transformer_channels = transformer_channels
        self.conv1 = conv_bn_act(in_channels, channels, 3, nn.SiLU(), backend=backend)
        self.conv2 = conv_bn_act(channels, channels, 1, nn.SiLU(), backend=backend)
        self.local = nn.Sequential(
            nn.Conv2d(local, local, 3, padding=1, groups=local, bias=False),
            *bn_act(local, nn.ReLU(), backend=backend),
            nn.Conv2d(local, local, 1, groups=local, bias=False), nn.BatchNorm2d(local))
        self.transformer = SparseTransformer2d(transformer_channels, mlp_dim, heads=4, head_dim=8,
                                               dilation=2, backend=backend)
        self.conv3 = conv_bn_act(channels, channels, 1, nn.SiLU(), backend=backend)
        self.conv4 = conv_bn_act(in_channels + channels, channels, 3, nn.SiLU(), backend=backend)

    def forward(self, x):
        h = self.conv2(self.conv1(x))
        t, c = h[:, :self.transformer_channels], h[:, self.transformer_channels:]
        if not h.is_contiguous() and h.is_contiguous(memory_format=torch.channels_last):
            # a channel slice of a channels-last tensor is contiguous in neither format; the
            # transformer keeps a channels-last-contiguous input's layout (it computes in NHWC)
            t = t.contiguous(memory_format=torch.channels_last)
        h = self.conv3(torch.cat([self.transformer(t), c + self.local(c)], 1))
        return self.conv4(torch.cat([h, x], 1))


class Up(nn.Sequential):
    """Bilinear ×2 (align_corners=False) → Conv3×3 (bias) → BN → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, backend: str = "auto"):
        super().__init__(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                         nn.Conv2d(in_channels, out_channels, 3, padding=1),
                         *bn_act(out_channels, nn.ReLU(), backend=backend))


class Fusion(nn.Sequential):
    """Conv3×3 (groups 2) → GELU → BN → PW_{a→4b} → GELU → BN → PW_{4b→b} → GELU → BN
    (activations before the norms, as the original; each GELU → BN pair is one
    :class:`~fastseg.layers.BatchNormAct2d` with ``pre_activation="gelu"``, after an
    ``nn.Identity`` that keeps the original's indices)."""

    def __init__(self, in_channels: int, out_channels: int, backend: str = "auto"):
        hidden = 4 * out_channels
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=2),
            *gelu_bn(in_channels, backend), PointwiseConv2d(in_channels, hidden, backend=backend),
            *gelu_bn(hidden, backend), PointwiseConv2d(hidden, out_channels, backend=backend),
            *gelu_bn(out_channels, backend))


class LGMSNet(nn.Module):
    """LGMSNet with widths 16-32-64-128-128 (models.md §2.3).

    Args:
        in_channels: image channels (3: the original's RGB input).
        num_classes: output channels (logits; apply a sigmoid or softmax outside).
        backend: op backend of the fused layers (:mod:`fastseg.backend`).

    Input ``[N, in_channels, H, W]`` with H and W divisible by 32; output ``[N, num_classes, H,
    W]`` logits.
    """

    input_multiple = 32  #: H and W must be multiples of this (the encoder's total downsampling)
    #: On the ``cpu`` backend (eager), compute in channels-last: oneDNN's convolutions, BatchNorm +
    #: activation (:class:`~fastseg.layers.BatchNormAct2d`), the transformer, upsampling and
    #: pooling all run natively in it and skip oneDNN's reorders of NCHW tensors; the output comes
    #: back in the input's memory format. False: compute in the input's layout.
    cpu_channels_last = True

    def __init__(self, in_channels: int = 3, num_classes: int = 1, backend: str = "auto"):
        super().__init__()
        b = store_arguments(self, in_channels, num_classes, backend)
        self.stem = conv_bn_act(in_channels, 16, 3, nn.ReLU(), bias=True, **b)
        self.encoder1 = nn.Sequential(LocalMultiscaleBlock(16, **b), conv_bn_act(16, 16, 1, nn.SiLU(), **b))
        self.encoder2 = nn.Sequential(LocalMultiscaleBlock(16, **b), conv_bn_act(16, 32, 1, nn.SiLU(), **b))
        self.encoder3 = nn.Sequential(LocalMultiscaleBlock(32, **b), conv_bn_act(32, 64, 1, nn.SiLU(), **b))
        self.encoder4 = GlobalMultiscaleBlock(64, 128, 96, 256, **b)
        self.encoder5 = GlobalMultiscaleBlock(128, 128, 96, 256, **b)
        self.up5 = Up(128, 128, **b)
        self.decoder5 = GlobalMultiscaleBlock(256, 128, 96, 256, **b)
        self.up4 = Up(128, 64, **b)
        self.decoder4 = nn.Sequential(Fusion(128, 64, **b), GlobalMultiscaleBlock(64, 64, 48, 128, **b))
        self.up3 = Up(64, 32, **b)
        self.decoder3 = Fusion(64, 32, **b)
        self.up2 = Up(32, 16, **b)
        self.decoder2 = Fusion(32, 16, **b)
        self.head = PointwiseConv2d(16, num_classes, **b)
        self.pool = MaxPool2x2(**b)  # 2×2 max pooling (no parameters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[N, in_channels, H, W]`` (H, W divisible by 32) → logits ``[N, num_classes, H, W]``."""
        check_input(x, self.in_channels, self.input_multiple, "LGMSNet")
        layout = output_memory_format(x)
        if (self.cpu_channels_last and x.device.type == "cpu" and not torch.compiler.is_compiling()
                and resolve_backend(self.backend, x.device, x.dtype) == "cpu"):
            x = x.contiguous(memory_format=torch.channels_last)
        x1 = self.encoder1(self.stem(x))
        x2 = self.encoder2(self.pool(x1))
        x3 = self.encoder3(self.pool(x2))
        x4 = self.encoder4(self.pool(x3))
        x5 = self.encoder5(self.pool(x4))
        d5 = self.decoder5(torch.cat([x4, self.up5(x5)], 1))
        d4 = self.decoder4(torch.cat([x3, self.up4(d5)], 1))
        d3 = self.decoder3(torch.cat([x2, self.up3(d4)], 1))
        d2 = self.decoder2(torch.cat([x1, self.up2(d3)], 1))
        return self.head(d2).contiguous(memory_format=layout)

    def fuse_for_inference(self) -> "LGMSNet":
        """Fold the BatchNorms the preceding (or a following 1×1) conv can absorb exactly into it,
        in place; eval mode only (``RuntimeError`` otherwise). Outputs are unchanged up to
        float rounding; returns the model. See :func:`fastseg.models._common.fuse_for_inference`
        for which norms fold."""
        return fuse_for_inference(self)
