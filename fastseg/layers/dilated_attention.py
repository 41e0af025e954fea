"""Attention layers on :func:`fastseg.ops.dilated_attention2d`.

* :class:`SparseTransformer2d`: LGMSNet's pre-norm transformer layer on a feature map, with
  attention inside the parity groups of the pixel grid.
* :class:`GlobalSelfAttention2d`: LightAWNet's SAGAN-style global self-attention.

Both work on the feature map's channels-last view: a ``Linear`` on ``[N, H, W, C]`` produces the
token-major ``[N, H, W, heads, d]`` layout the op reads, so no rearrange copies are made (a
channels-last input is not copied at all; an NCHW one is read through its strides by the first
``LayerNorm``/``Linear``). Outputs are ``[N, C, H, W]`` in channels-last memory format.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._layout import output_memory_format
from .._validation import check_positive_int
from ..backend import _check_name
from ..ops.dilated_attention import dilated_attention2d


def _check_input(x: torch.Tensor, channels: int, multiple: int = 1) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must have shape [N, {channels}, H, W], got {shape}")
    if x.shape[2] % multiple or x.shape[3] % multiple:
        raise ValueError(f"x's H={x.shape[2]} and W={x.shape[3]} must be divisible by the "
                         f"dilation {multiple}")


class SparseTransformer2d(nn.Module):
    """LGMSNet's sparse transformer layer (depth 1, pre-norm, no positional encoding).

    On x ``[N, dim, H, W]`` (H, W divisible by ``dilation``), per pixel token of width ``dim``::

        t = t + to_out(attention(to_qkv(norm1(t))))       # heads × head_dim inner width
        t = t + ffn_out(SiLU(ffn_in(norm2(t))))            # dim → mlp_dim → dim

    where the attention of pixel ``(r, c)`` covers the pixels ``(r', c')`` with ``r' ≡ r`` and
    ``c' ≡ c`` mod ``dilation`` (LGMSNet: 2, a quarter of full attention's cost), scaled by
    ``head_dim ** -0.5``. Returns ``[N, dim, H, W]`` (channels-last memory format).

    Parameters: ``norm1``, ``norm2`` (``LayerNorm(dim)``), ``to_qkv`` (``Linear(dim, 3·heads·
    head_dim, bias=False)``, output ``[q | k | v]``, each ``(heads, head_dim)``), ``to_out``
    (``Linear(heads·head_dim, dim)``), ``ffn_in`` (``Linear(dim, mlp_dim)``), ``ffn_out``
    (``Linear(mlp_dim, dim)``): the original's ``layers.0.0.{norm, to_qkv, to_out.0}`` and
    ``layers.0.1.net.{0, 1, 4}``, one to one.
    """

    def __init__(self, dim: int, mlp_dim: int, heads: int = 4, head_dim: int = 8,
                 dilation: int = 2, backend: str = "auto"):
        super().__init__()
        for name, value in (("dim", dim), ("mlp_dim", mlp_dim), ("heads", heads),
                            ("head_dim", head_dim), ("dilation", dilation)):
            check_positive_int(name, value)
        self.dim, self.mlp_dim, self.heads, self.head_dim = dim, mlp_dim, heads, head_dim
        self.dilation = dilation
        self.backend = _check_name(backend)
        inner = heads * head_dim
        self.norm1 = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn_in = nn.Linear(dim, mlp_dim)
        self.ffn_out = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[N, dim, H, W]`` → ``[N, dim, H, W]``."""
        _check_input(x, self.dim, self.dilation)
        t = x.permute(0, 2, 3, 1)  # [N, H, W, dim]: a view
        N, H, W, _ = t.shape
        qkv = self.to_qkv(self.norm1(t)).view(N, H, W, 3, self.heads, self.head_dim)
        attended = dilated_attention2d(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :],
                                       self.dilation, backend=self.backend)
        t = t + self.to_out(attended.reshape(N, H, W, -1))
        t = t + self.ffn_out(F.silu(self.ffn_in(self.norm2(t))))
        # Back in x's memory format: a channels-last view would make every NCHW kernel
        # downstream copy its input (and its gradient) again.
        return t.permute(0, 3, 1, 2).contiguous(memory_format=output_memory_format(x))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, mlp_dim={self.mlp_dim}, heads={self.heads}, "
                f"head_dim={self.head_dim}, dilation={self.dilation}, backend={self.backend!r}")


class GlobalSelfAttention2d(nn.Module):
    """LightAWNet's SAGAN-style self-attention over all ``H·W`` positions of a feature map.

    ``q = PW_{C→C/r}(x)``, ``k = PW_{C→C/r}(x)``, ``v = PW_{C→C}(x)`` (1×1 convs with bias,
    ``r = qk_reduction``); ``out_i = Σ_j softmax_j(q_i·k_j) v_j`` with **no** ``1/√d`` scaling;
    returns ``γ·out + x`` with the learnable scalar ``γ`` initialised to 0 (the layer starts as
    the identity). x ``[N, channels, H, W]`` → ``[N, channels, H, W]`` (channels-last memory
    format).

    Parameters: ``query``, ``key``, ``value`` (``nn.Conv2d(…, 1)``) and ``gamma`` ``[1]``: the
    original's ``attention.{query, key, value, gamma}``, one to one.
    """

    def __init__(self, channels: int, qk_reduction: int = 8, backend: str = "auto"):
        super().__init__()
        check_positive_int("channels", channels)
        check_positive_int("qk_reduction", qk_reduction)
        if channels % qk_reduction:
            raise ValueError(f"channels ({channels}) must be divisible by qk_reduction "
                             f"({qk_reduction})")
        self.channels, self.qk_reduction = channels, qk_reduction
        self.backend = _check_name(backend)
        self.query = nn.Conv2d(channels, channels // qk_reduction, 1)
        self.key = nn.Conv2d(channels, channels // qk_reduction, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[N, channels, H, W]`` → ``[N, channels, H, W]``."""
        _check_input(x, self.channels)
        t = x.permute(0, 2, 3, 1)  # [N, H, W, C]: a view
        N, H, W, C = t.shape
        d_qk = C // self.qk_reduction
        # One projection for q, k and v: the input is read once.
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight]).flatten(1)
        bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
        qkv = F.linear(t, weight, bias).unsqueeze(3)  # [N, H, W, 1, 2·d_qk + C]
        out = dilated_attention2d(qkv[..., :d_qk], qkv[..., d_qk:2 * d_qk], qkv[..., 2 * d_qk:],
                                  1, 1.0, backend=self.backend)
        y = (self.gamma * out.view(N, H, W, C) + t).permute(0, 3, 1, 2)
        return y.contiguous(memory_format=output_memory_format(x))  # x's format, as above

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, qk_reduction={self.qk_reduction}, "
                f"backend={self.backend!r}")
