"""Training data pipeline throughput: DataLoader with 2 workers, 256x256 output, augmentation on.

    PYTHONPATH=. .venv/bin/python -m pytest bench/bench_data.py

Each round is one epoch through a fresh DataLoader iterator (workers start with empty caches, as
in training), so decoding JPEG/PNG files and NIfTI volumes is part of what is timed.
Targets on a 2-core CPU: >= 50 images/s from JPEG/PNG, >= 20 slices/s from NIfTI volumes.
"""
from torch.utils.data import DataLoader

from fastseg.data import ImageDataset, VolumeSliceDataset, make_synthetic_2d, make_synthetic_ct

WORKERS = 2
BATCH = 8
SIZE = 256


def _throughput(benchmark, capsys, dataset, unit: str) -> None:
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=WORKERS)

    def epoch():
        for batch in loader:
            assert batch["image"].shape[-2:] == (SIZE, SIZE)

    benchmark.pedantic(epoch, rounds=3, iterations=1, warmup_rounds=1)
    if benchmark.disabled:  # --benchmark-disable: ran once as a smoke test, nothing timed
        return
    rate = len(dataset) / benchmark.stats.stats.mean
    benchmark.extra_info[f"{unit}_per_s"] = round(rate, 1)
    with capsys.disabled():
        print(f"\n{benchmark.name}: {rate:.1f} {unit}/s ({len(dataset)} per epoch, {WORKERS} workers, {SIZE}^2)")


def test_images_jpeg_png(benchmark, capsys, tmp_path):
    # Kvasir-sized RGB JPEG images with PNG masks, so both decoders and a real downscale run.
    root = make_synthetic_2d(tmp_path, n=64, size=(500, 600), image_format="jpg", mask_format="png")
    dataset = ImageDataset(root, size=SIZE, intensity="minmax", augment=True)
    _throughput(benchmark, capsys, dataset, "images")


def test_slices_nifti(benchmark, capsys, tmp_path):
    # CT-sized axial slices from .nii.gz volumes (decoded once per worker and volume per epoch).
    root = make_synthetic_ct(tmp_path, n=4, shape=(512, 512, 40))
    dataset = VolumeSliceDataset(root, size=SIZE, intensity="ct-liver", augment=True)
    _throughput(benchmark, capsys, dataset, "slices")

