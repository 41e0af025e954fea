"""Built-in synthetic data, generated deterministically on demand and written as real files in
real layouts, so that the readers and layout detection are exercised exactly as on public data.

* :func:`make_synthetic_2d`: polyp/lesion-like RGB images in the Kvasir-SEG layout.
* :func:`make_synthetic_ct`: CT-like phantoms in HU (body, spine, an organ with lesions) in the
  LiTS layout, as ``.nii.gz`` with an anisotropic affine.

Case ``i`` depends only on ``(seed, i)``: asking for more cases keeps the first ones.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .io import write_image, write_nifti


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Zero-mean, unit-scale noise varying over about ``cells`` periods per axis (value noise:
    a coarse random grid, interpolated)."""
    grid = torch.from_numpy(rng.standard_normal((1, 1, *[cells + 1] * len(shape))).astype(np.float32))
    mode = "bicubic" if len(shape) == 2 else "trilinear"
    return F.interpolate(grid, size=shape, mode=mode, align_corners=True)[0, 0].numpy()


def _lesion_image(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One RGB ``uint8 (H, W, 3)`` image with 1-3 lesions and their ``bool (H, W)`` mask."""
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # Mucosa-like background: multi-scale texture under an endoscope's fall-off of light.
    texture = 0.6 * _smooth_noise(rng, size, 4) + 0.3 * _smooth_noise(rng, size, 12) + 0.1 * _smooth_noise(rng, size, 40)
    radius2 = ((yy / height - 0.5) ** 2 + (xx / width - 0.5) ** 2) / 0.5
    luminance = (1.0 - 0.5 * radius2) * (0.8 + 0.12 * texture)
    base = rng.uniform([150, 60, 50], [230, 130, 110]).astype(np.float32)
    image = luminance[..., None] * base
    mask = np.zeros(size, dtype=bool)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        radius = rng.uniform(0.06, 0.2) * min(size)
        angle = np.arctan2(yy - cy, xx - cx)
        distance = np.hypot(yy - cy, xx - cx)
        # Irregular outline: a circle perturbed by low angular harmonics.
        boundary = radius * (1 + sum(rng.uniform(0, 0.15) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
                                     for k in (2, 3, 4)))
        mask |= distance < boundary
        edge = rng.uniform(1.0, 4.0)
        alpha = np.clip((boundary - distance) / edge + 0.5, 0.0, 1.0)
        # Brighter or darker than the background, in a tint of its own, with a texture of its own.
        delta = rng.choice([-1.0, 1.0]) * rng.uniform(0.15, 0.4) * rng.uniform([0.7, 0.5, 0.5], [1.3, 1.2, 1.2])
        lesion_texture = 1 + 0.3 * _smooth_noise(rng, size, 16)
        image += (alpha * lesion_texture)[..., None] * (delta * base).astype(np.float32)
    image += rng.normal(0, rng.uniform(2.0, 8.0), image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def make_synthetic_2d(root: str | Path, n: int = 20, size: tuple[int, int] = (256, 256), seed: int = 0,
                      image_format: str = "jpg", mask_format: str = "jpg") -> Path:
    """Write ``n`` lesion/polyp-like cases in the Kvasir-SEG layout and return ``root``.

    ``root/images/synthetic_{i:04d}.{image_format}``: RGB, ``size`` ``(H, W)``;
    ``root/masks/synthetic_{i:04d}.{mask_format}``: gray 0/255 (JPEG masks carry compression
    noise like Kvasir's; with ``mask_format="png"`` the folder is a generic images/masks set).
    """
    root = Path(root)
    for i in range(n):
        image, mask = _lesion_image(np.random.default_rng([seed, i]), tuple(size))
        write_image(root / "images" / f"synthetic_{i:04d}.{image_format}", image)
        write_image(root / "masks" / f"synthetic_{i:04d}.{mask_format}", mask)
    return root


def _ct_phantom(rng: np.random.Generator, shape: tuple[int, int, int],
                spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """HU ``int16 (X, Y, Z)`` and labels ``uint8`` (0 background, 1 organ, 2 lesion)."""
    x, y, z = (((np.arange(s, dtype=np.float32) - (s - 1) / 2) * d) for s, d in zip(shape, spacing))
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    half_x, half_y, half_z = (s * d / 2 for s, d in zip(shape, spacing))
    body_x, body_y = half_x * rng.uniform(0.75, 0.85), half_y * rng.uniform(0.55, 0.65)
    body = (x / body_x) ** 2 + (y / body_y) ** 2
    hu = np.where(body < 1, np.where(body < 0.82, 40.0, -100.0), -1000.0).astype(np.float32)
    hu = np.broadcast_to(hu, shape).copy()
    spine = (x / (0.12 * body_x)) ** 2 + ((y + 0.7 * body_y) / (0.12 * body_x)) ** 2 < 1
    hu[np.broadcast_to(spine, shape)] = 450.0
    # The organ: an ellipsoid with a smoothly irregular surface, over part of the slices only.
    centre = np.array([-0.35 * body_x, 0.1 * body_y, 0.0]) + rng.uniform(-0.05, 0.05, 3) * [body_x, body_y, half_z]
    axes = rng.uniform([0.3, 0.4, 0.45], [0.4, 0.55, 0.7]) * [body_x, body_y, half_z]
    organ_level = ((x - centre[0]) / axes[0]) ** 2 + ((y - centre[1]) / axes[1]) ** 2 + ((z - centre[2]) / axes[2]) ** 2
    organ = organ_level + 0.15 * _smooth_noise(rng, shape, 3) < 1
    labels = organ.astype(np.uint8)
    hu[organ] = rng.uniform(50.0, 70.0)
    for _ in range(rng.integers(1, 4)):
        # Hypodense lesions, centred well inside the organ.
        c = centre + rng.uniform(-0.5, 0.5, 3) * axes
        radius = rng.uniform(0.25, 0.5) * axes.min()
        lesion = organ & (((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) < radius ** 2)
        labels[lesion] = 2
        hu[lesion] = rng.uniform(10.0, 30.0)
    hu += rng.normal(0.0, 12.0, shape).astype(np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), labels


def make_synthetic_ct(root: str | Path, n: int = 4, shape: tuple[int, int, int] = (128, 128, 32),
                      spacing: tuple[float, float, float] = (0.8, 0.8, 2.5), seed: int = 0) -> Path:
    """Write ``n`` CT-like phantoms in the LiTS layout and return ``root``.

    ``root/volume-{i}.nii.gz``: ``int16`` HU, shape ``(X, Y, Z)``, voxel ``spacing`` mm, affine
    ``diag(-sx, -sy, sz)`` (LiTS-like orientation) centred on the volume;
    ``root/segmentation-{i}.nii.gz``: ``uint8`` 0 background, 1 organ (liver-like), 2 lesion.
    """
    root = Path(root)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [s * d / 2 * sign for s, d, sign in zip(shape, spacing, (1, 1, -1))]
    for i in range(n):
        hu, labels = _ct_phantom(np.random.default_rng([seed, i]), tuple(shape), tuple(spacing))
        write_nifti(root / f"volume-{i}.nii.gz", hu, affine=affine)
        write_nifti(root / f"segmentation-{i}.nii.gz", labels, affine=affine)
    return root
