"""Built-in synthetic data: deterministic, real files in real layouts, plausible content."""
import numpy as np
import pytest

from fastseg.data import find_cases, make_synthetic_2d, make_synthetic_ct, read, read_case


def test_synthetic_2d_is_a_deterministic_kvasir_set(tmp_path):
    a = make_synthetic_2d(tmp_path / "a", n=3, size=(48, 64), seed=7)
    b = make_synthetic_2d(tmp_path / "b", n=4, size=(48, 64), seed=7)
    c = make_synthetic_2d(tmp_path / "c", n=3, size=(48, 64), seed=8)
    name = "synthetic_0002.jpg"
    for folder in ("images", "masks"):
        # Asking for more cases keeps the first ones byte for byte; another seed changes them.
        assert (a / folder / name).read_bytes() == (b / folder / name).read_bytes()
    assert (a / "images" / name).read_bytes() != (c / "images" / name).read_bytes()
    index = find_cases(a)
    assert (index.layout, index.case_ids) == ("kvasir-seg", ["synthetic_0000", "synthetic_0001", "synthetic_0002"])


def test_synthetic_2d_lesions_differ_from_background(tmp_path):
    index = find_cases(make_synthetic_2d(tmp_path, n=6, size=(64, 64), mask_format="png"))
    assert index.layout == "generic"
    for case in index.cases:
        image, label = read_case(case, index.labels)
        assert image.array.shape == (64, 64, 3)
        assert set(np.unique(label)) == {0, 255}  # generic layout: raw values, binary training uses > 0
        foreground = label > 0
        assert 0.005 < foreground.mean() < 0.6
        gray = image.array.astype(float).mean(-1)
        inside, outside = gray[foreground].mean(), gray[~foreground].mean()
        assert abs(inside - outside) > 5


def test_synthetic_ct_is_a_lits_set_in_hounsfield_units(tmp_path):
    root = make_synthetic_ct(tmp_path, n=2, shape=(48, 40, 12), spacing=(0.9, 0.9, 3.0), seed=1)
    index = find_cases(root)
    assert (index.layout, index.case_ids) == ("lits", ["volume-0", "volume-1"])
    image, label = read_case(index.cases[0], index.labels)
    assert image.array.dtype == np.int16 and image.array.shape == (48, 40, 12)
    assert image.spacing == pytest.approx((0.9, 0.9, 3.0))
    assert np.diag(image.affine)[:3] == pytest.approx([-0.9, -0.9, 3.0])
    assert image.header.get_xyzt_units()[0] == "mm"
    assert set(np.unique(label)) == {0, 1, 2}
    assert image.array[0, 0, 0] < -900  # air in the corner
    assert 30 < np.median(image.array[label == 1]) < 90  # organ parenchyma
    assert np.median(image.array[label == 2]) < np.median(image.array[label == 1]) - 15  # hypodense lesions
    per_slice = label.any(axis=(0, 1))
    assert per_slice.any() and not per_slice.all()  # foreground on some slices only
    again = make_synthetic_ct(tmp_path / "again", n=1, shape=(48, 40, 12), spacing=(0.9, 0.9, 3.0), seed=1)
    assert np.array_equal(read(again / "volume-0.nii.gz").array, image.array)
