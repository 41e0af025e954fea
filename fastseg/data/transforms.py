"""Per-sample transforms on torch tensors: conversion, intensity presets, resizing that can be
undone for predictions, and random augmentation drawn from a ``torch.Generator``.

Images are float32 ``[C, H, W]``; masks are integer class maps ``[H, W]``.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Hounsfield windows (low, high) mapped to [0, 1].
CT_WINDOWS = {"liver": (-200.0, 250.0), "abdomen": (-160.0, 240.0), "lung": (-1350.0, 150.0)}
# ITU-R 601 luma, the weights Pillow uses for RGB -> L.
_LUMA = (0.299, 0.587, 0.114)


def image_to_tensor(array: np.ndarray, scale: bool, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``(H, W)`` or ``(H, W, C)`` array -> float32 ``[C, H, W]``, resized to ``size`` if given.

    With ``scale``, integer arrays are divided by their dtype's maximum (a ``uint8`` or ``uint16``
    pixel image -> [0, 1]); NIfTI volumes are passed with ``scale=False`` to keep physical units.
    A ``uint8`` image is resized before the float conversion: torch's uint8 path is several times
    faster, at the cost of rounding to whole gray levels.
    """
    tensor = torch.from_numpy(array)
    # The channels-last view is left as it is: interpolation reads it directly.
    tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    if tensor.dtype != torch.uint8:
        tensor = tensor.to(torch.float32)
    if size is not None:
        tensor = resize_image(tensor, size)
    tensor = tensor.to(torch.float32)
    if scale and array.dtype.kind in "iu":
        tensor /= float(np.iinfo(array.dtype).max)
    return tensor


def match_channels(image: torch.Tensor, channels: int | None) -> torch.Tensor:
    """``[C, H, W]`` -> ``[channels, H, W]``: RGB to gray by luma, gray to RGB by repetition."""
    if channels is None or image.shape[0] == channels:
        return image
    if image.shape[0] == 3 and channels == 1:
        return torch.einsum("chw,c->hw", image, image.new_tensor(_LUMA))[None]
    if image.shape[0] == 1:
        return image.expand(channels, -1, -1).contiguous()
    raise ValueError(f"cannot turn a {image.shape[0]}-channel image into {channels} channels")


class CTWindow:
    """Clip Hounsfield units to ``[low, high]`` and map them linearly to [0, 1]."""

    def __init__(self, low: float, high: float):
        self.low, self.high = float(low), float(high)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return ((image - self.low) / (self.high - self.low)).clamp_(0.0, 1.0)


class PercentileZScore:
    """Clip to the image's ``lower``..``upper`` percentiles, then zero mean and unit variance
    (MR and other modalities without absolute units)."""

    def __init__(self, lower: float = 0.5, upper: float = 99.5):
        self.lower, self.upper = lower, upper

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        bounds = torch.quantile(image.flatten(), image.new_tensor([self.lower / 100, self.upper / 100]))
        image = image.clamp(bounds[0], bounds[1])
        return (image - image.mean()) / image.std().clamp_min(1e-6)


