"""Datasets for 2-D models: whole images (:class:`ImageDataset`) and slices of volumes
(:class:`VolumeSliceDataset`), both yielding the same sample dicts.

A sample is ``{"image": float32 [C, H, W], "mask": float32 [1, H, W] (binary: label > 0) or
int64 [H, W] (class indices), "case_id": str, "original_size": int64 [2]}``, plus for slices
``"slice_index": int64 []`` and ``"spacing": float32 [2]`` (in-plane, mm). The pipeline per
sample: decode -> resize to ``size`` -> channels -> intensity -> augmentation -> target.

Datasets hold paths, never open files, so they work in ``DataLoader`` workers; the volume cache
is per worker (it is not pickled).
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .cases import Case, merge_labels, probe_case, read_case, read_case_image, read_case_label, stack_channels
from .errors import DataError, in_case
from .io import decoding, native_byte_order, open_volume
from .layouts import CaseIndex, find_cases
from .transforms import RandomAugment, image_to_tensor, intensity_preset, match_channels, resize_mask

Intensity = Callable[[torch.Tensor], torch.Tensor]


class _SegmentationDataset(Dataset):
    """What both datasets share: finding the cases, dropping bad ones, the per-sample pipeline."""

    kind: str

    def __init__(self, source: str | Path | CaseIndex, *, layout: str | None, case_ids: Sequence[str] | None,
                 size: int | tuple[int, int] | None, channels: int | None, intensity: str | Intensity | None,
                 augment: bool | Callable | None, binary: bool, skip_bad: bool, label_values: Sequence[int] | None):
        index = source if isinstance(source, CaseIndex) else find_cases(
            source, layout, skip_bad=skip_bad, label_values=label_values)
        if case_ids is not None:
            index = index.subset(case_ids)
        if index.kind != self.kind:
            other = "ImageDataset" if index.kind == "image" else "VolumeSliceDataset"
            raise DataError(f"{index.layout} folder holds {index.kind} files: use {other}", index.root)
        self.index = index
        self.labels = index.labels
        self.skip_bad = skip_bad
        self.skipped: list[DataError] = list(index.skipped)
        self.size = (size, size) if isinstance(size, int) else size
        self.channels = channels
        self.intensity = intensity_preset(intensity) if isinstance(intensity, str) else intensity
        self.augment = RandomAugment() if augment is True else augment or None
        self.binary = binary

    def _checked(self, check: Callable[[Case], object]) -> list[tuple[Case, object]]:
        """``(case, check(case))`` for every case that passes; failures raise, or with
        ``skip_bad`` are listed in ``self.skipped`` (and a warning says so)."""
        passed = []
        for case in self.index.cases:
            try:
                passed.append((case, check(case)))
            except DataError as err:
                if not self.skip_bad:
                    raise
                self.skipped.append(err)
        if self.skipped:
            warnings.warn(f"{self.index.root}: skipped {len(self.skipped)} bad cases; report() lists them", stacklevel=3)
        if not passed:
            raise DataError("no usable cases", self.index.root)
        return passed

    def report(self) -> str:
        """Cases used and every skipped file with its reason, one per line."""
        lines = [f"{self.index.root} ({self.index.layout}): {len(self.cases)} cases used, {len(self.skipped)} skipped"]
        return "\n".join(lines + [f"  skipped: {err}" for err in self.skipped])

    def _sample(self, array: np.ndarray, classes: np.ndarray, scale: bool, **extra) -> dict:
        """The pipeline from a decoded ``(H, W[, C])`` array and its class map to a sample."""
        image = match_channels(image_to_tensor(array, scale, self.size), self.channels)
        mask = torch.from_numpy(classes)
        if mask.dtype != torch.uint8:  # uint8 has torch's fast resize; wider raw labels need int64 ops
            mask = mask.to(torch.int64)
        if self.size is not None:
            mask = resize_mask(mask, self.size)
        if self.intensity is not None:
            image = self.intensity(image)
        if self.augment is not None:
            image, mask = self.augment(image, mask)
        target = (mask > 0).to(torch.float32)[None] if self.binary else mask.to(torch.int64)
        original_size = torch.tensor(classes.shape[:2], dtype=torch.int64)
        return {"image": image, "mask": target, "original_size": original_size, **extra}


class ImageDataset(_SegmentationDataset):
    """2-D images with masks (Kvasir-SEG, ISIC 2018, BUSI, 2-D nnU-Net, generic).

    Args:
        source: a dataset folder (layout detected) or a :class:`CaseIndex`.
        layout: force a layout instead of detecting it (with a folder ``source``).
        case_ids: use only these cases (e.g. one split), in this order.
        size: output ``(H, W)`` (or one int for square); ``None`` keeps each image's size.
        channels: 1 (RGB -> gray) or 3 (gray -> RGB); ``None`` keeps the file's.
        intensity: a preset name (see :func:`intensity_preset`) or a callable on ``[C, H, W]``;
            applied after scaling pixels to [0, 1].
        augment: ``True`` for :class:`RandomAugment` defaults, or a callable ``(image, mask) ->
            (image, mask)``; ``None`` for none (evaluation).
        binary: target ``label > 0`` as float ``[1, H, W]``; else class indices ``[H, W]``.
        skip_bad: decode every case up front and drop the bad ones (listed in ``skipped``,
            see :meth:`report`) instead of raising on the first.
        label_values: raw label values in class order, overriding the layout's (with a folder
            ``source``).
    """

    kind = "image"

    def __init__(self, source, *, layout=None, case_ids=None, size=(256, 256), channels=None, intensity="minmax",
                 augment=None, binary=True, skip_bad=False, label_values=None):
        super().__init__(source, layout=layout, case_ids=case_ids, size=size, channels=channels, intensity=intensity,
                         augment=augment, binary=binary, skip_bad=skip_bad, label_values=label_values)
        # Without skip_bad only headers are read here; pixels are decoded (and checked) per sample.
        check = (lambda case: read_case(case, self.labels)) if skip_bad else probe_case
        self.cases = [case for case, _ in self._checked(check)]

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict:
        case = self.cases[i]
        record, classes = read_case(case, self.labels)
        return self._sample(record.array, classes, scale=True, case_id=case.case_id)


class VolumeSliceDataset(_SegmentationDataset):
    """2-D slices of NIfTI volumes with labels (LiTS, MM-WHS, nnU-Net, generic).

    Every label volume is read once at construction to find which slices hold foreground
    (:attr:`foreground`, used by :meth:`sampler`) and to check its values. Slices are
    read through a per-worker LRU cache of ``cache_size`` opened volumes, so consecutive slices of
    a volume do not decode it again: an uncompressed ``.nii`` is read slice by slice from disk, a
    ``.nii.gz`` is decoded once while it stays in the cache.

    Args: as :class:`ImageDataset` (``intensity`` applies to raw voxel values, e.g. HU:
    ``"ct-liver"`` for LiTS), plus:
        axis: the voxel axis slices are taken across (2: the third, axial for most CT).
        cache_size: volumes (image and label files) kept decoded per worker.
    With ``skip_bad`` every image volume is also decoded once at construction.
    """

    kind = "volume"

    def __init__(self, source, *, layout=None, case_ids=None, size=(256, 256), channels=None, intensity="zscore",
                 augment=None, binary=True, skip_bad=False, label_values=None, axis=2, cache_size=8):
        super().__init__(source, layout=layout, case_ids=case_ids, size=size, channels=channels, intensity=intensity,
                         augment=augment, binary=binary, skip_bad=skip_bad, label_values=label_values)
        self.axis = axis
        self.cache_size = cache_size
        self._cache: OrderedDict = OrderedDict()
        in_plane = [a for a in range(3) if a != axis]
        self.cases, foreground, locations, self._spacing = [], [], [], []
        for case, (info, has_foreground) in self._checked(self._check):
            locations += [(len(self.cases), k) for k in range(len(has_foreground))]
            foreground.append(has_foreground)
            self.cases.append(case)
            self._spacing.append([info.spacing[a] for a in in_plane])
        self.foreground = np.concatenate(foreground)
        self._locations = np.asarray(locations, dtype=np.int64)

    def _check(self, case: Case):
        info = probe_case(case)
        if len(info.original_size) != 3:
            raise DataError(f"expected a 3-D volume, got shape {info.original_size}", case.image[0], case.case_id)
        classes = read_case_label(case, self.labels)
        if self.skip_bad:
            read_case_image(case)
        return info, classes.any(axis=tuple(a for a in range(classes.ndim) if a != self.axis))

    def __getstate__(self):
        # Each worker fills its own cache; never ship decoded volumes between processes.
        return {**self.__dict__, "_cache": OrderedDict()}

    def _volume(self, path: Path):
        key = str(path)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        volume = open_volume(path)
        self._cache[key] = volume
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return volume

    def _slices(self, paths: Sequence[Path], k: int) -> list[np.ndarray]:
        where = tuple(k if a == self.axis else slice(None) for a in range(3))
        slices = []
        for path in paths:
            with decoding(path):
                # A copy: nibabel's proxy gives read-only slices, which torch will not wrap.
                slices.append(native_byte_order(np.array(self._volume(path)[where])))
        return slices

    def __len__(self) -> int:
        return len(self._locations)

    def __getitem__(self, i: int) -> dict:
        case_index, k = (int(v) for v in self._locations[i])
        case = self.cases[case_index]
        with in_case(case.case_id):
            image = stack_channels(self._slices(case.image, k), 2)
            classes = merge_labels(self._slices(case.label, k), case.label, self.labels)
        return self._sample(image, classes, scale=False, case_id=case.case_id,
                            slice_index=torch.tensor(k), spacing=torch.tensor(self._spacing[case_index], dtype=torch.float32))

    def sampler(self, foreground_fraction: float | None = None, volumes_per_block: int | None = None,
                num_samples: int | None = None, generator: torch.Generator | None = None) -> SliceSampler:
        """An epoch order for ``DataLoader(sampler=...)``, see :class:`SliceSampler`.

        Args:
            foreground_fraction: draw slices with foreground with this probability (with
                replacement, uniformly within the foreground and background groups); ``None``:
                every slice once, shuffled.
            volumes_per_block: visit the volumes in random blocks of this many, shuffling slices
                within a block, so a worker's cache (``cache_size`` files) holds what it reads;
                ``None``: shuffle across all volumes.
            num_samples: slices per epoch with ``foreground_fraction``; default ``len(self)``.
        """
        weights = None
        if foreground_fraction is not None:
            has = self.foreground
            weights = np.ones(len(has)) if has.all() or not has.any() else \
                np.where(has, foreground_fraction / has.sum(), (1 - foreground_fraction) / (~has).sum())
        return SliceSampler(self._locations[:, 0], weights, num_samples or len(self), volumes_per_block, generator)


class SliceSampler(Sampler[int]):
    """Indices of a :class:`VolumeSliceDataset` for one epoch: a permutation, or weighted draws
    with replacement, optionally grouped into blocks of volumes.

    Grouping is what makes compressed volumes affordable: each volume in a block is decoded once
    per worker and then served from the cache, where a global shuffle would decode a volume for
    almost every slice once the dataset is larger than the cache.
    """

    def __init__(self, case_of: np.ndarray, weights: np.ndarray | None, num_samples: int,
                 volumes_per_block: int | None, generator: torch.Generator | None):
        self.case_of = torch.as_tensor(case_of)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.num_samples = num_samples if weights is not None else len(case_of)
        self.volumes_per_block = volumes_per_block
        self.generator = generator

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        if self.weights is None:
            order = torch.randperm(len(self.case_of), generator=self.generator)
        else:
            order = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=self.generator)
        if self.volumes_per_block:
            rank = torch.randperm(int(self.case_of.max()) + 1, generator=self.generator)
            block = rank[self.case_of[order]] // self.volumes_per_block
            order = order[torch.sort(block, stable=True).indices]
        return iter(order.tolist())


def create_dataset(source: str | Path | CaseIndex, *, layout: str | None = None, skip_bad: bool = False,
                   label_values: Sequence[int] | None = None, **kwargs) -> ImageDataset | VolumeSliceDataset:
    """The dataset for a folder's kind: :class:`ImageDataset` for 2-D files,
    :class:`VolumeSliceDataset` for NIfTI; ``kwargs`` go to that class."""
    index = source if isinstance(source, CaseIndex) else find_cases(
        source, layout, skip_bad=skip_bad, label_values=label_values)
    dataset_type = VolumeSliceDataset if index.kind == "volume" else ImageDataset
    return dataset_type(index, skip_bad=skip_bad, **kwargs)
