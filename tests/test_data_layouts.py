"""Layout detection on small trees in each public dataset's real naming scheme, label mapping,
and every bad-data case: a clear DataError naming the file, or a report with skip_bad."""
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from data_helpers import (
    AFFINE, BUSI_REPACKAGED_MASKS, MMWHS_VALUES, ct_volume, disk, make_busi, make_busi_repackaged, make_generic,
    make_isic, make_kvasir, make_lits, make_mmwhs, make_nnunet, make_suffix_pairs, mask_of, mmwhs_label, rgb_image,
    save, save_nifti,
)
from fastseg.data import (
    LAYOUTS, Case, CaseIndex, DataError, LabelSpec, find_cases, probe_case, read, read_case, register_layout,
)


def test_kvasir_seg_jpeg_masks_are_thresholded(tmp_path):
    index = find_cases(make_kvasir(tmp_path))
    assert (index.layout, index.kind) == ("kvasir-seg", "image")
    assert index.case_ids == [f"cju{i}qkwl35piu0993" for i in range(3)]
    image, label = read_case(index.cases[1], index.labels)
    raw = read(index.cases[1].label[0]).array
    assert len(np.unique(raw)) > 2  # the JPEG really carries compression noise
    assert image.array.shape == (24, 32, 3)
    assert set(np.unique(label)) == {0, 1}
    assert (label != mask_of(1)).sum() <= 4  # only a few edge pixels may flip


def test_isic2018_pairs_inputs_with_segmentation_pngs(tmp_path):
    index = find_cases(make_isic(tmp_path))
    assert index.layout == "isic2018"
    assert index.case_ids == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000003", "ISIC_0000012"]
    case = index.cases[-1]
    assert case.image[0].parent.name == "ISIC2018_Task1-2_Validation_Input"
    assert case.label[0].name == "ISIC_0000012_segmentation.png"
    _, label = read_case(case, index.labels)
    assert np.array_equal(label, mask_of(12, (20, 30)))


def test_isic2018_unexpected_mask_value_names_the_file(tmp_path):
    make_isic(tmp_path)
    bad = tmp_path / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_0000001_segmentation.png"
    mask = mask_of(1, (20, 30)).astype(np.uint8) * 255
    mask[0, 0] = 128
    save(mask, bad)
    index = find_cases(tmp_path)
    with pytest.raises(DataError, match=re.escape(str(bad)) + r".*unexpected label values 128 \(expected 0, 255\).*ISIC_0000001"):
        read_case(index.cases[1], index.labels)


def test_busi_merges_all_masks_of_an_image(tmp_path):
    index = find_cases(make_busi(tmp_path))
    assert index.layout == "busi"
    assert index.case_ids == ["benign (1)", "malignant (1)", "normal (1)"]
    benign = index.cases[0]
    assert [p.name for p in benign.label] == ["benign (1)_mask.png", "benign (1)_mask_1.png"]
    _, label = read_case(benign, index.labels)
    assert np.array_equal(label, disk((20, 24), (5, 5), 3) | disk((20, 24), (14, 16), 4))
    _, rgb_label = read_case(index.cases[1], index.labels)  # an RGB mask
    assert np.array_equal(rgb_label, disk((20, 24), (10, 10), 6))
    _, empty = read_case(index.cases[2], index.labels)
    assert not empty.any()


def test_lits_pairs_volumes_across_batches_in_natural_order(tmp_path):
    index = find_cases(make_lits(tmp_path))
    assert (index.layout, index.kind) == ("lits", "volume")
    assert index.case_ids == ["volume-0", "volume-1", "volume-10"]  # test-volume-0 is not a training case
    image, label = read_case(index.cases[2], index.labels)
    hu, labels = ct_volume((16, 12, 6), 10)
    assert np.array_equal(image.array, hu) and np.array_equal(label, labels)
    np.testing.assert_allclose(image.affine, AFFINE, atol=1e-6)


def test_lits_unexpected_label_value(tmp_path):
    make_lits(tmp_path)
    hu, labels = ct_volume((16, 12, 6), 1)
    labels[0, 0, 0] = 7
    bad = save_nifti(labels, tmp_path / "Training Batch 2" / "segmentation-1.nii")
    index = find_cases(tmp_path)
    with pytest.raises(DataError, match=re.escape(str(bad)) + r": unexpected label values 7 \(expected 0, 1, 2\)"):
        read_case(index.cases[1], index.labels)