class MinMax:
    """Per-image min-max to [0, 1] (LightAWNet's normalisation); a constant image gives zeros."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        low, high = image.min(), image.max()
        return (image - low) / (high - low).clamp_min(1e-12)


class ImageNetNormalize:
    """ImageNet mean/std per channel (LGMSNet's normalisation) on a [0, 1] RGB ``[3, H, W]``."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[0] != 3:
            raise ValueError(f"ImageNet normalisation needs 3 channels, got {image.shape[0]} (set channels=3)")
        return (image - image.new_tensor(IMAGENET_MEAN)[:, None, None]) / image.new_tensor(IMAGENET_STD)[:, None, None]


INTENSITY_PRESETS: dict[str, Callable[[], Callable[[torch.Tensor], torch.Tensor]]] = {
    "minmax": MinMax,
    "zscore": PercentileZScore,
    "imagenet": ImageNetNormalize,
    **{f"ct-{name}": functools.partial(CTWindow, *window) for name, window in CT_WINDOWS.items()},
}


def intensity_preset(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The intensity transform called ``name``: one of :data:`INTENSITY_PRESETS`
    (``minmax``, ``zscore``, ``imagenet``, ``ct-liver``, ``ct-abdomen``, ``ct-lung``)."""
    if name not in INTENSITY_PRESETS:
        raise ValueError(f"unknown intensity preset {name!r}; known: {', '.join(INTENSITY_PRESETS)}")
    return INTENSITY_PRESETS[name]()


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[C, H, W]`` (float or uint8) to ``[C, *size]``, same dtype
    (antialiased, so shrinking a 600-pixel image to 256 does not alias)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[0]


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of an integer class map ``[H, W]`` to ``size`` (same dtype)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    work = mask if mask.dtype == torch.uint8 else mask.float()
    return F.interpolate(work[None, None], size=tuple(size), mode="nearest-exact")[0, 0].to(mask.dtype)


def restore_size(prediction: torch.Tensor, original_size) -> torch.Tensor:
    """Resize a model output (logits or probabilities, ``[C, h, w]`` or ``[N, C, h, w]``) back to
    the image's ``original_size`` ``(H, W)`` (the ``original_size`` a dataset sample carries).
    Threshold or argmax after restoring, not before, to keep boundaries smooth."""
    size = tuple(int(s) for s in original_size)
    batched = prediction if prediction.ndim == 4 else prediction[None]
    if tuple(batched.shape[-2:]) != size:
        batched = F.interpolate(batched.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return batched if prediction.ndim == 4 else batched[0]


class RandomAugment:
    """Random augmentation of an image ``[C, H, W]`` and its class map ``[H, W]``, in torch.

    Always available: 90-degree rotations (only 180 on non-square images) and horizontal /
    vertical flips, together the 8 symmetries of the square (LGMSNet's recipe). Optional:
    ``affine`` (rotation up to ``degrees``, isotropic ``scale`` range, shift up to ``translate``
    of the size; bilinear image, nearest mask, zero padding) and ``intensity`` (contrast and
    brightness jitter relative to the image's spread, Gaussian noise).

    Randomness comes from ``generator`` when given, else from torch's global generator, which
    ``DataLoader`` seeds differently in each worker (so workers do not repeat each other).
    """

    def __init__(self, rot90: bool = True, flip: bool = True, affine: bool = False, intensity: bool = False,
                 degrees: float = 15.0, scale: tuple[float, float] = (0.9, 1.1), translate: float = 0.05,
                 contrast: float = 0.1, brightness: float = 0.1, noise: float = 0.02):
        self.rot90, self.flip, self.affine, self.intensity = rot90, flip, affine, intensity
        self.degrees, self.scale, self.translate = degrees, scale, translate
        self.contrast, self.brightness, self.noise = contrast, brightness, noise

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None):
        """Returns the augmented ``(image, mask)``, same shapes and dtypes (a 90-degree rotation of
        a square keeps the shape); they may be strided views."""
        # A fixed number of draws keeps the random stream the same whatever is enabled.
        u = torch.rand(9, generator=generator, dtype=torch.float64).tolist()
        dims = (-2, -1)
        if self.rot90:
            k = int(u[0] * 4) if image.shape[-1] == image.shape[-2] else 2 * int(u[0] * 2)
            image, mask = torch.rot90(image, k, dims), torch.rot90(mask, k, dims)
        if self.flip:
            flipped = [d for d, draw in zip(dims, u[1:3]) if draw < 0.5]
            if flipped:
                image, mask = image.flip(flipped), mask.flip(flipped)
        if self.affine:
            image, mask = self._affine(image, mask, u[3:7])
        if self.intensity:
            image = self._intensity(image, u[7:9], generator)
        return image, mask

    def _affine(self, image, mask, u):
        angle = math.radians((2 * u[0] - 1) * self.degrees)
        zoom = self.scale[0] + u[1] * (self.scale[1] - self.scale[0])
        # affine_grid coordinates span [-1, 1]: a shift of `translate` of the size is 2 * translate.
        shift_x, shift_y = ((2 * v - 1) * 2 * self.translate for v in u[2:4])
        cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
        theta = image.new_tensor([[cos, -sin, shift_x], [sin, cos, shift_y]])
        grid = F.affine_grid(theta[None], [1, *image.shape], align_corners=False)
        image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
        mask = F.grid_sample(mask[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                             align_corners=False)[0, 0].to(mask.dtype)
        return image, mask

    def _intensity(self, image, u, generator):
        spread = image.std().clamp_min(1e-6)
        mean = image.mean()
        contrast = 1 + (2 * u[0] - 1) * self.contrast
        image = (image - mean) * contrast + mean + (2 * u[1] - 1) * self.brightness * spread
        if self.noise:
            image = image + torch.randn(image.shape, generator=generator) * (self.noise * spread)
        return image
