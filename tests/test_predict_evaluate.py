"""Predictor (preprocessing, pad/crop, resize back, flips, volumes slice by slice, label values)
and evaluate (per-case metrics on real files) with a model whose answer is known: it marks the
pixels brighter than half the range, and the data's truth is exactly those pixels."""
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from fastseg.data import write_image
from fastseg.engine.evaluate import evaluate, format_results, write_csv
from fastseg.engine.metrics import dice, hd95
from fastseg.engine.predict import Predictor


class Threshold(nn.Module):
    """Logits 40·(x₀ - 0.5) (binary), or with ``classes=3`` three classes split at 0.25 and 0.75. Rejects sizes that are not multiples of 16 as the
    models do, and records the input sizes it saw."""

    input_multiple = 16
    in_channels = 1

    def __init__(self, classes=1):
        super().__init__()
        self.classes, self.seen = classes, []

    def forward(self, x):
        assert x.shape[-2] % 16 == 0 and x.shape[-1] % 16 == 0, x.shape
        self.seen.append(tuple(x.shape))
        v = x[:, :1]
        if self.classes == 1:
            return 40 * (v - 0.5)
        classes = (v[:, 0] > 0.25).long() + (v[:, 0] > 0.75).long()
        return 10.0 * torch.nn.functional.one_hot(classes, 3).permute(0, 3, 1, 2)


def blobs(shape, seed):
    """Smooth random values in [0, 1] with bright regions (no pixel within 1e-3 of 0.5)."""
    g = np.random.default_rng(seed)
    v = g.random(shape)
    for axis in range(len(shape)):
        v = (v + np.roll(v, 1, axis) + np.roll(v, -1, axis)) / 3
    v = (v - v.min()) / (v.max() - v.min())
    return np.where(np.abs(v - 0.5) < 1e-3, 0.6, v)


def test_image_at_its_own_size_is_padded_and_cropped_back():
    array = (blobs((37, 50), 0) * 255).round().astype(np.uint8)
    model = Threshold()
    pred = Predictor(model, {"size": None, "kind": "image"}).predict_image(array)
    assert pred.shape == (37, 50) and pred.dtype == np.uint8
    assert model.seen == [(1, 1, 48, 64)]
    np.testing.assert_array_equal(pred, (array / 255 > 0.5).astype(np.uint8))


def test_resized_prediction_comes_back_at_the_input_size():
    yy, xx = np.mgrid[:64, :96]
    array = (255 * np.clip(1 - np.hypot(yy - 30, xx - 40) / 50, 0, 1)).round().astype(np.uint8)
    model = Threshold()
    pred = Predictor(model, {"size": [32, 48], "kind": "image"}).predict_image(array)
    assert model.seen == [(1, 1, 32, 48)] and pred.shape == (64, 96)
    # a half-resolution prediction resized back: a disk of radius 25, right but for its rim
    assert dice(pred, array / 255 > 0.5) > 0.97


def test_rgb_input_to_a_gray_model_and_flip_tta():
    gray = (blobs((32, 32), 2) * 255).round().astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    model = Threshold()
    pred = Predictor(model, {"size": None}, tta=True).predict_image(rgb)
    assert len(model.seen) == 4  # the image and its three flips
    np.testing.assert_array_equal(pred, gray / 255 > 0.5)


def test_volume_slice_by_slice_along_the_training_axis():
    volume = blobs((20, 24, 7), 3).astype(np.float32)
    for axis in (0, 2):
        model = Threshold()
        pred = Predictor(model, {"size": None, "kind": "volume", "axis": axis}, batch_size=3).predict_volume(volume)
        assert pred.shape == volume.shape
        assert len(model.seen) == math.ceil(volume.shape[axis] / 3)
        np.testing.assert_array_equal(pred, volume > 0.5)


def test_multi_class_and_label_values():
    array = blobs((16, 32), 4).astype(np.float32)
    p = Predictor(Threshold(classes=3), {"size": None, "kind": "volume"}, {"values": [0, 100, 200]})
    classes = p.predict_image(array)
    expected = np.where(array < 0.25, 0, np.where(array > 0.75, 2, 1))
    np.testing.assert_array_equal(classes, expected)
    assert set(np.unique(p.label_values(classes))) <= {0, 100, 200}
    binary = Predictor(Threshold(), {"size": None})
    assert set(np.unique(binary.label_values(np.array([[0, 1]]), visible=True))) == {0, 255}


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        Predictor(Threshold(), {}, batch_size=0)


def test_evaluate_images_and_volumes(tmp_path):
    # 2-D pairs named by suffix, one case with a wrong prediction in a known place
    images = tmp_path / "images"
    (images / "images").mkdir(parents=True)
    (images / "masks").mkdir()
    for i in range(3):
        array = (blobs((40, 48), 10 + i) * 255).round().astype(np.uint8)
        truth = array > 127
        write_image(images / "images" / f"case{i}.png", array)
        write_image(images / "masks" / f"case{i}.png", truth)
    rows = evaluate(Predictor(Threshold(), {"size": None}), images, layout="generic", progress=False)
    assert [r["case_id"] for r in rows] == ["case0", "case1", "case2"]
    assert all(r["dice"] == 1.0 and r["hd95"] == 0.0 for r in rows), rows

    # a NIfTI volume with anisotropic voxels: the truth shifted by one voxel along z, so every
    # surface distance is a multiple of the 2.5 mm slice spacing, and the Dice is known
    vols = tmp_path / "vols"
    (vols / "imagesTr").mkdir(parents=True)
    (vols / "labelsTr").mkdir()
    (vols / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                   "labels": {"background": 0, "tumour": 1}}))
    volume = blobs((24, 24, 10), 20).astype(np.float32)
    truth = np.roll(volume > 0.5, 1, axis=2).astype(np.uint8)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(volume, affine), vols / "imagesTr" / "v_0000.nii.gz")
    nib.save(nib.Nifti1Image(truth, affine), vols / "labelsTr" / "v.nii.gz")
    rows = evaluate(Predictor(Threshold(), {"size": None, "kind": "volume"}), vols, progress=False)
    assert len(rows) == 1 and rows[0]["shape"] == "24x24x10"
    assert rows[0]["dice"] == pytest.approx(dice(volume > 0.5, truth))
    assert rows[0]["dice"] < 0.99
    # in mm, with the header's spacing, not in voxels
    assert rows[0]["hd95"] == pytest.approx(hd95(volume > 0.5, truth, (0.8, 0.8, 2.5)))
    assert rows[0]["hd95"] != pytest.approx(hd95(volume > 0.5, truth))

    text = format_results(rows)
    assert "dice" in text and "v" in text.splitlines()[1]
    csv_text = write_csv(rows, tmp_path / "out" / "metrics.csv").read_text().splitlines()
    assert csv_text[0].startswith("case_id,shape,dice") and csv_text[-3].startswith("mean,")
