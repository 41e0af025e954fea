"""One case of a dataset: its files, how its label values become classes, and reading it checked."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import DataError, in_case
from .io import ImageInfo, ImageRecord, is_jpeg, read, read_info

# Drawn 0/255 masks are binarised at mid-grey: JPEG masks carry compression noise around every
# edge, and some PNG masks are anti-aliased or RGB(A).
MASK_THRESHOLD = 127
# World coordinates (mm) within which two affines are the same grid: header float32 rounding
# and converters that re-derive the affine from qform differ in the 4th decimal.
AFFINE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Case:
    """The files of one case.

    Attributes:
        case_id: unique within the dataset (the file stem the layout pairs by).
        image: one file per input channel (nnU-Net ``_0000``, ``_0001``, ...), usually one.
        label: the label files, merged by their maximum class (BUSI's several ``_mask*.png``);
            empty for an unlabelled case.
    """

    case_id: str
    image: tuple[Path, ...]
    label: tuple[Path, ...] = ()


@dataclass(frozen=True)
class LabelSpec:
    """How a label file's raw values become class indices.

    Attributes:
        values: raw values in class order (class ``i`` is ``values[i]``, e.g. MM-WHS
            ``(0, 205, 420, 500, 550, 600, 820, 850)`` -> 0..7); any other value is an error.
            ``None``: the raw value is the class index.
        threshold: binarise ``raw > threshold`` to classes 0/1 (drawn masks). JPEG masks are
            always binarised, at :data:`MASK_THRESHOLD` unless a threshold is given.
    """

    values: tuple[int, ...] | None = None
    threshold: float | None = None

    def describe(self) -> str:
        if self.threshold is not None:
            return f"binary mask (raw > {self.threshold:g})"
        if self.values is None:
            return "raw value = class index"
        return "raw " + ", ".join(f"{v}->{i}" for i, v in enumerate(self.values))

    def to_classes(self, raw: np.ndarray, path: str | Path) -> np.ndarray:
        """Class indices of a raw label array of any shape, same shape: ``uint8`` (``int16`` past
        256 classes; with ``values=None`` the raw integers themselves). Raises
        :class:`DataError` naming ``path`` on values the spec does not allow."""
        threshold = self.threshold
        if threshold is None and is_jpeg(path):
            threshold = MASK_THRESHOLD
        if threshold is not None:
            return (raw > threshold).astype(np.uint8)
        if raw.dtype.kind == "f":
            rounded = np.rint(raw)
            if not np.array_equal(rounded, raw):
                raise DataError("label values are not integers", path)
            raw = rounded.astype(np.int64)
        elif raw.dtype.kind not in "iu":
            raise DataError(f"label array has type {raw.dtype}", path)
        values = self.values
        if values is None:
            if raw.size and raw.min() < 0:
                raise DataError(f"negative label values {_listing(np.unique(raw[raw < 0]))}", path)
            return raw
        top = max(values)
        lut = np.full(top + 1, -1, np.int16)
        lut[list(values)] = np.arange(len(values))
        clipped = np.clip(raw, 0, top)
        classes = lut[clipped]
        bad = (classes < 0) | (clipped != raw)
        if bad.any():
            raise DataError(
                f"unexpected label values {_listing(np.unique(raw[bad]))} (expected {', '.join(map(str, values))})",
                path)
        return classes.astype(np.uint8) if len(values) <= 256 else classes


def _listing(values: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(v) for v in values[:limit].tolist())
    return shown + (f", ... ({len(values)} values)" if len(values) > limit else "")


def _check_same_grid(reference: ImageInfo | ImageRecord, other: ImageInfo | ImageRecord, what: str) -> None:
    if reference.original_size != other.original_size:
        raise DataError(
            f"{what} shape {other.original_size} differs from image shape {reference.original_size} "
            f"({reference.path.name})", other.path)
    if reference.affine is not None and other.affine is not None and not np.allclose(
            reference.affine, other.affine, rtol=0, atol=AFFINE_TOLERANCE):
        raise DataError(
            f"{what} affine differs from the image's ({reference.path.name}):\n{other.affine}\nvs\n{reference.affine}",
            other.path)


def probe_case(case: Case) -> ImageInfo:
    """Check a case from its headers only: every file opens, channel files and label files share
    the first image's shape and affine. Returns the first image's info."""
    with in_case(case.case_id):
        infos = [read_info(p) for p in case.image]
        for info in infos[1:]:
            _check_same_grid(infos[0], info, "channel")
        for path in case.label:
            _check_same_grid(infos[0], read_info(path), "label")
    return infos[0]


def read_case_image(case: Case) -> ImageRecord:
    """The case's image; several channel files are stacked on a last axis (``(..., C)``)."""
    with in_case(case.case_id):
        records = [read(p) for p in case.image]
        for record in records[1:]:
            _check_same_grid(records[0], record, "channel")
    first = records[0]
    array = stack_channels([r.array for r in records], len(first.original_size))
    return ImageRecord(first.path, array, first.original_size, first.spacing, first.affine, first.header)


def stack_channels(arrays: Sequence[np.ndarray], spatial_ndim: int) -> np.ndarray:
    """Channel files' arrays (each spatial, or spatial + channels) -> one ``(*spatial, C)`` array;
    a single array is returned as it is."""
    if len(arrays) == 1:
        return arrays[0]
    return np.concatenate([a if a.ndim > spatial_ndim else a[..., None] for a in arrays], axis=-1)


def merge_labels(raws: Sequence[np.ndarray], paths: Sequence[Path], labels: LabelSpec) -> np.ndarray:
    """Class map of a case's label files (raw spatial arrays, one per path): each mapped by
    ``labels``, then merged by maximum (the union of BUSI's masks)."""
    merged = None
    for raw, path in zip(raws, paths):
        classes = labels.to_classes(raw, path)
        merged = classes if merged is None else np.maximum(merged, classes)
    return merged


def read_case_label(case: Case, labels: LabelSpec, image: ImageInfo | ImageRecord | None = None) -> np.ndarray:
    """Class indices of the case's label files, merged by maximum; checked against ``image``'s
    grid when given. Shape: the label's spatial shape."""
    if not case.label:
        raise DataError("case has no label", case.image[0], case.case_id)
    with in_case(case.case_id):
        raws = []
        for path in case.label:
            record = read(path)
            if image is not None:
                _check_same_grid(image, record, "label")
            # RGB masks of gray drawings: any channel set marks the pixel.
            raws.append(record.array.max(axis=-1) if record.array.ndim > len(record.original_size) else record.array)
        return merge_labels(raws, case.label, labels)


def read_case(case: Case, labels: LabelSpec) -> tuple[ImageRecord, np.ndarray]:
    """Image record and class-index label of a case, fully decoded and checked."""
    image = read_case_image(case)
    return image, read_case_label(case, labels, image)
