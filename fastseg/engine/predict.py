"""Prediction with a trained 2-D model on whole images and volumes (slice by slice), with the
training's preprocessing, back at the input's size, with optional flip test-time augmentation.

A :class:`Predictor` holds a model (eval mode) and the preprocessing it was trained with (a
checkpoint's ``preprocessing`` and ``labels`` entries, see :mod:`fastseg.engine.checkpoint`):

- ``size`` ``[h, w]``: every image (or slice) is resized to it as in training, predicted, and its
  probabilities resized back (bilinear) before thresholding; ``None``: the image is predicted at its
  own size, zero-padded at the bottom/right to the model's ``input_multiple`` and cropped back.
- ``channels``, ``intensity``: as the datasets apply them (:mod:`fastseg.data.transforms`).
- ``kind`` ``"image"`` (pixel values scaled to [0, 1]) or ``"volume"`` (physical units kept),
  ``axis``: the volume axis the model was trained on slices across (default 2).

Outputs are class maps (integers ``0 .. classes-1``): a binary model (one output channel) gives
``sigmoid > 0.5``, a multi-class one the argmax of its softmax. :meth:`Predictor.label_values`
turns them into the training data's raw label values, for writing next to the inputs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import image_to_tensor, intensity_preset, match_channels, restore_size

__all__ = ["Predictor"]


class Predictor:
    """Segment images and volumes with ``model``.

    Args:
        model: a segmentation network ``[N, C, H, W] -> logits [N, K, H, W]`` (K = 1: binary).
        preprocessing: ``{"size": [h, w] | None, "channels": int | None, "intensity": str | None,
            "kind": "image" | "volume", "axis": int}`` (missing keys: defaults above).
        labels: ``{"num_classes": int, "values": [raw value per class] | None}``.
        device: where the model runs.
        batch_size: images (slices) per forward pass.
        tta: average the probabilities of the input and its horizontal, vertical and double flips.
    """

    def __init__(self, model: nn.Module, preprocessing: dict, labels: dict | None = None, *,
                 device: str | torch.device = "cpu", batch_size: int = 8, tta: bool = False):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        size = preprocessing.get("size")
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.channels = preprocessing.get("channels") or getattr(model, "in_channels", None)
        intensity = preprocessing.get("intensity")
        self.intensity = intensity_preset(intensity) if intensity else None
        self.kind = preprocessing.get("kind", "image")
        self.axis = int(preprocessing.get("axis", 2))
        self.multiple = int(getattr(model, "input_multiple", 1))
        labels = labels or {}
        self.values = labels.get("values")
        self.batch_size = batch_size
        self.tta = tta

    @classmethod
    def from_checkpoint(cls, checkpoint, *, backend: str = "auto", **kwargs) -> "Predictor":
        """A predictor for a checkpoint file (or its loaded payload): the model it names, with its
        weights, preprocessing and label map. ``kwargs``: device, batch_size, tta."""
        from .checkpoint import load_checkpoint, model_from_checkpoint
        payload = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
        model = model_from_checkpoint(payload, backend=backend)
        return cls(model, payload.get("preprocessing", {}), payload.get("labels", {}), **kwargs)

    # -- preprocessing and the forward pass ---------------------------------------------------

    def prepare(self, array: np.ndarray) -> torch.Tensor:
        """One 2-D image or slice ``(H, W[, C])`` -> the model's input ``[C, h, w]``."""
        image = image_to_tensor(np.ascontiguousarray(array), scale=self.kind == "image", size=self.size)
        image = match_channels(image, self.channels)
        return self.intensity(image) if self.intensity is not None else image

    @torch.no_grad()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` -> class probabilities ``[B, K, h, w]`` (K = 1: foreground), the
        flips averaged with ``tta``; padded to the model's multiple and cropped back."""
        h, w = batch.shape[-2:]
        ph, pw = -h % self.multiple, -w % self.multiple
        x = F.pad(batch, (0, pw, 0, ph)) if ph or pw else batch
        x = x.to(self.device)
        flips = [(), (-1,), (-2,), (-2, -1)] if self.tta else [()]
        total = None
        for dims in flips:
            logits = self.model(x.flip(dims) if dims else x).float()
            p = torch.sigmoid(logits) if logits.shape[1] == 1 else logits.softmax(1)
            p = p.flip(dims) if dims else p
            total = p if total is None else total + p
        return (total / len(flips))[..., :h, :w].cpu()

    def _classes(self, probabilities: torch.Tensor) -> np.ndarray:
        """``[K, H, W]`` probabilities -> class map ``[H, W]`` (uint8 when it fits)."""
        classes = (probabilities[0] > 0.5) if probabilities.shape[0] == 1 else probabilities.argmax(0)
        dtype = np.uint8 if probabilities.shape[0] <= 256 else np.int32
        return classes.numpy().astype(dtype)

    def predict_slices(self, slices: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Class maps ``[H, W]`` of 2-D images or slices ``(H, W[, C])``, each at its own size."""
        out = []
        for start in range(0, len(slices), self.batch_size):
            chunk = slices[start:start + self.batch_size]
            inputs = [self.prepare(a) for a in chunk]
            if self.size is None and len({tuple(t.shape) for t in inputs}) > 1:
                probs = [self.probabilities(t[None])[0] for t in inputs]
            else:
                probs = list(self.probabilities(torch.stack(inputs)))
            out += [self._classes(restore_size(p, a.shape[:2])) for p, a in zip(probs, chunk)]
        return out

    def predict_image(self, array: np.ndarray) -> np.ndarray:
        """Class map ``(H, W)`` of an image ``(H, W[, C])``."""
        return self.predict_slices([array])[0]

    def predict_volume(self, array: np.ndarray, axis: int | None = None) -> np.ndarray:
        """Class map ``(X, Y, Z)`` of a volume ``(X, Y, Z[, C])``, predicted slice by slice across
        ``axis`` (default: the training's) and reassembled."""
        axis = self.axis if axis is None else axis
        if array.ndim not in (3, 4):
            raise ValueError(f"a volume must have shape (X, Y, Z[, C]), got {array.shape}")
        slices = [np.take(array, k, axis=axis) for k in range(array.shape[axis])]
        return np.stack(self.predict_slices(slices), axis=axis)

    def predict(self, array: np.ndarray, spatial_ndim: int) -> np.ndarray:
        """:meth:`predict_image` (``spatial_ndim`` 2) or :meth:`predict_volume` (3)."""
        return self.predict_image(array) if spatial_ndim == 2 else self.predict_volume(array)

    def label_values(self, classes: np.ndarray, *, visible: bool = False) -> np.ndarray:
        """Class indices -> the training data's raw label values (class ``i`` -> ``values[i]``).
        Without known values: the indices, or with ``visible`` (a binary PNG mask) 0/255."""
        if self.values is not None:
            lut = np.asarray(self.values)
            return lut[classes].astype(np.min_scalar_type(lut.max()) if lut.min() >= 0 else lut.dtype)
        if visible and classes.max(initial=0) <= 1:
            return classes.astype(np.uint8) * 255
        return classes


def output_path(source: Path, output: Path, suffix: str) -> Path:
    """Where the prediction of ``source`` goes in folder ``output``: its file name with ``suffix``
    (e.g. ``_pred.png``) in place of its data suffix."""
    from ..data.io import data_suffix
    ending = data_suffix(source)
    name = source.name[: len(source.name) - len(ending)] if ending else source.stem
    return output / f"{name}{suffix}"
