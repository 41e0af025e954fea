"""Readers and writers for NIfTI volumes (nibabel) and 2-D images (Pillow).

Arrays keep the file's own values and dtype: HU stay HU, a 16-bit PNG stays ``uint16``. Spatial
layout is the file's: a volume is ``(X, Y, Z)`` (``(X, Y, Z, C)`` for 4-D files) in voxel order, as
nibabel returns it; an image is ``(H, W)`` or ``(H, W, 3)``.
"""
from __future__ import annotations

import contextlib
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from PIL import Image

from .errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
JPEG_SUFFIXES = (".jpg", ".jpeg")
# What the decoders raise on corrupt, truncated or foreign files.
_DECODE_ERRORS = (OSError, EOFError, ValueError, SyntaxError, zlib.error, ImageFileError)
# Pillow modes read as RGB / as gray; every other mode keeps its own values ("L", "I;16", "F", ...).
_AS_RGB = {"P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_AS_GRAY = {"1", "LA", "La"}


@dataclass
class ImageRecord:
    """A decoded file.

    Attributes:
        path: the file read.
        array: the voxels, file dtype; volume ``(X, Y, Z[, C])``, image ``(H, W[, 3])``.
        original_size: spatial shape, ``(X, Y, Z)`` or ``(H, W)``.
        spacing: voxel size per spatial axis in the file's units (mm for NIfTI; 1.0 for images).
        affine: ``(4, 4)`` float64 voxel-to-world matrix of a NIfTI file, ``None`` for images.
        header: the NIfTI header (kept so that a prediction can be written like its source).
    """

    path: Path
    array: np.ndarray
    original_size: tuple[int, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray | None = None
    header: nib.nifti1.Nifti1Header | None = None


@dataclass
class ImageInfo:
    """What a file's header says, read without decoding the pixels (see :func:`read_info`)."""

    path: Path
    original_size: tuple[int, ...]
    channels: int
    spacing: tuple[float, ...]
    affine: np.ndarray | None = None


def data_suffix(path: str | Path) -> str:
    """Lower-case suffix, with ``.nii.gz`` as one suffix."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def file_stem(path: str | Path) -> str:
    """File name without its data suffix: ``case_1.nii.gz`` -> ``case_1``."""
    name = Path(path).name
    return name[: len(name) - len(data_suffix(path))]


def is_nifti(path: str | Path) -> bool:
    return data_suffix(path) in NIFTI_SUFFIXES


def is_jpeg(path: str | Path) -> bool:
    return data_suffix(path) in JPEG_SUFFIXES


def natural_key(text: str) -> tuple:
    """Sort key that orders ``case-2`` before ``case-10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def list_data_files(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image and NIfTI files in ``folder`` in natural order, skipping hidden files and the
    ``__MACOSX`` resource forks that zip archives made on macOS carry."""
    folder = Path(folder)
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    files = [
        p for p in candidates
        if data_suffix(p) in IMAGE_SUFFIXES + NIFTI_SUFFIXES and p.is_file()
        and not any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(folder).parts)
    ]
    return sorted(files, key=lambda p: natural_key(str(p)))


@contextlib.contextmanager
def decoding(path: str | Path):
    """Turn a decoder's failure on ``path`` into a :class:`DataError` that names the file."""
    try:
        yield
    except DataError:
        raise
    except _DECODE_ERRORS as err:
        raise DataError(f"cannot read {data_suffix(path) or 'file'} ({type(err).__name__}: {err})", path) from err


def native_byte_order(array: np.ndarray) -> np.ndarray:
    """``array`` in the machine's byte order (old big-endian NIfTI files; torch rejects them)."""
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def _spacing(header) -> tuple[float, ...]:
    return tuple(float(z) for z in header.get_zooms()[:3])


def _load_nifti(path: Path):
    """The nibabel image, with an uncompressed file's length checked against its header.

    ``mmap=False`` so that no memory map (an open file) outlives the call.
    """
    with decoding(path):
        image = nib.load(path, mmap=False)
    if data_suffix(path) == ".nii":
        header = image.header
        needed = int(header.get_data_offset()) + int(np.prod(image.shape)) * header.get_data_dtype().itemsize
        if path.stat().st_size < needed:
            raise DataError(f"truncated NIfTI: {path.stat().st_size} bytes, header needs {needed}", path)
    return image


def read_nifti(path: str | Path) -> ImageRecord:
    """Read a ``.nii`` / ``.nii.gz`` file: array in file dtype (float when the header scales it),
    affine, header and spacing."""
    path = Path(path)
    image = _load_nifti(path)
    with decoding(path):
        array = native_byte_order(np.asanyarray(image.dataobj))
    return ImageRecord(path, array, tuple(image.shape[:3]), _spacing(image.header), image.affine, image.header)


def open_volume(path: str | Path):
    """Array-like over a NIfTI volume for reading slices (``volume[:, :, k]`` -> ndarray).

    An uncompressed ``.nii`` stays on disk: nibabel's proxy reads only the bytes of the slice and
    opens the file per read, so no handle is held. A ``.nii.gz`` is decoded once into memory, as
    gzip cannot seek. Slice reads may raise; wrap them in :func:`decoding`.
    """
    path = Path(path)
    image = _load_nifti(path)
    if data_suffix(path) == ".nii":
        return image.dataobj
    with decoding(path):
        return native_byte_order(np.asanyarray(image.dataobj))


def _normalise_mode(image: Image.Image) -> Image.Image:
    if image.mode in _AS_RGB:
        return image.convert("RGB")
    if image.mode in _AS_GRAY:
        return image.convert("L")
    return image


def read_image(path: str | Path) -> ImageRecord:
    """Read a PNG, JPEG, BMP or TIFF as ``(H, W)`` gray or ``(H, W, 3)`` RGB.

    8-bit files give ``uint8``, 16-bit files ``uint16`` (whether Pillow decodes them as "I;16"
    or as 32-bit "I"), float TIFFs ``float32``. Palette, alpha and CMYK images become RGB.
    """
    path = Path(path)
    with decoding(path), Image.open(path) as image:
        # np.array, not asarray: Pillow's buffer is read-only and callers may write in place.
        array = np.array(_normalise_mode(image))
    array = native_byte_order(array)
    if array.dtype == np.int32 and array.size and array.min() >= 0 and array.max() <= 65535:
        array = array.astype(np.uint16)
    return ImageRecord(path, array, tuple(array.shape[:2]), (1.0, 1.0))


def read(path: str | Path) -> ImageRecord:
    """Read any supported file: NIfTI with :func:`read_nifti`, images with :func:`read_image`."""
    suffix = data_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return read_nifti(path)
    if suffix in IMAGE_SUFFIXES:
        return read_image(path)
    raise DataError(f"unsupported file type {suffix!r}", path)


def read_info(path: str | Path) -> ImageInfo:
    """Spatial size, channels, spacing and affine from the header only (cheap; a corrupt pixel
    stream is found by :func:`read`, a truncated ``.nii`` already here)."""
    path = Path(path)
    if is_nifti(path):
        image = _load_nifti(path)
        shape = image.shape
        return ImageInfo(path, tuple(shape[:3]), shape[3] if len(shape) > 3 else 1, _spacing(image.header), image.affine)
    if data_suffix(path) not in IMAGE_SUFFIXES:
        raise DataError(f"unsupported file type {data_suffix(path)!r}", path)
    with decoding(path), Image.open(path) as image:
        width, height = image.size
        channels = 3 if image.mode in _AS_RGB or image.mode == "RGB" else 1
    return ImageInfo(path, (height, width), channels, (1.0, 1.0))


def _smallest_int_dtype(array: np.ndarray, candidates) -> np.dtype | None:
    lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
    for dtype in candidates:
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dtype)
    return None


def write_image(path: str | Path, array, quality: int = 95) -> Path:
    """Write ``(H, W)`` or ``(H, W, 3)`` as PNG/JPEG/BMP/TIFF (format from the suffix).

    Values are written as given: ``uint8``; ``uint16`` (gray PNG/TIFF only); other integer arrays
    in the smaller of the two that holds them; ``bool`` as 0/255. Floats are refused: scale first.
    """
    path = Path(path)
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype.kind in "iu" and array.dtype not in (np.uint8, np.uint16):
        dtype = _smallest_int_dtype(array, (np.uint8, np.uint16))
        if dtype is None:
            raise ValueError(f"{path}: values outside 0..65535 cannot be stored in an image")
        array = array.astype(dtype)
    if array.dtype not in (np.uint8, np.uint16) or not (array.ndim == 2 or array.shape[2:] == (3,)):
        raise ValueError(f"{path}: cannot write a {array.dtype} array of shape {array.shape} as an image")
    if array.dtype == np.uint16 and (array.ndim == 3 or is_jpeg(path)):
        raise ValueError(f"{path}: 16-bit images must be gray PNG or TIFF")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **({"quality": quality} if is_jpeg(path) else {}))
    return path


def write_nifti(path: str | Path, array, like: ImageRecord | None = None, affine=None) -> Path:
    """Write ``array`` as ``.nii``/``.nii.gz``.

    With ``like`` (the record of the source image) the file carries the source's affine and a copy
    of its header (orientation codes, units, description), with the data type set to the array's
    and no intensity scaling, so a predicted mask overlays its image in any viewer. ``affine``
    overrides; without either the affine is the identity (and units are mm). ``bool`` is stored as ``uint8`` and
    64-bit integers in the smallest integer type that holds them (NIfTI readers reject int64).
    """
    path = Path(path)
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif array.dtype in (np.int64, np.uint64):
        array = array.astype(_smallest_int_dtype(array, (np.uint8, np.int16, np.int32)) or np.float64)
    header = like.header.copy() if like is not None and like.header is not None else None
    if affine is None:
        affine = like.affine if like is not None and like.affine is not None else np.eye(4)
    image_type = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = image_type(array, np.asarray(affine, dtype=np.float64), header)
    image.header.set_data_dtype(array.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    if header is None:
        image.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path