def test_mmwhs_label_values_map_to_classes_0_to_7(tmp_path):
    index = find_cases(make_mmwhs(tmp_path))
    assert (index.layout, index.kind) == ("mmwhs", "volume")
    assert index.case_ids == ["ct_train_1001", "ct_train_1002"]
    assert index.labels.values == MMWHS_VALUES
    _, label = read_case(index.cases[0], index.labels)
    expected = np.zeros((10, 8, 4), np.uint8)
    for c in range(8):
        expected[c] = c
    assert np.array_equal(label, expected)
    assert index.labels.to_classes(np.array(MMWHS_VALUES), "x.nii.gz").tolist() == list(range(8))


def test_mmwhs_value_outside_the_list_is_an_error(tmp_path):
    make_mmwhs(tmp_path, n=1)
    label = mmwhs_label()
    label[9, 0, 0] = 421
    bad = save_nifti(label, tmp_path / "ct_train" / "ct_train_1001_label.nii.gz")
    index = find_cases(tmp_path)
    with pytest.raises(DataError, match=re.escape(str(bad)) + r": unexpected label values 421"):
        read_case(index.cases[0], index.labels)


@pytest.mark.parametrize("v1", [False, True])
def test_nnunet_raw_channels_and_labels_from_dataset_json(tmp_path, v1):
    index = find_cases(make_nnunet(tmp_path, v1=v1))
    assert (index.layout, index.kind) == ("nnunet", "volume")
    assert index.case_ids == ["case_000", "case_001"]
    assert [p.name for p in index.cases[1].image] == ["case_001_0000.nii.gz", "case_001_0001.nii.gz"]
    assert index.labels.values == (0, 1, 2)
    image, label = read_case(index.cases[1], index.labels)
    assert image.array.shape == (8, 8, 4, 2)
    assert np.array_equal(image.array[0, 0, 0], [1, 11])
    assert label[3, 3, 2] == 2 and label.sum() == 3 * 3 * 2 + 1


