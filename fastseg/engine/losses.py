"""Segmentation losses on logits, with MONAI's argument names and semantics.

Shapes: ``input`` ``[N, C, *spatial]`` (logits, or probabilities when no activation is asked for;
2-D or 3-D). ``target`` either has ``input``'s shape (binary masks, one-hot or soft labels, used as
given) or holds integer class indices, ``[N, *spatial]`` or ``[N, 1, *spatial]``, one-hot encoded to
``C`` classes; with ``C = 1`` a mask ``[N, *spatial]`` (any dtype) is taken as channel 0.

Soft Dice, per ``(sample, class)`` (``batch=False``) or per class over the whole batch
(``batch=True``), with ``p`` the probabilities and ``g`` the target:
``1 - (2·Σ p·g + smooth_nr) / (Σ p + Σ g + smooth_dr)``, then averaged (MONAI's ``DiceLoss``).
``include_background=False`` drops channel 0 from the Dice (ignored with a warning when C = 1).

Precision: under autocast, or with float16/bfloat16 logits, every loss is computed in float32 (the
sums of a Dice over a volume lose too much in half precision); float64 stays float64.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["dice_loss", "dice_bce_loss", "dice_ce_loss", "DiceLoss", "DiceBCELoss", "DiceCELoss",
           "LOSSES", "create_loss"]

_REDUCTIONS = ("mean", "sum", "none")


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _dense_target(target: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """``target`` with ``input``'s shape and dtype: as given, or one-hot from class indices."""
    if target.shape == input.shape:
        return target.to(input.dtype)
    labels = target[:, 0] if target.dim() == input.dim() and target.shape[1] == 1 else target
    single_channel = input.shape[1] == 1
    if labels.shape != input.shape[:1] + input.shape[2:] or (
            labels.is_floating_point() and not single_channel):
        raise ValueError(f"target must have input's shape {tuple(input.shape)} or hold integer "
                         f"class indices [N, (1,) *spatial], got {tuple(target.shape)} "
                         f"{target.dtype}")
    if single_channel:  # a sigmoid output: the target is its mask
        return labels.unsqueeze(1).to(input.dtype)
    return F.one_hot(labels.long(), input.shape[1]).movedim(-1, 1).to(input.dtype)


def _soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, include_background: bool,
                    smooth_nr: float, smooth_dr: float, batch: bool) -> torch.Tensor:
    """Unreduced soft Dice loss, ``[N, C']`` (``[C']`` with ``batch``), of dense float tensors."""
    if not include_background:
        if probs.shape[1] == 1:
            warnings.warn("single channel prediction, include_background=False ignored",
                          stacklevel=3)
        else:
            probs, target = probs[:, 1:], target[:, 1:]
    dims = ([0] if batch else []) + list(range(2, probs.dim()))
    intersection = (probs * target).sum(dims)
    denominator = probs.sum(dims) + target.sum(dims)
    return 1.0 - (2.0 * intersection + smooth_nr) / (denominator + smooth_dr)


def dice_loss(input: torch.Tensor, target: torch.Tensor, *, sigmoid: bool = False,
              softmax: bool = False, include_background: bool = True, smooth_nr: float = 1e-5,
              smooth_dr: float = 1e-5, batch: bool = False,
              reduction: str = "mean") -> torch.Tensor:
    """Soft Dice loss (MONAI's ``DiceLoss``): see the module docstring for shapes and formula.

    ``sigmoid``/``softmax``: the activation applied to ``input`` first (at most one; neither
    means ``input`` already holds probabilities). ``reduction``: ``"mean"``/``"sum"`` over the
    ``[N, C]`` (``[C]`` with ``batch``) losses, or ``"none"`` to return them.
    """
    if sigmoid and softmax:
        raise ValueError("sigmoid and softmax are mutually exclusive")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    with torch.autocast(input.device.type, enabled=False):
        input = _at_least_float32(input)
        probs = input.sigmoid() if sigmoid else input.softmax(1) if softmax else input
        loss = _soft_dice_loss(probs, _dense_target(target, input), include_background,
                               smooth_nr, smooth_dr, batch)
    return loss if reduction == "none" else getattr(loss, reduction)()


