"""Medical data for 2-D segmentation: NIfTI and image readers, the public datasets' layouts as
they ship, datasets of images and of volume slices, transforms, splits and synthetic data.

Quick start::

    from fastseg.data import create_dataset, make_synthetic_2d
    root = make_synthetic_2d("/tmp/polyps", n=40)           # or a Kvasir-SEG/ISIC/BUSI/LiTS/... folder
    train = create_dataset(root, size=256, augment=True)    # {"image": [C,H,W], "mask": [1,H,W], ...}
"""
from .cases import Case, LabelSpec, probe_case, read_case
from .datasets import ImageDataset, SliceSampler, VolumeSliceDataset, create_dataset
from .errors import DataError
from .inspect import InspectionReport, format_report, inspect_dataset
from .io import ImageInfo, ImageRecord, open_volume, read, read_image, read_info, read_nifti, write_image, write_nifti
from .layouts import LAYOUTS, CaseIndex, find_cases, register_layout
from .splits import kfold_splits, load_splits, make_splits, save_splits
from .synthetic import make_synthetic_2d, make_synthetic_ct
from .transforms import (
    CT_WINDOWS, INTENSITY_PRESETS, CTWindow, ImageNetNormalize, MinMax, PercentileZScore, RandomAugment,
    image_to_tensor, intensity_preset, match_channels, resize_image, resize_mask, restore_size,
)

__all__ = [
    "Case", "LabelSpec", "probe_case", "read_case",
    "ImageDataset", "SliceSampler", "VolumeSliceDataset", "create_dataset",
    "DataError",
    "InspectionReport", "format_report", "inspect_dataset",
    "ImageInfo", "ImageRecord", "open_volume", "read", "read_image", "read_info", "read_nifti", "write_image",
    "write_nifti",
    "LAYOUTS", "CaseIndex", "find_cases", "register_layout",
    "kfold_splits", "load_splits", "make_splits", "save_splits",
    "make_synthetic_2d", "make_synthetic_ct",
    "CT_WINDOWS", "INTENSITY_PRESETS", "CTWindow", "ImageNetNormalize", "MinMax", "PercentileZScore",
    "RandomAugment", "image_to_tensor", "intensity_preset", "match_channels", "resize_image", "resize_mask",
    "restore_size",
]
