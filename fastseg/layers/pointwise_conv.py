"""``PointwiseConv2d``: a 1×1 convolution that runs as plain GEMMs on the CPU's fused backend."""
from __future__ import annotations

import torch
from torch import nn

from ..backend import _check_name, requested_backend


class PointwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1, bias=bias)``: the same parameters (``weight``
    ``[out, in, 1, 1]``, ``bias`` ``[out]``), initialisation and state_dict keys, so weights move
    between the two unchanged. Input ``[N, in_channels, H, W]``, output ``[N, out_channels, H, W]``.

    On a CPU tensor in NCHW layout (float32 or float64, outside autocast) and any backend but
    ``"reference"``, it runs as one matrix product per sample, ``W [out, in] · x_n [in, H·W]``
    (ATen's ``thnn_conv2d``, whose backward is the matching products), instead of ATen's default
    oneDNN convolution, which reorders NCHW tensors into its blocked layout and back around every
    1×1 convolution. Forward + backward at LGMSNet's full-resolution 1×1 convs (batch 8, 128², one
    process, min of 8; bench/RESULTS.md, "Models"): 32 → 64 channels 74–88 → 22–24 ms, 64 → 16
    channels 59–71 → 24–30 ms; the same at 64² and below. Channels-last inputs, GPUs, other
    dtypes and the ``reference`` backend take ``nn.Conv2d``'s path (oneDNN's channels-last 1×1
    convolution is as fast as the GEMMs). Under ``torch.compile`` it is ``nn.Conv2d`` too
    (inductor's own convolution lowering beat the GEMMs in LGMSNet's compiled models: its fused
    128² training step took 933 ms with the GEMMs), unless ``compiled_matmul`` is set: then it is
    one matrix product, ``weight [out, in] · x [N, in, H·W]`` (+ bias), which inductor runs as a
    BLAS call with the bias fused into what follows. LightAWNet sets it on its 1×1 convs: in its
    compiled graphs inductor's NCHW 1×1 convolutions are slow at few channels (1 → 4 at 1×256²:
    3.8 ms against 0.1 ms as a product; 16 → 64 at 1×128²: 1.9 against 0.6 ms).
    """

    #: Under ``torch.compile`` (CPU, NCHW, not the ``reference`` backend), compute as a matrix
    #: product instead of ``nn.Conv2d`` (see the class docstring).
    compiled_matmul = False

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True,
                 backend: str = "auto"):
        super().__init__(in_channels, out_channels, 1, bias=bias)
        self.backend = _check_name(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[N, in_channels, H, W]`` → ``[N, out_channels, H, W]``."""
        if (x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.float64)
                and x.dtype == self.weight.dtype and x.is_contiguous()
                and not torch.is_autocast_enabled("cpu")
                and requested_backend(self.backend) != "reference"):
            if torch.compiler.is_compiling():
                if not self.compiled_matmul:
                    return super().forward(x)
                n, _, h, w = x.shape
                y = torch.matmul(self.weight.flatten(1), x.flatten(2))
                if self.bias is not None:
                    y = y + self.bias[:, None]
                return y.view(n, self.out_channels, h, w)
            return torch._C._nn.thnn_conv2d(x, self.weight, (1, 1), self.bias, (1, 1), (0, 0))
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"
