"""Tiny dataset trees in the public datasets' real naming schemes and file formats, for the
fastseg.data tests. Files are written with Pillow and nibabel directly (not fastseg's writers),
so the readers are tested against what other tools produce."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

AFFINE = np.array([[-0.75, 0.0, 0.0, 90.0], [0.0, -0.75, 0.0, 120.0], [0.0, 0.0, 2.5, -40.0], [0.0, 0.0, 0.0, 1.0]])
MMWHS_VALUES = (0, 205, 420, 500, 550, 600, 820, 850)


def disk(shape, centre, radius) -> np.ndarray:
    """bool mask of a disk."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius ** 2


def rgb_image(shape, seed=0) -> np.ndarray:
    """Smooth uint8 RGB content (compresses well, so JPEG stays close to it)."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    rng = np.random.default_rng(seed)
    base = rng.uniform(60, 200, 3)
    return np.clip(base + 40 * np.sin(yy / 5.0)[..., None] + 30 * np.cos(xx / 7.0)[..., None], 0, 255).astype(np.uint8)


def save(array, path, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def save_nifti(array, path, affine=AFFINE) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)
    return path


def mask_of(i, shape=(24, 32)) -> np.ndarray:
    return disk(shape, (shape[0] // 2, shape[1] // 2 + i), 5 + i)


def make_kvasir(root, n=3, shape=(24, 32)) -> Path:
    """``images/<id>.jpg`` + ``masks/<id>.jpg`` (0/255, JPEG noise), like Kvasir-SEG."""
    for i in range(n):
        name = f"cju{i}qkwl35piu0993"
        save(rgb_image(shape, i), Path(root, "images", f"{name}.jpg"), quality=90)
        save(mask_of(i, shape).astype(np.uint8) * 255, Path(root, "masks", f"{name}.jpg"), quality=75)
    (Path(root) / "kavsir_bboxes.json").write_text("{}")
    return Path(root)


def make_isic(root, shape=(20, 30)) -> Path:
    """Training and Validation Input/GroundTruth folder pairs, with the archives' text files."""
    for split, ids in (("Training", (0, 1, 3)), ("Validation", (12,))):
        inputs = Path(root, f"ISIC2018_Task1-2_{split}_Input")
        truth = Path(root, f"ISIC2018_Task1_{split}_GroundTruth")
        for i in ids:
            save(rgb_image(shape, i), inputs / f"ISIC_{i:07d}.jpg")
            save(mask_of(i, shape).astype(np.uint8) * 255, truth / f"ISIC_{i:07d}_segmentation.png")
        (inputs / "ATTRIBUTION.txt").write_text("ISIC")
        (truth / "LICENSE.txt").write_text("CC")
    return Path(root)


def make_busi(root, shape=(20, 24)) -> Path:
    """``benign (1)`` with two masks, ``malignant (1)`` with an RGB mask, ``normal (1)`` empty."""
    root = Path(root)
    gray = np.full(shape, 90, np.uint8)
    save(gray, root / "benign" / "benign (1).png")
    save(disk(shape, (5, 5), 3).astype(np.uint8) * 255, root / "benign" / "benign (1)_mask.png")
    save(disk(shape, (14, 16), 4).astype(np.uint8) * 255, root / "benign" / "benign (1)_mask_1.png")
    save(np.stack([gray] * 3, -1), root / "malignant" / "malignant (1).png")
    rgb_mask = np.stack([disk(shape, (10, 10), 6).astype(np.uint8) * 255] * 3, -1)
    save(rgb_mask, root / "malignant" / "malignant (1)_mask.png")
    save(gray, root / "normal" / "normal (1).png")
    save(np.zeros(shape, np.uint8), root / "normal" / "normal (1)_mask.png")
    return root