def test_nnunet_missing_channel_and_bad_json(tmp_path):
    make_nnunet(tmp_path)
    (tmp_path / "imagesTr" / "case_001_0001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"case_001_0000\.nii\.gz: missing channel file\(s\) \[1\] of 2"):
        find_cases(tmp_path)
    assert find_cases(tmp_path, skip_bad=True).case_ids == ["case_000"]
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset\.json: invalid nnU-Net dataset\.json"):
        find_cases(tmp_path)


def test_nnunet_2d_png_dataset_is_an_image_dataset(tmp_path):
    save(rgb_image((8, 9))[..., 0], tmp_path / "imagesTr" / "a_0000.png")
    save(np.eye(8, 9, dtype=np.uint8), tmp_path / "labelsTr" / "a.png")
    (tmp_path / "dataset.json").write_text('{"channel_names": {"0": "x"}, "labels": {"background": 0, "fg": 1}, '
                                           '"file_ending": ".png"}')
    index = find_cases(tmp_path)
    assert (index.layout, index.kind, index.case_ids) == ("nnunet", "image", ["a"])
    assert np.array_equal(read_case(index.cases[0], index.labels)[1], np.eye(8, 9))


@pytest.mark.parametrize("mask_folder", ["masks", "labels"])
def test_generic_pairs_by_stem_with_class_indices(tmp_path, mask_folder):
    index = find_cases(make_generic(tmp_path, mask_folder=mask_folder))
    assert (index.layout, index.kind) == ("generic", "image")
    assert index.case_ids == ["img0", "img1", "img2"]
    _, label = read_case(index.cases[2], index.labels)
    assert set(np.unique(label)) == {0, 1, 2}


def test_generic_volumes_and_label_value_override(tmp_path):
    save_nifti(np.zeros((4, 4, 2), np.int16), tmp_path / "images" / "p1.nii.gz")
    save_nifti(np.full((4, 4, 2), 255, np.uint8), tmp_path / "labels" / "p1.nii.gz")
    index = find_cases(tmp_path, label_values=[0, 255])
    assert index.kind == "volume" and index.labels == LabelSpec((0, 255))
    assert read_case(index.cases[0], index.labels)[1].max() == 1


def test_forced_layout_and_unknown_layout(tmp_path):
    make_kvasir(tmp_path)
    assert find_cases(tmp_path, layout="generic").layout == "generic"
    with pytest.raises(DataError, match="not in the lits layout"):
        find_cases(tmp_path, layout="lits")
    with pytest.raises(ValueError, match="unknown layout 'nope'"):
        find_cases(tmp_path, layout="nope")


def test_registered_layout_is_detected(tmp_path):
    save(rgb_image((5, 5)), tmp_path / "scans" / "a.png")

    @register_layout("test-scans-only")
    def scans_only(root: Path):
        if not (root / "scans").is_dir():
            return None
        return CaseIndex("test-scans-only", "image", root, [Case("a", (root / "scans" / "a.png",))])

    try:
        assert find_cases(tmp_path).layout == "test-scans-only"
    finally:
        del LAYOUTS["test-scans-only"]


# --- repackagings and folders people make -----------------------------------------------------


@pytest.mark.parametrize("mask_folder, mask_suffix", [("mask", "_mask"), ("masks", "_mask"), ("Masks", "")])
def test_busi_repackaged_with_images_and_mask_folders(tmp_path, mask_folder, mask_suffix):
    index = find_cases(make_busi_repackaged(tmp_path, mask_folder=mask_folder, mask_suffix=mask_suffix))
    assert (index.layout, index.kind) == ("busi", "image")
    assert index.case_ids == list(BUSI_REPACKAGED_MASKS)
    assert index.cases[0].image[0] == tmp_path / "benign" / "images" / "benign (1).png"
    for case in index.cases:
        disks = BUSI_REPACKAGED_MASKS[case.case_id][:None if mask_suffix else 1]
        assert len(case.label) == max(len(disks), 1)
        expected = np.zeros((20, 24), bool)
        for centre, radius in disks:
            expected |= disk((20, 24), centre, radius)
        assert np.array_equal(read_case(case, index.labels)[1], expected)


@pytest.mark.parametrize("label_suffix", ["_label", "_seg", "_mask", "-Seg"])
def test_flat_folder_of_volume_pairs_named_by_suffix(tmp_path, label_suffix):
    index = find_cases(make_suffix_pairs(tmp_path, "volume", label_suffix))
    assert (index.layout, index.kind) == ("suffix-pairs", "volume")
    assert index.case_ids == ["liver_01", "liver_2", "liver_10"]
    assert index.labels == LabelSpec()
    image, label = read_case(index.cases[2], index.labels)
    hu, labels = ct_volume((16, 12, 6), 2)
    assert np.array_equal(image.array, hu) and np.array_equal(label, labels)
    np.testing.assert_allclose(image.affine, AFFINE, atol=1e-6)


@pytest.mark.parametrize("image_suffix, label_suffix", [("", "_mask"), ("_img", "_gt"), ("_image", "_segmentation")])
def test_flat_folder_of_image_pairs_named_by_suffix(tmp_path, image_suffix, label_suffix):
    index = find_cases(make_suffix_pairs(tmp_path, "image", label_suffix, image_suffix, ids=("a 1", "a 2")))
    assert (index.layout, index.kind, index.case_ids) == ("suffix-pairs", "image", ["a 1", "a 2"])
    image, label = read_case(index.cases[1], index.labels)
    assert image.array.shape == (16, 20, 3) and np.array_equal(label, mask_of(1, (16, 20)))


def test_suffix_pairs_in_case_folders_pair_within_each_folder(tmp_path):
    for case in ("p1", "p2"):
        make_suffix_pairs(tmp_path / case, "volume", ids=(case,))
    make_suffix_pairs(tmp_path / "extra", "volume", ids=("p1",))  # same name, another folder: another case
    index = find_cases(tmp_path)
    assert index.layout == "suffix-pairs" and index.case_ids == ["extra/p1", "p1/p1", "p2/p2"]
    assert index.cases[0].label == (tmp_path / "extra" / "p1_label.nii.gz",)


def test_images_and_masks_folders_with_suffixed_mask_names(tmp_path):
    for i in range(3):
        save(rgb_image((16, 20), i), tmp_path / "images" / f"polyp {i}.png")
        save(mask_of(i, (16, 20)).astype(np.uint8), tmp_path / "masks" / f"polyp {i}_mask.png")
    index = find_cases(tmp_path)
    assert (index.layout, index.case_ids) == ("generic", ["polyp 0", "polyp 1", "polyp 2"])
    assert np.array_equal(read_case(index.cases[2], index.labels)[1], mask_of(2, (16, 20)))


@pytest.mark.parametrize("maker, wrapper, layout", [(make_kvasir, "Kvasir-SEG", "kvasir-seg"),
                                                     (make_busi, "Dataset_BUSI_with_GT", "busi")])
def test_archive_unpacked_into_one_folder(tmp_path, maker, wrapper, layout):
    maker(tmp_path / wrapper)
    (tmp_path / "__MACOSX").mkdir()
    index = find_cases(tmp_path)
    assert (index.layout, index.root, len(index.cases)) == (layout, tmp_path / wrapper, 3)


def test_folder_with_nothing_usable_lists_the_layouts_tried(tmp_path):
    save(rgb_image((5, 5)), tmp_path / "photos" / "a.png")
    save(rgb_image((5, 5)), tmp_path / "scans" / "b.png")
    with pytest.raises(DataError) as info:
        find_cases(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path}: folder matches no known layout; tried:\n")
    for name in LAYOUTS:
        assert f"\n  {name}: " in message
    assert "images/<id>.jpg with masks/<id>.jpg" in message  # kvasir-seg's expectation
    assert "<case>_mask.<ext>" in message  # suffix-pairs'
    with pytest.raises(DataError, match="not in the busi layout: expected benign|malignant|normal/"):
        find_cases(tmp_path, layout="busi")


def test_recognised_folder_without_cases_says_what_it_expected(tmp_path):
    save(np.zeros((5, 5), np.uint8), tmp_path / "benign" / "notes" / "a.png")
    save(np.zeros((5, 5), np.uint8), tmp_path / "other.png")
    with pytest.raises(DataError, match=r"no usable cases in this busi folder: expected benign\|malignant\|normal/"):
        find_cases(tmp_path)


# --- bad data ---------------------------------------------------------------------------------


def test_empty_folder_and_not_a_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=re.escape(str(tmp_path)) + ": no image or NIfTI files"):
        find_cases(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        find_cases(tmp_path / "missing")


def test_folder_of_unknown_layout(tmp_path):
    save(rgb_image((5, 5)), tmp_path / "photos" / "a.png")
    with pytest.raises(DataError, match="matches no known layout"):
        find_cases(tmp_path)


def test_image_without_mask_names_the_file_or_is_skipped(tmp_path):
    make_kvasir(tmp_path)
    orphan = save(rgb_image((24, 32)), tmp_path / "images" / "lonely.jpg")
    with pytest.raises(DataError, match=re.escape(str(orphan)) + r": image has no mask \[case lonely\]"):
        find_cases(tmp_path)
    index = find_cases(tmp_path, skip_bad=True)
    assert len(index.cases) == 3
    assert [(e.path, e.case_id, e.problem) for e in index.skipped] == [(orphan, "lonely", "image has no mask")]
    restored = pickle.loads(pickle.dumps(index.skipped[0]))  # as it crosses a DataLoader worker
    assert (restored.path, restored.case_id, str(restored)) == (orphan, "lonely", str(index.skipped[0]))


def test_mask_without_image_and_duplicate_stems(tmp_path):
    make_generic(tmp_path, mask_folder="masks")
    stray = save(np.zeros((16, 20), np.uint8), tmp_path / "masks" / "ghost.png")
    twin = save(rgb_image((16, 20)), tmp_path / "images" / "img1.jpg")
    index = find_cases(tmp_path, skip_bad=True)
    problems = {(e.path.name, e.problem) for e in index.skipped}
    assert problems == {(stray.name, "mask has no image"), (twin.name, "2 image files for case 'img1': img1.jpg, img1.png")}
    assert index.case_ids == ["img0", "img2"]  # an ambiguous case is not guessed
    with pytest.raises(DataError, match="and 1 more problems"):
        find_cases(tmp_path)


def test_mismatched_image_and_mask_shapes(tmp_path):
    make_kvasir(tmp_path)
    bad = save(np.zeros((20, 32), np.uint8), tmp_path / "masks" / "cju1qkwl35piu0993.jpg")
    index = find_cases(tmp_path)
    pattern = re.escape(str(bad)) + r": label shape \(20, 32\) differs from image shape \(24, 32\)"
    with pytest.raises(DataError, match=pattern):
        probe_case(index.cases[1])
    with pytest.raises(DataError, match=pattern):
        read_case(index.cases[1], index.labels)


def test_mismatched_affines(tmp_path):
    make_lits(tmp_path, ids=(0,))
    _, labels = ct_volume((16, 12, 6), 0)
    shifted = AFFINE.copy()
    shifted[0, 3] += 5.0
    bad = save_nifti(labels, tmp_path / "Training Batch 1" / "segmentation-0.nii", affine=shifted)
    index = find_cases(tmp_path)
    with pytest.raises(DataError, match=re.escape(str(bad)) + ": label affine differs from the image's"):
        probe_case(index.cases[0])
    # Float32 rounding in a header is not a mismatch.
    save_nifti(labels, bad, affine=AFFINE + 1e-6)
    probe_case(index.cases[0])


def test_label_spec_rejects_non_integer_and_negative_values():
    with pytest.raises(DataError, match="x.nii: label values are not integers"):
        LabelSpec().to_classes(np.array([0.0, 0.5]), "x.nii")
    with pytest.raises(DataError, match="negative label values -1"):
        LabelSpec().to_classes(np.array([0, -1]), "x.nii")
    assert LabelSpec((0, 1)).to_classes(np.array([0.0, 1.0], np.float32), "x.nii").tolist() == [0, 1]
    assert LabelSpec(threshold=127).to_classes(np.array([0, 127, 128, 255]), "m.png").tolist() == [0, 0, 1, 1]
