"""fastseg.metrics against cases worked out on paper, and against a brute-force definition."""
import math

import numpy as np
import pytest
import torch

from fastseg import metrics as M
from fastseg.engine import metrics as engine_metrics

NAN, INF = math.nan, math.inf


def box(shape, *slices):
    mask = np.zeros(shape, bool)
    mask[slices] = True
    return mask


def assert_row(row, expected):
    assert row.keys() == expected.keys()
    for key, value in expected.items():
        assert row[key] == pytest.approx(value, nan_ok=True, abs=1e-12), key


# --- hand-computed cases -------------------------------------------------------------------------

def test_squares_offset_one_row_anisotropic():
    # 4x4 squares, the prediction one row lower: tp 12, fp 4, fn 4. Each square has 12 edge pixels.
    # d(P→T): 6 pixels on T's edge (0), the 2 inner pixels of P's top row reach T's side column
    # (0.5, one column), P's bottom row is one row from T's (2.0): {0 x6, 0.5 x2, 2.0 x4}; d(T→P)
    # is its mirror image. p95 of 12 values sits at 10.45 -> 2.0; ASSD = (4·0.5 + 8·2.0) / 24.
    target, pred = box((10, 10), slice(2, 6), slice(2, 6)), box((10, 10), slice(3, 7), slice(2, 6))
    row = M.compute_metrics(pred, target, spacing=(2.0, 0.5))
    assert_row(row, dict(dice=0.75, iou=0.6, precision=0.75, recall=0.75, hd95=2.0,
                         hd95_pooled=2.0, assd=0.75))
    # spacing[i] belongs to axis i: swapped, the row step is the short one -> {0 x6, 0.5 x6}.
    assert M.hd95(pred, target, spacing=(0.5, 2.0)) == pytest.approx(0.5)
    assert M.assd(pred, target, spacing=(0.5, 2.0)) == pytest.approx(0.25)
    assert M.hd95(pred, target) == pytest.approx(1.0)  # default spacing 1: voxel units


def test_directed_vs_pooled_percentile():
    # T one pixel, P a 1x3 bar starting on it: d(P→T) = {0, 1, 2}, d(T→P) = {0}.
    # Directed p95: 1 + 0.9·(2 - 1) = 1.9; pooled p95 of {0, 0, 1, 2}: 1 + 0.85 = 1.85.
    target, pred = box((7, 9), 3, 4), box((7, 9), 3, slice(4, 7))
    row = M.compute_metrics(pred, target)
    assert_row(row, dict(dice=0.5, iou=1 / 3, precision=1 / 3, recall=1.0, hd95=1.9,
                         hd95_pooled=1.85, assd=0.75))
    assert M.hd95(pred, target, pooled=True) == pytest.approx(1.85)
    assert M.hd95(pred, target, percentile=100) == pytest.approx(2.0)  # classical Hausdorff
    assert M.hd95(pred, target, spacing=(1.0, 0.5)) == pytest.approx(0.95)


def test_cubes_offset_one_slice_3d():
    # 4x4x4 cubes (56 edge voxels each), P one slice further along axis 0 (spacing 2.5 there):
    # tp 48 of 64. d(P→T): P's first face lies in T's interior slice: 12 ring voxels on T's edge
    # (0), 4 centre voxels one in-plane step (0.7) from T's ring; P's two middle rings lie on T's edge
    # (24 x 0); P's last face is one slice past T's (16 x 2.5). Mirror image for d(T→P).
    target = box((8, 8, 8), slice(2, 6), slice(2, 6), slice(2, 6))
    pred = box((8, 8, 8), slice(3, 7), slice(2, 6), slice(2, 6))
    row = M.compute_metrics(pred, target, spacing=(2.5, 0.7, 0.7))
    assert_row(row, dict(dice=0.75, iou=0.6, precision=0.75, recall=0.75, hd95=2.5,
                         hd95_pooled=2.5, assd=(4 * 0.7 + 16 * 2.5) / 56))


