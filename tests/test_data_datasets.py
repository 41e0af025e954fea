"""ImageDataset and VolumeSliceDataset: sample contents, binary and multi-class targets,
foreground-aware sampling, the volume cache, DataLoader workers, skipping bad cases."""
import pickle
import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import fastseg.data.datasets as datasets_module
from data_helpers import ct_volume, make_busi, make_generic, make_kvasir, make_lits, make_mmwhs, mask_of, save, save_nifti
from fastseg.data import DataError, ImageDataset, RandomAugment, VolumeSliceDataset, create_dataset, restore_size


def test_image_sample_shapes_dtypes_and_binary_mask(tmp_path):
    dataset = ImageDataset(make_kvasir(tmp_path), size=(16, 16))
    assert len(dataset) == 3
    sample = dataset[1]
    assert sample["image"].shape == (3, 16, 16) and sample["image"].dtype == torch.float32
    assert sample["image"].min().item() == 0.0 and sample["image"].max().item() == 1.0  # per-image min-max
    assert sample["mask"].shape == (1, 16, 16) and sample["mask"].dtype == torch.float32
    assert set(sample["mask"].unique().tolist()) == {0.0, 1.0}
    assert sample["case_id"] == "cju1qkwl35piu0993"
    assert sample["original_size"].tolist() == [24, 32]


def test_image_dataset_at_original_size_matches_the_mask_file(tmp_path):
    dataset = ImageDataset(make_kvasir(tmp_path), size=None, channels=1, intensity=None)
    sample = dataset[2]
    assert sample["image"].shape == (1, 24, 32)
    assert (sample["mask"][0].numpy().astype(bool) != mask_of(2)).sum() <= 4


def test_multiclass_targets_and_imagenet_on_gray(tmp_path):
    dataset = create_dataset(make_generic(tmp_path), size=None, binary=False, channels=3, intensity="imagenet")
    sample = dataset[0]
    assert sample["mask"].dtype == torch.int64 and sample["mask"].shape == (16, 20)
    assert set(sample["mask"].unique().tolist()) == {0, 1, 2}
    assert sample["image"].shape == (3, 16, 20)


def test_busi_gray_to_three_channels(tmp_path):
    dataset = ImageDataset(make_busi(tmp_path), size=8, channels=3, intensity="imagenet")
    assert [dataset[i]["image"].shape for i in range(3)] == [(3, 8, 8)] * 3
    assert dataset[2]["mask"].sum().item() == 0  # the normal case


def test_slices_cover_every_slice_with_foreground_flags(tmp_path):
    dataset = VolumeSliceDataset(make_lits(tmp_path, ids=(0, 1)), size=(8, 8), intensity="ct-liver")
    assert len(dataset) == 12
    assert dataset.foreground.tolist() == [False, False, True, True, False, False] * 2
    sample = dataset[9]
    assert sample["case_id"] == "volume-1" and sample["slice_index"].item() == 3
    assert sample["image"].shape == (1, 8, 8) and sample["original_size"].tolist() == [16, 12]
    assert sample["spacing"].tolist() == pytest.approx([0.75, 0.75])
    assert sample["mask"].sum() > 0


def test_slice_content_matches_the_volume(tmp_path):
    dataset = VolumeSliceDataset(make_lits(tmp_path, ids=(0,)), size=None, intensity=None, binary=False)
    hu, labels = ct_volume((16, 12, 6), 0)
    sample = dataset[3]
    assert torch.equal(sample["image"][0], torch.from_numpy(hu[:, :, 3].astype(np.float32)))
    assert torch.equal(sample["mask"], torch.from_numpy(labels[:, :, 3].astype(np.int64)))


def test_multiclass_mmwhs_slices_and_axis(tmp_path):
    dataset = VolumeSliceDataset(make_mmwhs(tmp_path, n=1), size=None, binary=False, axis=0)
    assert len(dataset) == 10
    assert [dataset[c]["mask"].unique().tolist() for c in range(8)] == [[c] for c in range(8)]
    assert dataset[3]["original_size"].tolist() == [8, 4]


def test_sampler_draws_the_requested_foreground_fraction(tmp_path):
    dataset = VolumeSliceDataset(make_lits(tmp_path, ids=(0, 1)), size=(8, 8))
    sampler = dataset.sampler(0.8, num_samples=4000, generator=torch.Generator().manual_seed(0))
    drawn = np.fromiter(sampler, dtype=np.int64)
    assert len(drawn) == len(sampler) == 4000
    assert dataset.foreground[drawn].mean() == pytest.approx(0.8, abs=0.03)
    epoch = list(dataset.sampler(generator=torch.Generator().manual_seed(0)))
    assert sorted(epoch) == list(range(12)) and epoch != sorted(epoch)


@pytest.fixture
def opened(monkeypatch):
    """Names of the volume files the datasets open (decode), in order."""
    names = []
    open_volume = datasets_module.open_volume

    def counting_open(path):
        names.append(path.name)
        return open_volume(path)

    monkeypatch.setattr(datasets_module, "open_volume", counting_open)
    return names


def test_block_sampler_keeps_reads_within_the_cache(tmp_path, opened):
    dataset = VolumeSliceDataset(make_lits(tmp_path), size=(8, 8), cache_size=2)  # one case's two files
    order = list(dataset.sampler(volumes_per_block=1, generator=torch.Generator().manual_seed(1)))
    cases = [dataset[i]["case_id"] for i in order]
    assert sorted(order) == list(range(18))
    assert sum(a != b for a, b in zip(cases, cases[1:])) == 2  # one visit per volume
    assert len(opened) == 6  # each volume and label decoded once
    weighted = dataset.sampler(0.5, volumes_per_block=1, num_samples=50, generator=torch.Generator().manual_seed(1))
    drawn_cases = [dataset._locations[i, 0] for i in weighted]
    assert len(drawn_cases) == 50 and sum(a != b for a, b in zip(drawn_cases, drawn_cases[1:])) <= 2


