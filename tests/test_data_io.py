"""Readers and writers: NIfTI keeps affine/header/spacing, images keep their bit depth, bad files
raise a DataError naming them."""
import re

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from data_helpers import AFFINE, rgb_image, save, save_nifti
from fastseg.data import DataError, open_volume, read, read_image, read_info, read_nifti, write_image, write_nifti


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip_keeps_affine_header_spacing(tmp_path, suffix):
    array = np.arange(5 * 4 * 3, dtype=np.int16).reshape(5, 4, 3) - 30
    path = save_nifti(array, tmp_path / f"ct{suffix}")
    record = read_nifti(path)
    assert record.array.dtype == np.int16 and np.array_equal(record.array, array)
    np.testing.assert_allclose(record.affine, AFFINE, atol=1e-6)
    assert record.spacing == pytest.approx((0.75, 0.75, 2.5))
    assert record.original_size == (5, 4, 3)
    assert record.header.get_xyzt_units() == ("mm", "unknown")

    out = write_nifti(tmp_path / f"copy{suffix}", record.array, like=record)
    again = read_nifti(out)
    assert np.array_equal(again.array, array) and np.array_equal(again.affine, record.affine)


def test_predicted_mask_carries_source_affine_and_header(tmp_path):
    # A source stored with intensity scaling: the mask must not inherit it.
    source = nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), AFFINE)
    source.header.set_slope_inter(1.0, -1024.0)
    source.header["descrip"] = b"source scan"
    source.set_qform(AFFINE, code=1)
    source.set_sform(AFFINE, code=1)
    nib.save(source, tmp_path / "scan.nii.gz")
    record = read_nifti(tmp_path / "scan.nii.gz")
    assert record.array.min() == -1024  # the reader applies the scaling

    prediction = np.zeros((6, 5, 4), np.int64)
    prediction[1:3, 2, :] = 2
    written = read_nifti(write_nifti(tmp_path / "pred.nii.gz", prediction, like=record))
    assert written.array.dtype == np.uint8 and np.array_equal(written.array, prediction)
    assert np.array_equal(written.affine, record.affine)
    assert written.header["descrip"] == b"source scan"
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 1
    assert written.spacing == record.spacing


def test_16bit_png_reads_exact_values(tmp_path):
    values = np.array([[0, 1, 255, 256], [1000, 32767, 32768, 40000], [60000, 65534, 65535, 12345]], np.uint16)
    path = save(values, tmp_path / "xray.png")
    with Image.open(path) as image:
        assert image.mode.startswith("I")
    record = read_image(path)
    assert record.array.dtype == np.uint16
    assert np.array_equal(record.array, values)
    # And through fastseg's own writer, as PNG and TIFF.
    for name in ("w.png", "w.tif"):
        assert np.array_equal(read_image(write_image(tmp_path / name, values)).array, values)


def test_32bit_int_mode_in_16bit_range_is_read_as_uint16(tmp_path):
    # Pillow before 11 decodes 16-bit PNGs as 32-bit "I"; a TIFF produces that mode on any version.
    values = np.array([[0, 300], [40000, 65535]], np.int32)
    path = tmp_path / "i.tif"
    Image.fromarray(values, mode="I").save(path)
    with Image.open(path) as image:
        assert image.mode == "I"
    record = read_image(path)
    assert record.array.dtype == np.uint16 and np.array_equal(record.array, values)


def test_jpeg_rgb_reads_close_to_source(tmp_path):
    rgb = rgb_image((30, 40))
    record = read(save(rgb, tmp_path / "polyp.jpg", quality=95))
    assert record.array.shape == (30, 40, 3) and record.array.dtype == np.uint8
    assert np.abs(record.array.astype(int) - rgb).mean() < 3
    assert record.original_size == (30, 40) and record.affine is None