def ct_volume(shape=(16, 12, 6), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """int16 HU volume and uint8 labels 0/1/2 (organ on the middle slices, a lesion in it)."""
    rng = np.random.default_rng(seed)
    hu = rng.normal(40, 10, shape).astype(np.int16)
    labels = np.zeros(shape, np.uint8)
    labels[4:12, 3:9, 2:4] = 1
    labels[6:8, 5:7, 3] = 2
    hu[labels == 1] = 60
    return hu, labels


def make_lits(root, ids=(0, 1, 10), shape=(16, 12, 6)) -> Path:
    """``Training Batch 1|2/volume-N.nii`` + ``segmentation-N.nii`` (uncompressed, as shipped)."""
    for k, i in enumerate(ids):
        folder = Path(root, f"Training Batch {1 + k % 2}")
        hu, labels = ct_volume(shape, i)
        save_nifti(hu, folder / f"volume-{i}.nii")
        save_nifti(labels, folder / f"segmentation-{i}.nii")
    save_nifti(ct_volume(shape)[0], Path(root, "Test", "test-volume-0.nii"))
    return Path(root)


def mmwhs_label(shape=(10, 8, 4)) -> np.ndarray:
    """int16 label volume using every MM-WHS value: class c occupies the x-row c."""
    label = np.zeros(shape, np.int16)
    for c, value in enumerate(MMWHS_VALUES):
        label[c] = value
    return label


def make_mmwhs(root, n=2, shape=(10, 8, 4)) -> Path:
    """``ct_train/ct_train_100N_image.nii.gz`` + ``..._label.nii.gz``."""
    for i in range(n):
        stem = Path(root, "ct_train", f"ct_train_{1001 + i}")
        save_nifti(np.full(shape, 100 + i, np.int16), Path(f"{stem}_image.nii.gz"))
        save_nifti(mmwhs_label(shape), Path(f"{stem}_label.nii.gz"))
    return Path(root)


def make_nnunet(root, n=2, shape=(8, 8, 4), channels=2, v1=False) -> Path:
    """nnU-Net raw ``DatasetXXX``: ``imagesTr/case_NNN_000C.nii.gz``, ``labelsTr/``, ``dataset.json``."""
    root = Path(root)
    for i in range(n):
        for c in range(channels):
            save_nifti(np.full(shape, 10 * c + i, np.float32), root / "imagesTr" / f"case_{i:03d}_{c:04d}.nii.gz")
        labels = np.zeros(shape, np.uint8)
        labels[2:5, 2:5, 1:3] = 1
        labels[3, 3, 2] = 2
        save_nifti(labels, root / "labelsTr" / f"case_{i:03d}.nii.gz")
    if v1:
        spec = {"modality": {str(c): f"MR{c}" for c in range(channels)},
                "labels": {"0": "background", "1": "liver", "2": "tumour"}, "numTraining": n}
    else:
        spec = {"channel_names": {str(c): f"MR{c}" for c in range(channels)},
                "labels": {"background": 0, "liver": 1, "tumour": 2}, "numTraining": n, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


def make_generic(root, n=3, shape=(16, 20), mask_folder="labels") -> Path:
    """``images/<stem>.png`` + ``labels/<stem>.png`` with class indices 0..2."""
    for i in range(n):
        save(rgb_image(shape, i), Path(root, "images", f"img{i}.png"))
        label = mask_of(i, shape).astype(np.uint8)
        label[:3] = 2
        save(label, Path(root, mask_folder, f"img{i}.png"))
    return Path(root)


BUSI_REPACKAGED_MASKS = {"benign (1)": [((5, 5), 3), ((14, 16), 4)], "benign (2)": [((10, 8), 5)],
                         "malignant (1)": [((10, 10), 6)], "normal (1)": []}


def make_busi_repackaged(root, shape=(20, 24), mask_folder="mask", mask_suffix="_mask") -> Path:
    """The Kaggle-style BUSI: ``<class>/images/<class> (n).png`` + ``<class>/mask/<class> (n)_mask.png``
    (and ``_mask_1.png`` for a second mask), disks of :data:`BUSI_REPACKAGED_MASKS`, an all-zero mask
    for the normal case. ``mask_suffix=""``: masks named like their images, the first disk only."""
    root = Path(root)
    for name, disks in BUSI_REPACKAGED_MASKS.items():
        cls = name.split(" ")[0]
        save(np.full(shape, 90, np.uint8), root / cls / "images" / f"{name}.png")
        masks = [disk(shape, centre, radius) for centre, radius in disks] or [np.zeros(shape, bool)]
        for k, mask in enumerate(masks if mask_suffix else masks[:1]):
            suffix = mask_suffix + (f"_{k}" if k else "")
            save(mask.astype(np.uint8) * 255, root / cls / mask_folder / f"{name}{suffix}.png")
    return root


def make_suffix_pairs(root, kind="volume", label_suffix="_label", image_suffix="_image",
                      ids=("liver_01", "liver_2", "liver_10")) -> Path:
    """A flat folder of ``<id><image_suffix>.nii.gz|.png`` + ``<id><label_suffix>.nii.gz|.png``:
    case ``i`` is :func:`ct_volume` ``(16, 12, 6)`` seed ``i`` (classes 0..2), or an RGB image with
    the 0/1 mask :func:`mask_of` ``(i, (16, 20))``."""
    root = Path(root)
    for i, case in enumerate(ids):
        if kind == "volume":
            hu, labels = ct_volume((16, 12, 6), i)
            save_nifti(hu, root / f"{case}{image_suffix}.nii.gz")
            save_nifti(labels, root / f"{case}{label_suffix}.nii.gz")
        else:
            save(rgb_image((16, 20), i), root / f"{case}{image_suffix}.png")
            save(mask_of(i, (16, 20)).astype(np.uint8), root / f"{case}{label_suffix}.png")
    return root


def tree_snapshot(root) -> dict:
    """Every path under ``root`` with its size and modification time, to prove nothing changed."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(root).rglob("*"))}
