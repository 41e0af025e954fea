"""``fastseg data inspect PATH``: the report, its JSON form, exit codes, and that the data folder
is only ever read."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_helpers import (
    ct_volume, make_busi, make_busi_repackaged, make_kvasir, make_lits, make_suffix_pairs, rgb_image, save, save_nifti,
    tree_snapshot,
)
from fastseg.cli import main
from fastseg.data import (
    LAYOUTS, ImageDataset, VolumeSliceDataset, create_dataset, find_cases, inspect_dataset, make_splits,
)

REPO = Path(__file__).resolve().parents[1]


def test_inspect_volumes_reports_layout_shapes_spacing_and_classes(tmp_path, capsys):
    root = make_lits(tmp_path, ids=(0, 1))
    assert main(["data", "inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert "layout:  lits (volume files)" in out
    assert "cases:   2 paired, 2 readable" in out
    assert "shapes:  16x12x6 (2)" in out
    assert "spacing: min [0.75, 0.75, 2.5]" in out
    assert "labels:  raw 0->0, 1->1, 2->2" in out
    assert "classes: 0 (in 2 cases), 1 (in 2 cases), 2 (in 2 cases)" in out
    assert "problems: 0" in out and "usable:  yes" in out


def test_inspect_json_lists_problems_by_file(tmp_path, capsys):
    root = make_busi(tmp_path)
    orphan = save(np.zeros((20, 24), np.uint8), root / "benign" / "benign (2).png")
    bad_mask = save(np.zeros((10, 10), np.uint8), root / "malignant" / "malignant (1)_mask.png")
    assert main(["data", "inspect", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "busi" and report["cases_found"] == 3 and report["cases_ok"] == 2
    assert report["shapes"] == {"20x24": 2} and report["channels"] == {"1": 2}
    assert report["classes"] == {"0": 2, "1": 1}
    assert len(report["problems"]) == 2
    assert any(str(orphan) in p and "image has no mask" in p for p in report["problems"])
    assert any(str(bad_mask) in p and "shape (10, 10) differs" in p for p in report["problems"])


def test_inspect_unusable_folders_exit_nonzero(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path}: no image or NIfTI files" in out and "usable:  no" in out
    corrupt = tmp_path / "images" / "a.png"
    save(np.zeros((4, 4), np.uint8), tmp_path / "masks" / "a.png")
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"\x89PNG broken")
    assert main(["data", "inspect", str(tmp_path)]) == 1
    assert f"{corrupt}: cannot read .png" in capsys.readouterr().out


def test_inspect_forced_layout_and_label_values(tmp_path):
    root = tmp_path / "hearts"
    save_nifti(np.zeros((4, 4, 2), np.int16), root / "images" / "h1.nii.gz")
    save_nifti(np.full((4, 4, 2), 205, np.int16), root / "labels" / "h1.nii.gz")
    report = inspect_dataset(root, layout="generic", label_values=[0, 205])
    assert report.classes == {1: 1} and report.label_mapping == "raw 0->0, 205->1"
    assert inspect_dataset(root, label_values=[0, 420]).cases_ok == 0


def test_nothing_is_written_into_the_data_folder(tmp_path):
    kvasir, lits = make_kvasir(tmp_path / "kvasir"), make_lits(tmp_path / "lits", ids=(0, 1))
    hu, labels = ct_volume((16, 12, 6), 2)
    save_nifti(hu, lits / "volume-2.nii.gz")
    save_nifti(labels, lits / "segmentation-2.nii.gz")
    before = tree_snapshot(tmp_path)
    for root, dataset_type in ((kvasir, ImageDataset), (lits, VolumeSliceDataset)):
        inspect_dataset(root)
        dataset = dataset_type(root, size=8, augment=True, skip_bad=True)
        [dataset[i] for i in range(len(dataset))]
        make_splits(find_cases(root).case_ids)
    assert tree_snapshot(tmp_path) == before


# (folder maker, layout, kind, cases, classes line, samples, samples with foreground): the volumes
# have foreground on 2 of their 6 slices, BUSI's normal case has an empty mask.
@pytest.mark.parametrize("make, layout, kind, n, classes, n_samples, n_foreground", [
    (lambda root: make_suffix_pairs(root, "volume", "_seg"), "suffix-pairs", "volume", 3,
     "0 (in 3 cases), 1 (in 3 cases), 2 (in 3 cases)", 18, 6),
    (lambda root: make_suffix_pairs(root, "image", "_mask", ""), "suffix-pairs", "image", 3,
     "0 (in 3 cases), 1 (in 3 cases)", 3, 3),
    (make_busi_repackaged, "busi", "image", 4, "0 (in 4 cases), 1 (in 3 cases)", 4, 3),
])
def test_repackaged_folders_inspected_and_loaded_read_only(tmp_path, capsys, make, layout, kind, n, classes,
                                                           n_samples, n_foreground):
    root = make(tmp_path / "data")
    before = tree_snapshot(tmp_path)
    assert main(["data", "inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"layout:  {layout} ({kind} files)" in out
    assert f"cases:   {n} paired, {n} readable" in out
    assert f"classes: {classes}" in out and "problems: 0" in out
    dataset = create_dataset(root, size=8, skip_bad=True)
    samples = [dataset[i] for i in range(len(dataset))]
    assert len(dataset.cases) == n and len(samples) == n_samples
    assert all(set(s["mask"].unique().tolist()) <= {0.0, 1.0} for s in samples)
    assert sum(s["mask"].sum().item() > 0 for s in samples) == n_foreground
    assert tree_snapshot(tmp_path) == before


def test_inspect_folder_without_a_layout_lists_what_each_expected(tmp_path, capsys):
    for folder in ("photos", "scans"):
        save(rgb_image((5, 5)), tmp_path / folder / "a.png")
    before = tree_snapshot(tmp_path)
    assert main(["data", "inspect", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "folder matches no known layout; tried:" in out and "usable:  no" in out
    assert all(f"  {name}: " in out for name in LAYOUTS)
    assert tree_snapshot(tmp_path) == before


def test_layout_and_label_value_arguments_are_checked(tmp_path, capsys):
    for argv, message in ((["--layout", "nope"], "invalid choice: 'nope' (choose from 'nnunet', 'isic2018'"),
                          (["--label-values", "0,x"], "expected integers separated by commas")):
        with pytest.raises(SystemExit) as exit:
            main(["data", "inspect", str(tmp_path), *argv])
        assert exit.value.code == 2 and message in capsys.readouterr().err
    assert main(["data", "inspect", str(make_busi(tmp_path)), "--layout", "busi"]) == 0


def test_module_entry_point(tmp_path):
    root = make_kvasir(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "fastseg", "data", "inspect", str(root)], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "kvasir-seg (image files)" in result.stdout and "3 paired, 3 readable" in result.stdout
