"""``PointwiseConv2d``: a 1×1 convolution that runs the CPU kernel of
:func:`fastseg.ops.pointwise_conv2d` (or plain GEMMs) on the CPU's fused backend."""
from __future__ import annotations

import torch
from torch import nn

from ..backend import _check_name, requested_backend
from ..ops import pointwise

#: Input channels from which :class:`PointwiseConv2d` runs the CPU kernel; below, BLAS products
#: are as fast (1 → 4 channels at 1×256², forward: 0.10 ms the kernel, 0.08 ms ``thnn_conv2d``;
#: forward + backward at 8×256²: 4.8 against 2.7 ms).
MIN_KERNEL_CHANNELS = 8


class PointwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1, bias=bias)``: the same parameters (``weight``
    ``[out, in, 1, 1]``, ``bias`` ``[out]``), initialisation and state_dict keys, so weights move
    between the two unchanged. Input ``[N, in_channels, H, W]``, output ``[N, out_channels, H, W]``.

    On a CPU tensor in NCHW layout (float32 or float64, outside autocast) and any backend but
    ``"reference"``, it runs :func:`fastseg.ops.pointwise_conv2d`'s CPU kernel (register-blocked
    products on blocks of pixels), from :data:`MIN_KERNEL_CHANNELS` input channels on; with fewer,
    one matrix product per sample, ``W [out, in] · x_n [in, H·W]`` (ATen's ``thnn_conv2d``). Both
    replace ATen's default oneDNN convolution, which reorders NCHW tensors into its blocked layout
    and back around every 1×1 convolution (forward + backward at LGMSNet's full-resolution 1×1
    convs, batch 8, 128²: 32 → 64 channels 74–88 → 22–24 ms as products). Channels-last inputs,
    GPUs, other dtypes and the ``reference`` backend take ``nn.Conv2d``'s path (oneDNN's
    channels-last 1×1 convolution is fast). Under ``torch.compile`` it is ``nn.Conv2d`` too
    (inductor's own convolution lowering beat the products in LGMSNet's compiled models), unless
    ``compiled_kernel`` is set: then it is the kernel, an opaque op in the graph (below
    :data:`MIN_KERNEL_CHANNELS` input channels one matrix product, ``weight [out, in] · x [N, in,
    H·W]`` + bias, which inductor runs as a BLAS call). LightAWNet sets it on its 1×1 convs: in
    its compiled graphs inductor's NCHW 1×1 convolutions are slow at few channels (1 → 4 at
    1×256²: 3.8 ms against 0.1 ms as a product), and in its compiled batch-1 inference the kernel
    did better than inductor's BLAS products (bench/RESULTS.md, "Models", run 8; per shape the
    kernel is 0.70–1.27× ATen's GEMMs, "Ops: `pointwise_conv2d`").
    """

    #: Under ``torch.compile`` (CPU, NCHW, not the ``reference`` backend), compute with the CPU
    #: kernel instead of ``nn.Conv2d`` (see the class docstring).
    compiled_kernel = False

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
            compiling = torch.compiler.is_compiling()
            if compiling and not self.compiled_kernel:
                return super().forward(x)
            if self.in_channels >= MIN_KERNEL_CHANNELS and pointwise.fused(x, self.weight,
                                                                           self.backend):
                return pointwise.pointwise_conv2d(x, self.weight, self.bias, backend=self.backend)
            if compiling:
                n, _, h, w = x.shape
                y = torch.matmul(self.weight.flatten(1), x.flatten(2))
                if self.bias is not None:
                    y = y + self.bias[:, None]
                return y.view(n, self.out_channels, h, w)
            return torch._C._nn.thnn_conv2d(x, self.weight, (1, 1), self.bias, (1, 1), (0, 0))
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"