def test_single_voxel_objects_3d():
    target = box((5, 6, 7), 2, 2, 3)
    pred = box((5, 6, 7), 3, 4, 3)
    expected = math.hypot(2.5, 2 * 0.7)
    row = M.compute_metrics(pred, target, spacing=(2.5, 0.7, 0.7))
    assert_row(row, dict(dice=0.0, iou=0.0, precision=0.0, recall=0.0, hd95=expected,
                         hd95_pooled=expected, assd=expected))
    assert_row(M.compute_metrics(target, target, spacing=2.0),
               dict(dice=1.0, iou=1.0, precision=1.0, recall=1.0, hd95=0.0, hd95_pooled=0.0,
                    assd=0.0))


def test_full_mask_has_its_edge_on_the_image_border():
    # P fills 5x5: its edge is the 16 border pixels, at 2 (x4), √5 (x8), √8 (x4) from T's centre
    # pixel; d(T→P) = {2}. Directed p95 of P's 16 sorted values sits at 14.25 -> √8.
    pred, target = np.ones((5, 5), bool), box((5, 5), 2, 2)
    row = M.compute_metrics(pred, target)
    assert row["dice"] == pytest.approx(2 / 26)
    assert row["hd95"] == pytest.approx(math.sqrt(8))
    assert row["assd"] == pytest.approx((4 * 2 + 8 * math.sqrt(5) + 4 * math.sqrt(8) + 2) / 17)
    full = np.ones((4, 5, 6), bool)
    assert_row(M.compute_metrics(full, full, spacing=(3.0, 1.0, 1.0)),
               dict(dice=1.0, iou=1.0, precision=1.0, recall=1.0, hd95=0.0, hd95_pooled=0.0,
                    assd=0.0))


# --- empty masks ---------------------------------------------------------------------------------

EMPTY, SOME = np.zeros((6, 6), bool), box((6, 6), slice(1, 3), slice(1, 4))


@pytest.mark.parametrize("pred, target, empty, expected", [
    (EMPTY, EMPTY, "monai", (NAN, NAN, NAN, NAN, NAN, NAN, NAN)),
    (SOME, EMPTY, "monai", (NAN, NAN, 0.0, NAN, INF, INF, INF)),
    (EMPTY, SOME, "monai", (0.0, 0.0, NAN, 0.0, INF, INF, INF)),
    (EMPTY, EMPTY, "perfect", (1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0)),
    (SOME, EMPTY, "perfect", (0.0, 0.0, 0.0, 1.0, INF, INF, INF)),
    (EMPTY, SOME, "perfect", (0.0, 0.0, 1.0, 0.0, INF, INF, INF)),
], ids=["both-monai", "gt-empty-monai", "pred-empty-monai", "both-perfect", "gt-empty-perfect",
        "pred-empty-perfect"])
def test_empty_mask_rules(pred, target, empty, expected):
    row = M.compute_metrics(pred, target, empty=empty, spacing=(1.0, 2.0))
    assert_row(row, dict(zip(M.METRICS, expected)))
    single = {"dice": M.dice, "iou": M.iou, "precision": M.precision, "recall": M.recall,
              "hd95": M.hd95, "assd": M.assd}
    for name, fn in single.items():
        assert fn(pred, target, empty=empty) == pytest.approx(row[name], nan_ok=True)


def test_one_empty_mask_is_inf_at_every_percentile_and_the_note_says_so():
    # MONAI 1.6.1 gives NaN for its percentile HD here and +inf without one; fastseg keeps +inf.
    for pred, target in [(SOME, EMPTY), (EMPTY, SOME)]:
        assert [M.hd95(pred, target, percentile=q) for q in (50, 95, 100)] == [INF] * 3
        assert M.hd95(pred, target, pooled=True) == INF
    note = M.EMPTY_MASK_NOTE  # printed by reports; defined in fastseg.engine.metrics
    assert note is engine_metrics.EMPTY_MASK_NOTE and "EMPTY_MASK_NOTE" in M.__all__
    assert "HD95 and ASSD are +inf when exactly one" in note and "MONAI 1.6.1 gives NaN" in note