def dice_bce_loss(input: torch.Tensor, target: torch.Tensor, *, lambda_bce: float = 0.5,
                  lambda_dice: float = 1.0, include_background: bool = True,
                  smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                  batch: bool = False) -> torch.Tensor:
    """``lambda_bce · BCEWithLogits + lambda_dice · (sigmoid soft Dice loss)``, a scalar.

    The defaults are LGMSNet's recipe: ``0.5·BCE + (1 − Dice)`` with a per-sample soft Dice,
    smooth 1e-5. ``target`` has ``input``'s shape (binary or soft masks); BCE is the mean over all
    elements.
    """
    with torch.autocast(input.device.type, enabled=False):
        input = _at_least_float32(input)
        target = _dense_target(target, input)
        bce = F.binary_cross_entropy_with_logits(input, target)
        dice = _soft_dice_loss(input.sigmoid(), target, include_background, smooth_nr, smooth_dr,
                               batch).mean()
    return lambda_bce * bce + lambda_dice * dice


def dice_ce_loss(input: torch.Tensor, target: torch.Tensor, *, lambda_ce: float = 1.0,
                 lambda_dice: float = 1.0, include_background: bool = True,
                 smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                 batch: bool = False) -> torch.Tensor:
    """``lambda_ce · CrossEntropy + lambda_dice · (softmax soft Dice loss)``, a scalar (MONAI's
    ``DiceCELoss(softmax=True)``).

    ``target``: class indices ``[N, *spatial]`` / ``[N, 1, *spatial]``, or one-hot / soft labels of
    ``input``'s shape (cross-entropy against probabilities then). The cross-entropy is the mean over
    voxels and always covers every class; ``include_background`` applies to the Dice only.
    """
    with torch.autocast(input.device.type, enabled=False):
        input = _at_least_float32(input)
        dense = _dense_target(target, input)
        if target.shape == input.shape:
            ce = F.cross_entropy(input, dense)
        else:
            ce = F.cross_entropy(input, target.reshape(dense.shape[:1] + dense.shape[2:]).long())
        dice = _soft_dice_loss(input.softmax(1), dense, include_background, smooth_nr, smooth_dr,
                               batch).mean()
    return lambda_ce * ce + lambda_dice * dice


class _FunctionalLoss(nn.Module):
    """A module calling its class's ``function(input, target, **options)``."""

    function = None

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return type(self).function(input, target, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.items())


class DiceLoss(_FunctionalLoss):
    """Module form of :func:`dice_loss` (MONAI's ``DiceLoss`` arguments and defaults)."""

    function = staticmethod(dice_loss)

    def __init__(self, *, sigmoid: bool = False, softmax: bool = False,
                 include_background: bool = True, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                 batch: bool = False, reduction: str = "mean"):
        super().__init__(sigmoid=sigmoid, softmax=softmax, include_background=include_background,
                         smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch, reduction=reduction)


class DiceBCELoss(_FunctionalLoss):
    """Module form of :func:`dice_bce_loss`; the defaults are LGMSNet's ``0.5·BCE + Dice``."""

    function = staticmethod(dice_bce_loss)

    def __init__(self, *, lambda_bce: float = 0.5, lambda_dice: float = 1.0,
                 include_background: bool = True, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                 batch: bool = False):
        super().__init__(lambda_bce=lambda_bce, lambda_dice=lambda_dice,
                         include_background=include_background, smooth_nr=smooth_nr,
                         smooth_dr=smooth_dr, batch=batch)


class DiceCELoss(_FunctionalLoss):
    """Module form of :func:`dice_ce_loss` (softmax Dice + cross-entropy, multi-class)."""

    function = staticmethod(dice_ce_loss)

    def __init__(self, *, lambda_ce: float = 1.0, lambda_dice: float = 1.0,
                 include_background: bool = True, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                 batch: bool = False):
        super().__init__(lambda_ce=lambda_ce, lambda_dice=lambda_dice,
                         include_background=include_background, smooth_nr=smooth_nr,
                         smooth_dr=smooth_dr, batch=batch)


LOSSES = {"dice": DiceLoss, "bce": nn.BCEWithLogitsLoss, "dice_bce": DiceBCELoss,
          "ce": nn.CrossEntropyLoss, "dice_ce": DiceCELoss}


def create_loss(name: str, **kwargs) -> nn.Module:
    """The loss registered as ``name`` in :data:`LOSSES`, built with ``kwargs``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSSES)}")
    return LOSSES[name](**kwargs)