@pytest.mark.parametrize("name", ["g.png", "g.bmp", "g.tif", "g.tiff"])
def test_gray_and_rgb_lossless_formats_round_trip(tmp_path, name):
    gray = (np.arange(12 * 10) % 256).astype(np.uint8).reshape(12, 10)
    rgb = rgb_image((12, 10))
    assert np.array_equal(read_image(write_image(tmp_path / name, gray)).array, gray)
    assert np.array_equal(read_image(write_image(tmp_path / ("rgb_" + name), rgb)).array, rgb)


def test_alpha_palette_and_float_modes(tmp_path):
    rgba = np.dstack([rgb_image((6, 7)), np.full((6, 7), 128, np.uint8)])
    assert np.array_equal(read_image(save(rgba, tmp_path / "a.png")).array, rgba[..., :3])
    palette = Image.fromarray(rgb_image((6, 7))).convert("P")
    palette.save(tmp_path / "p.png")
    assert np.array_equal(read_image(tmp_path / "p.png").array, np.asarray(palette.convert("RGB")))
    floats = np.linspace(-1, 1, 42, dtype=np.float32).reshape(6, 7)
    assert np.array_equal(read_image(save(floats, tmp_path / "f.tif")).array, floats)


def test_writer_refuses_what_it_cannot_store(tmp_path):
    with pytest.raises(ValueError, match="scale first|cannot write"):
        write_image(tmp_path / "x.png", np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="16-bit"):
        write_image(tmp_path / "x.jpg", np.zeros((4, 4), np.uint16))
    assert np.array_equal(read_image(write_image(tmp_path / "m.png", np.eye(3, dtype=bool))).array, np.eye(3) * 255)


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize("kind", ["garbage.png", "garbage.nii.gz", "empty.jpg", "empty.nii"])
def test_corrupt_files_raise_data_error_naming_them(tmp_path, kind):
    path = tmp_path / kind
    path.write_bytes(b"" if kind.startswith("empty") else b"this is not an image at all" * 20)
    with pytest.raises(DataError, match=re.escape(str(path))):
        read(path)


def test_truncated_files_raise_data_error_naming_them(tmp_path):
    jpeg = _truncate(save(rgb_image((64, 64)), tmp_path / "cut.jpg"))
    png = _truncate(save(rgb_image((64, 64)), tmp_path / "cut.png"))
    gz = _truncate(save_nifti(np.random.default_rng(0).normal(size=(20, 20, 10)).astype(np.float32), tmp_path / "cut.nii.gz"))
    raw = _truncate(save_nifti(np.ones((20, 20, 10), np.int16), tmp_path / "cut.nii"), keep=0.7)
    for path in (jpeg, png, gz, raw):
        with pytest.raises(DataError, match=re.escape(path.name)) as info:
            read(path)
        assert info.value.path == path
    # The uncompressed file's truncation shows in its header alone.
    with pytest.raises(DataError, match="truncated NIfTI"):
        read_info(raw)


def test_read_info_from_headers(tmp_path):
    info = read_info(save_nifti(np.zeros((5, 6, 7, 2), np.float32), tmp_path / "mr.nii.gz"))
    assert info.original_size == (5, 6, 7) and info.channels == 2 and info.spacing == pytest.approx((0.75, 0.75, 2.5))
    info = read_info(save(rgb_image((9, 11)), tmp_path / "x.jpg"))
    assert info.original_size == (9, 11) and info.channels == 3 and info.affine is None
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        read(tmp_path / "notes.txt")


def test_open_volume_reads_slices_lazily_or_decoded(tmp_path):
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    lazy = open_volume(save_nifti(array, tmp_path / "v.nii"))
    decoded = open_volume(save_nifti(array, tmp_path / "v.nii.gz"))
    assert not isinstance(lazy, np.ndarray) and isinstance(decoded, np.ndarray)
    assert np.array_equal(np.asarray(lazy[:, :, 3]), array[:, :, 3])
    assert np.array_equal(decoded[:, :, 3], array[:, :, 3])


def test_big_endian_nifti_is_returned_in_native_order(tmp_path):
    array = np.arange(24, dtype=">i2").reshape(2, 3, 4)
    path = tmp_path / "be.nii"
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    record = read_nifti(path)
    assert record.array.dtype.isnative and np.array_equal(record.array, array)