def test_perfect_convention_is_the_limit_of_smoothed_scores():
    # LightAWNet/LGMSNet score (2·tp + s) / (|P| + |T| + s) per image, s = 1e-5.
    s = 1e-5
    for pred, target in [(EMPTY, EMPTY), (SOME, EMPTY), (EMPTY, SOME), (SOME, SOME.T)]:
        tp, size = (pred & target).sum(), pred.sum() + target.sum()
        smoothed = (2 * tp + s) / (size + s)
        assert M.dice(pred, target, empty="perfect") == pytest.approx(smoothed, abs=1e-5)


# --- inputs, multi-class, batches ----------------------------------------------------------------

def test_numpy_and_torch_inputs_and_dtypes_agree():
    rng = np.random.default_rng(0)
    target, pred = rng.random((9, 11)) < 0.4, rng.random((9, 11)) < 0.4
    expected = M.compute_metrics(pred, target, spacing=(1.5, 0.5))
    for convert in (lambda a: a.astype(np.uint8), lambda a: a.astype(np.float32), torch.from_numpy,
                    lambda a: torch.from_numpy(a).to(torch.bfloat16),
                    lambda a: torch.from_numpy(a).long()):
        assert M.compute_metrics(convert(pred), convert(target), spacing=(1.5, 0.5)) == expected


def test_input_errors():
    with pytest.raises(ValueError, match="threshold"):
        M.dice(np.full((3, 3), 0.7), np.ones((3, 3)))
    with pytest.raises(ValueError, match="shapes differ"):
        M.dice(np.ones((3, 3)), np.ones((3, 4)))
    with pytest.raises(ValueError, match="spacing"):
        M.hd95(np.ones((3, 3)), np.ones((3, 3)), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="empty"):
        M.iou(np.ones((3, 3)), np.ones((3, 3)), empty="zero")
    with pytest.raises(ValueError, match="unknown metrics"):
        M.compute_metrics(np.ones((3, 3)), np.ones((3, 3)), metrics=("dice", "hd"))
    with pytest.raises(ValueError, match="label maps"):
        M.compute_metrics(np.full((3, 3), 3), np.ones((3, 3), int), num_classes=3)


def test_multiclass_label_maps_per_class():
    # Classes 1 and 2 are the squares case and the bar case side by side; class 3 is absent.
    target = np.zeros((10, 20), np.int64)
    pred = np.zeros_like(target)
    target[2:6, 2:6], pred[3:7, 2:6] = 1, 1
    target[5, 13], pred[5, 13:16] = 2, 2
    row = M.compute_metrics(torch.from_numpy(pred), torch.from_numpy(target), num_classes=4,
                            metrics=("dice", "hd95", "assd"))
    assert_row(row, {"dice/1": 0.75, "hd95/1": 1.0, "assd/1": 0.5,
                     "dice/2": 0.5, "hd95/2": 1.9, "assd/2": 0.75,
                     "dice/3": NAN, "hd95/3": NAN, "assd/3": NAN})
    with_background = M.compute_metrics(pred, target, num_classes=4, metrics=("iou",),
                                        include_background=True)
    assert list(with_background) == ["iou/0", "iou/1", "iou/2", "iou/3"]
    both, either = ((target == 0) & (pred == 0)).sum(), ((target == 0) | (pred == 0)).sum()
    assert with_background["iou/0"] == pytest.approx(both / either)


def test_batched_rows_match_single_cases():
    rng = np.random.default_rng(1)
    target, pred = rng.random((3, 4, 6, 7)) < 0.3, rng.random((3, 4, 6, 7)) < 0.3
    target[1] = False  # an empty truth in the batch
    rows = M.compute_metrics_batch(torch.from_numpy(pred), torch.from_numpy(target),
                                   spacing=(2.0, 1.0, 1.0))
    assert len(rows) == 3
    for row, p, t in zip(rows, pred, target):
        assert_row(row, M.compute_metrics(p, t, spacing=(2.0, 1.0, 1.0)))
    assert math.isnan(rows[1]["dice"]) and rows[1]["hd95"] == INF


# --- against the definition, brute force ---------------------------------------------------------