def test_volume_cache_reads_each_volume_once(tmp_path, opened):
    dataset = VolumeSliceDataset(make_lits(tmp_path, ids=(0, 1)), size=(8, 8), cache_size=4)
    for i in range(len(dataset)):
        dataset[i]
    assert sorted(opened) == ["segmentation-0.nii", "segmentation-1.nii", "volume-0.nii", "volume-1.nii"]
    # A pickled copy (what a spawned worker gets) starts with an empty cache.
    assert len(dataset._cache) == 4 and len(pickle.loads(pickle.dumps(dataset))._cache) == 0
    # With room for one volume, alternating between cases reopens them.
    dataset.cache_size = 1
    dataset._cache.clear()
    opened.clear()
    for i in (0, 6, 0, 6):
        dataset[i]
    assert len(opened) == 8


def test_dataloader_with_two_workers(tmp_path):
    dataset = VolumeSliceDataset(make_lits(tmp_path / "ct", ids=(0, 1)), size=(8, 8), augment=True)
    seen = [(case, int(k)) for batch in DataLoader(dataset, batch_size=4, shuffle=True, num_workers=2)
            for case, k in zip(batch["case_id"], batch["slice_index"])]
    assert sorted(seen) == [(f"volume-{v}", k) for v in (0, 1) for k in range(6)]
    images = ImageDataset(make_kvasir(tmp_path / "kvasir"), size=(16, 16), augment=RandomAugment(affine=True))
    batches = list(DataLoader(images, batch_size=2, num_workers=2))
    assert [b["image"].shape[0] for b in batches] == [2, 1]
    assert batches[0]["original_size"].tolist() == [[24, 32], [24, 32]]


def test_prediction_restores_to_the_original_size(tmp_path):
    sample = ImageDataset(make_kvasir(tmp_path), size=(16, 16))[0]
    logits = torch.randn(1, 16, 16)
    assert restore_size(logits, sample["original_size"]).shape == (1, 24, 32)


def test_case_ids_select_a_split(tmp_path):
    root = make_lits(tmp_path)
    dataset = VolumeSliceDataset(root, case_ids=["volume-10"], size=8)
    assert {dataset[i]["case_id"] for i in range(len(dataset))} == {"volume-10"}
    with pytest.raises(DataError, match="1 case ids not in this dataset"):
        VolumeSliceDataset(root, case_ids=["volume-5"])


def test_wrong_dataset_kind_is_explained(tmp_path):
    with pytest.raises(DataError, match="holds volume files: use VolumeSliceDataset"):
        ImageDataset(make_lits(tmp_path))


def test_corrupt_image_raises_when_read_or_is_skipped_with_a_report(tmp_path):
    root = make_kvasir(tmp_path)
    bad = root / "images" / "cju1qkwl35piu0993.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) * 9 // 10])  # the header survives, the pixels do not
    dataset = ImageDataset(root, size=8)
    with pytest.raises(DataError, match=re.escape(str(bad)) + r".*\[case cju1qkwl35piu0993\]"):
        dataset[1]
    with pytest.warns(UserWarning, match="skipped 1 bad cases"):
        dataset = ImageDataset(root, size=8, skip_bad=True)
    assert len(dataset) == 2 and [e.path for e in dataset.skipped] == [bad]
    assert "2 cases used, 1 skipped" in dataset.report() and str(bad) in dataset.report()


def test_bad_volumes_and_labels_are_found_at_construction(tmp_path):
    root = make_lits(tmp_path, ids=(0, 1, 2))
    _, labels = ct_volume((16, 12, 6), 1)
    labels[0, 0, 0] = 9
    bad_label = save_nifti(labels, root / "Training Batch 2" / "segmentation-1.nii")
    bad_volume = save_nifti(np.zeros((16, 12, 6), np.float32), root / "Training Batch 1" / "volume-2.nii.gz")
    (root / "Training Batch 1" / "volume-2.nii").unlink()
    bad_volume.write_bytes(bad_volume.read_bytes()[:60])
    with pytest.raises(DataError, match=re.escape(str(bad_label)) + ": unexpected label values 9"):
        VolumeSliceDataset(root)
    with pytest.warns(UserWarning):
        dataset = VolumeSliceDataset(root, skip_bad=True, size=8)
    assert {e.case_id for e in dataset.skipped} == {"volume-1", "volume-2"}
    assert len(dataset) == 6


def test_mismatched_slice_grid_is_found_at_construction(tmp_path):
    root = make_lits(tmp_path, ids=(0,))
    save_nifti(np.zeros((16, 12, 5), np.uint8), root / "Training Batch 1" / "segmentation-0.nii")
    with pytest.raises(DataError, match=r"segmentation-0\.nii: label shape \(16, 12, 5\) differs"):
        VolumeSliceDataset(root)


def test_image_without_mask_with_skip_bad(tmp_path):
    root = make_kvasir(tmp_path)
    save(np.zeros((24, 32, 3), np.uint8), root / "images" / "orphan.jpg")
    with pytest.raises(DataError, match="orphan.jpg: image has no mask"):
        ImageDataset(root)
    with pytest.warns(UserWarning):
        dataset = ImageDataset(root, skip_bad=True)
    assert len(dataset) == 3 and dataset.skipped[0].case_id == "orphan"
