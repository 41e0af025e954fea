"""``DynamicConv2d``: the drop-in layer for :func:`fastseg.ops.dynamic_conv2d`."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_positive_int
from ..backend import _check_name
from ..ops.dynamic_conv import _conv_params, _pair, dynamic_conv2d

IntPair = Union[int, tuple[int, int]]

ROUTINGS = ("sigmoid", "softmax")
INITS = ("kaiming", "normal")


class DynamicConv2d(nn.Module):
    """Dynamic convolution (CondConv): each sample gets its own mixture of ``num_experts`` kernels.

    ``routing = act(PW_{in→K}(GAP(x)) / temperature)`` with ``act`` a sigmoid (LightAWNet: the
    weights do not sum to 1) or a softmax over the experts; then
    ``y_n = conv2d(x_n, Σ_k routing[n, k] · weight[k]) (+ Σ_k routing[n, k] · bias[k])``.
    Input ``[N, in_channels, H, W]``, output ``[N, out_channels, H_out, W_out]`` (``conv2d``'s
    sizes; ``padding=None`` is 'same' padding for odd kernels at stride 1).

    Parameters: ``weight`` ``[K, out_channels, in_channels/groups, kh, kw]`` (the experts),
    ``routing`` an ``nn.Conv2d(in_channels, K, 1)`` (``routing.weight`` ``[K, in_channels, 1, 1]``,
    ``routing.bias`` ``[K]``) and, with ``bias=True``, ``bias`` ``[K, out_channels]``. The original
    LightAWNet's ``weight.weight`` and ``weight.attention.net.{weight,bias}`` map onto ``weight`` and
    ``routing.{weight,bias}`` one to one. Buffer ``output_shift`` ``[out_channels]``, None unless
    set (then added to the output in place): where ``fuse_for_inference`` of
    :mod:`fastseg.models` puts the shift of a BatchNorm it folds into the layer.

    ``init="normal"`` draws the experts from a standard normal, unscaled (LightAWNet's init);
    ``"kaiming"`` initialises each expert like ``nn.Conv2d`` (kaiming-uniform, a=√5, and
    fan-in-bounded biases).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair,
                 num_experts: int = 4, routing: str = "sigmoid", temperature: float = 1.0,
                 stride: IntPair = 1, padding: Optional[IntPair] = None, dilation: IntPair = 1,
                 groups: int = 1, bias: bool = False, init: str = "kaiming", backend: str = "auto"):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("num_experts", num_experts), ("groups", groups)):
            check_positive_int(name, value)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must "
                             f"be divisible by groups ({groups})")
        kernel = _pair(kernel_size, "kernel_size")
        if min(kernel) < 1:
            raise ValueError(f"kernel_size must be positive, got {kernel_size!r}")
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
                or temperature <= 0:
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel
        self.num_experts, self.groups = num_experts, groups
        self.routing_activation, self.temperature, self.init = routing, float(temperature), init
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels // groups,
                                               *kernel))
        # Checks stride/dilation/padding now rather than at the first forward.
        self.stride, self.padding, self.dilation = _conv_params(self.weight, stride, padding,
                                                                dilation)
        self.routing = nn.Conv2d(in_channels, num_experts, 1)
        self.register_parameter(
            "bias", nn.Parameter(torch.empty(num_experts, out_channels)) if bias else None)
        self.backend = _check_name(backend)
        # [out_channels] added to the output, in place: a BatchNorm's shift folded in for
        # inference (fastseg.models's fuse_for_inference); None otherwise (not in the state_dict).
        self.register_buffer("output_shift", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Experts per ``init`` (see the class docstring); the routing conv as ``nn.Conv2d``."""
        with torch.no_grad():
            if self.init == "normal":
                nn.init.normal_(self.weight)
            else:
                for expert in self.weight:
                    nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.weight[0, 0].numel())
                nn.init.uniform_(self.bias, -bound, bound)
        self.routing.reset_parameters()

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, num_experts]``: act(PW(GAP(x)) / temperature) for x ``[N, in_channels, H, W]``.

        The reference backend computes as the original does (a mean, the 1×1 convolution); the
        others take the sum over the pixels times 1/(H·W) and a matrix product: the same logits,
        and the pooling's gradient an expanded view of a ``[N, in_channels]`` tensor instead of a
        full-size tensor written by the mean's backward (at 8 × 16 × 256², 10 ms a layer)."""
        if self.backend == "reference":
            logits = self.routing(x.mean((2, 3), keepdim=True)).flatten(1)
        else:
            pooled = x.sum((2, 3)) * (1.0 / (x.shape[2] * x.shape[3]))
            logits = F.linear(pooled, self.routing.weight.flatten(1), self.routing.bias)
        logits = logits / self.temperature
        return torch.sigmoid(logits) if self.routing_activation == "sigmoid" else F.softmax(logits, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[N, in_channels, H, W]`` → ``[N, out_channels, H_out, W_out]``."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape [N, {self.in_channels}, H, W], got {tuple(x.shape)}")
        y = dynamic_conv2d(x, self.weight, self.routing_weights(x), self.bias, self.stride,
                           self.padding, self.dilation, self.groups, backend=self.backend)
        if self.output_shift is not None:
            y = y.add_(self.output_shift.view(1, -1, 1, 1))
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"num_experts={self.num_experts}, routing={self.routing_activation!r}, "
                f"temperature={self.temperature}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}, "
                f"init={self.init!r}, backend={self.backend!r}")