def brute_force_distances(pred, target, spacing):
    """MONAI's definition spelled out: face-connected edges (outside the array is background), then
    every pairwise distance between the two edge sets in physical units, no crop, no transform."""
    def edges(mask):
        padded = np.pad(mask, 1)
        inner = mask.copy()
        for axis in range(mask.ndim):
            for step in (-1, 1):
                inner &= np.roll(padded, step, axis)[tuple(slice(1, -1) for _ in mask.shape)]
        return np.argwhere(mask & ~inner) * np.asarray(spacing)

    a, b = edges(pred), edges(target)
    pairwise = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return pairwise.min(1), pairwise.min(0)


@pytest.mark.parametrize("shape", [(7, 9), (5, 6, 7)])
def test_random_masks_match_brute_force(shape):
    # Random blobs touch the image border and each other's bounding box, so this also checks that
    # the crop to the union's bounding box leaves every distance unchanged.
    rng = np.random.default_rng(len(shape))
    for _ in range(10):
        pred, target = rng.random(shape) < 0.35, rng.random(shape) < 0.35
        spacing = tuple(rng.uniform(0.3, 3.0, len(shape)))
        d_pt, d_tp = brute_force_distances(pred, target, spacing)
        pooled = np.concatenate([d_pt, d_tp])
        row = M.compute_metrics(pred, target, spacing=spacing)
        assert row["hd95"] == pytest.approx(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))
        assert row["hd95_pooled"] == pytest.approx(np.percentile(pooled, 95))
        assert row["assd"] == pytest.approx(pooled.mean())


def test_result_does_not_depend_on_position_in_the_image():
    rng = np.random.default_rng(3)
    pred, target = rng.random((5, 6, 4)) < 0.5, rng.random((5, 6, 4)) < 0.5
    big_pred, big_target = np.zeros((20, 15, 12), bool), np.zeros((20, 15, 12), bool)
    big_pred[7:12, 3:9, 5:9], big_target[7:12, 3:9, 5:9] = pred, target
    # Inside a larger image, the blobs no longer touch the border: edges appear on the old border
    # exactly as before, because outside the array counts as background.
    assert_row(M.compute_metrics(big_pred, big_target, spacing=(1.0, 2.0, 3.0)),
               M.compute_metrics(pred, target, spacing=(1.0, 2.0, 3.0)))


# --- summary -------------------------------------------------------------------------------------

def test_summarize_excludes_and_counts_nan_and_inf():
    rows = [{"case": "a", "dice": 0.5, "hd95": 1.0},
            {"case": "b", "dice": NAN, "hd95": INF},
            {"case": "c", "dice": 1.0, "hd95": 3.0},
            {"case": "d", "dice": 0.0, "hd95": INF}]
    summary = M.summarize(rows)
    assert list(summary) == ["dice", "hd95"]  # the non-numeric case ids are skipped
    assert summary["dice"] == pytest.approx(dict(mean=0.5, std=math.sqrt(1 / 6), median=0.5, n=3,
                                                 n_nan=1, n_inf=0))
    assert summary["hd95"] == pytest.approx(dict(mean=2.0, std=1.0, median=2.0, n=2, n_nan=0,
                                                 n_inf=2))
    nothing = M.summarize([{"dice": NAN}])["dice"]
    assert math.isnan(nothing["mean"]) and nothing["n"] == 0 and nothing["n_nan"] == 1


def test_summarize_thresholded_jaccard_per_class():
    rows = [{"iou/1": 0.6, "iou/2": 0.9}, {"iou/1": 0.7, "iou/2": NAN},
            {"iou/1": 0.9, "iou/2": 0.5}]
    summary = M.summarize(rows, thresholded_jaccard=True)
    assert summary["iou/1"]["mean"] == pytest.approx(2.2 / 3)
    assert summary["thresholded_jaccard/1"]["mean"] == pytest.approx(1.6 / 3)
    assert summary["thresholded_jaccard/2"] == pytest.approx(dict(mean=0.45, std=0.45, median=0.45,
                                                                  n=2, n_nan=1, n_inf=0))
    binary = M.summarize([{"iou": 0.64}, {"iou": 0.66}], thresholded_jaccard=True)
    assert binary["thresholded_jaccard"]["mean"] == pytest.approx(0.33)
