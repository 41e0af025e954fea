"""Medical data for 2-D segmentation: NIfTI and image readers, the public datasets' layouts as
they ship, datasets of images and of volume slices, transforms, splits and synthetic data.

Quick start::

    from fastseg.data import create_dataset, make_synthetic_2d
    root = make_synthetic_2d("/tmp/polyps", n=40)           # or a Kvasir-SEG/ISIC/BUSI/LiTS/... folder
    train = create_dataset(root, size=256, augment=True)    # {"image": [C,H,W], "mask": [1,H,W], ...}

Each name loads its module on first use: ``fastseg data inspect`` reads folders without
importing torch (only the datasets and transforms need it).
"""
import importlib

_MODULES = {
    "cases": ["Case", "LabelSpec", "probe_case", "read_case"],
    "datasets": ["ImageDataset", "SliceSampler", "VolumeSliceDataset", "create_dataset"],
    "errors": ["DataError"],
    "inspect": ["InspectionReport", "format_report", "inspect_dataset"],
    "io": ["ImageInfo", "ImageRecord", "open_volume", "read", "read_image", "read_info", "read_nifti",
           "write_image", "write_nifti"],
    "layouts": ["LAYOUTS", "CaseIndex", "find_cases", "register_layout"],
    "splits": ["kfold_splits", "load_splits", "make_splits", "save_splits"],
    "synthetic": ["make_synthetic_2d", "make_synthetic_ct"],
    "transforms": ["CT_WINDOWS", "INTENSITY_PRESETS", "CTWindow", "ImageNetNormalize", "MinMax",
                   "PercentileZScore", "RandomAugment", "image_to_tensor", "intensity_preset",
                   "match_channels", "resize_image", "resize_mask", "restore_size"],
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}

__all__ = [name for names in _MODULES.values() for name in names]


def __getattr__(name):
    if name not in _HOME:
        raise AttributeError(f"module 'fastseg.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
