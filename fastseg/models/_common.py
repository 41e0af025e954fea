"""Pieces the models share: the constructor's argument checks, a conv-norm-activation unit, the
input check and the BatchNorm folding of `fuse_for_inference`."""
from __future__ import annotations

import torch
from torch import nn

from .._validation import check_positive_int
from ..backend import _check_name
from ..layers import BatchNormAct2d, DynamicConv2d, PointwiseConv2d


def store_arguments(model: nn.Module, in_channels: int, num_classes: int, backend: str) -> dict:
    """Check the seed models' constructor arguments, store them on ``model`` (``in_channels``,
    ``num_classes``, ``backend``) and return the keyword arguments for its fused layers."""
    for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        check_positive_int(name, value)
    model.in_channels, model.num_classes = in_channels, num_classes
    model.backend = _check_name(backend)
    return dict(backend=backend)


def bn_act(channels: int, act: nn.Module, eps: float = 1e-5,
           backend: str = "auto") -> tuple[BatchNormAct2d, nn.Identity]:
    """BatchNorm2d → ``act`` (``nn.ReLU``, ``nn.LeakyReLU`` or ``nn.SiLU``) as the pair
    ``(BatchNormAct2d, nn.Identity())``: two entries, so that a ``Sequential`` keeps the indices
    (and state_dict keys) it has with ``nn.BatchNorm2d, act``."""
    if isinstance(act, nn.LeakyReLU):
        norm = BatchNormAct2d(channels, "leaky_relu", act.negative_slope, eps=eps, backend=backend)
    else:
        name = {nn.ReLU: "relu", nn.SiLU: "silu"}[type(act)]
        norm = BatchNormAct2d(channels, name, eps=eps, backend=backend)
    return norm, nn.Identity()


def gelu_bn(channels: int, backend: str = "auto") -> tuple[nn.Identity, BatchNormAct2d]:
    """GELU → BatchNorm2d as the pair ``(nn.Identity(), BatchNormAct2d(pre_activation="gelu"))``:
    the indices and state_dict keys of ``nn.GELU(), nn.BatchNorm2d`` in a ``Sequential``."""
    return nn.Identity(), BatchNormAct2d(channels, "identity", pre_activation="gelu", backend=backend)


def conv_bn_act(in_channels: int, out_channels: int, kernel_size: int, act: nn.Module,
                bias: bool = False, backend: str = "auto") -> nn.Sequential:
    """Conv (``kernel_size``, 'same' padding; a :class:`~fastseg.layers.PointwiseConv2d` for 1×1)
    → BatchNorm → ``act`` (the last two as :func:`bn_act`)."""
    if kernel_size == 1:
        conv = PointwiseConv2d(in_channels, out_channels, bias=bias, backend=backend)
    else:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
    return nn.Sequential(conv, *bn_act(out_channels, act, backend=backend))


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


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) ``[C]`` of an eval-mode BatchNorm: ``bn(x) = x · scale + shift``."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _set_bias(conv: nn.Conv2d, bias: torch.Tensor) -> None:
    if conv.bias is None:
        conv.bias = nn.Parameter(bias)
    else:
        conv.bias.copy_(bias)


def _is_pointwise(conv: nn.Module) -> bool:
    """A 1×1 conv without groups, stride or padding: an affine map of its input can move through
    it exactly (no zero padding sees the shift)."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.groups == 1
            and conv.stride == (1, 1) and conv.padding in ((0, 0), "valid"))


@torch.no_grad()
def fuse_for_inference(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d of ``model`` that an ``nn.Conv2d`` can absorb exactly into it, in
    place, and return ``model`` (which must be in eval mode: the folds use the running
    statistics).

    Within each ``nn.Sequential``, a BatchNorm right after an ``nn.Conv2d`` (nothing in between)
    is folded into that conv (``W·s``, ``(b − μ)·s + β``, per output channel, any kernel or
    groups); one after something else (an activation: LGMSNet's Fusion blocks) but right before
    a plain 1×1 conv is folded into that conv's input side (``W·diag(s)``, ``b + W·t``), which is
    exact because a 1×1 conv without padding sees no border. The folded BatchNorm becomes
    ``nn.Identity`` (indices and names of the other modules stay), convs without a bias gain one;
    a folded :class:`~fastseg.layers.BatchNormAct2d` becomes its activations (in place where it
    folded into the conv before it, whose output nothing else reads); one with an
    activation after it folds only into the conv before it, one with a pre-activation only into
    the 1×1 conv after it.

    A BatchNorm right after a :class:`~fastseg.layers.DynamicConv2d` (LightAWNet) folds its scale
    into the experts (and expert biases), exact because the scale is per output channel; its
    shift cannot become the per-expert bias (the mixed bias ``Σ_k α_k b_k`` is a constant shift
    for every input only if the routing weights sum to 1, and LightAWNet's sigmoid routing does
    not), so it becomes the layer's ``output_shift``, added to the output in place: no norm pass
    and no second output tensor.

    Raises ``RuntimeError`` in training mode. The result is for inference: the removed norms do
    not come back with ``.train()``.
    """
    if model.training:
        raise RuntimeError("fuse_for_inference needs eval mode (it folds the running "
                           "statistics): call model.eval() first")
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i, bn in enumerate(seq):
            if not isinstance(bn, nn.BatchNorm2d) or not bn.track_running_stats:
                continue
            scale, shift = _bn_affine(bn)
            before = seq[i - 1] if i > 0 else None
            after = seq[i + 1] if i + 1 < len(seq) else None
            if isinstance(bn, BatchNormAct2d) and bn.activation != "identity":
                after = None  # its activation stands between it and the next module
            if isinstance(bn, BatchNormAct2d) and bn.pre_activation != "identity":
                before = None  # its pre-activation stands between the module before and it
            if isinstance(before, DynamicConv2d):
                before.weight.mul_(scale.view(1, -1, 1, 1, 1))
                if before.bias is not None:
                    before.bias.mul_(scale)
                previous = before.output_shift
                before.output_shift = shift if previous is None else previous * scale + shift
            elif isinstance(before, nn.Conv2d):
                bias = before.bias if before.bias is not None else torch.zeros_like(scale)
                before.weight.mul_(scale.view(-1, 1, 1, 1))
                _set_bias(before, bias * scale + shift)
            elif _is_pointwise(after):
                matrix = after.weight.view(after.out_channels, after.in_channels)
                bias = after.bias if after.bias is not None else torch.zeros_like(matrix[:, 0])
                _set_bias(after, bias + matrix @ shift)
                after.weight.mul_(scale.view(1, -1, 1, 1))
            else:
                continue
            # Folded into the conv before it, the norm's activation reads that conv's fresh output,
            # which nothing else reads: it may overwrite it (no second tensor of that size).
            inplace = isinstance(before, (nn.Conv2d, DynamicConv2d))
            seq[i] = bn.activation_module(inplace) if isinstance(bn, BatchNormAct2d) else nn.Identity()
    return model
