"""Intensity presets, resizing and its undoing, and seeded torch augmentation."""
import numpy as np
import pytest
import torch

from fastseg.data import (
    CTWindow, ImageNetNormalize, MinMax, PercentileZScore, RandomAugment, image_to_tensor, intensity_preset,
    match_channels, resize_image, resize_mask, restore_size,
)


def test_ct_liver_window_maps_hu_to_unit_range():
    hu = torch.tensor([[[-1000.0, -200.0, 25.0, 250.0, 1000.0]]])
    assert intensity_preset("ct-liver")(hu).flatten().tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    assert CTWindow(0, 100)(torch.tensor([50.0])).item() == pytest.approx(0.5)


def test_percentile_zscore_clips_outliers_then_standardises():
    image = torch.arange(1000, dtype=torch.float32).reshape(1, 10, 100)
    image[0, 0, 0] = -1e6  # an outlier that would dominate the mean and std
    out = PercentileZScore(1, 99)(image)
    assert out.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert out.std().item() == pytest.approx(1.0, abs=1e-5)
    assert out.min().item() > -1.8  # the outlier was clipped to the 1st percentile


def test_minmax_and_constant_image():
    image = torch.tensor([[[2.0, 4.0], [6.0, 10.0]]])
    assert MinMax()(image).flatten().tolist() == [0.0, 0.25, 0.5, 1.0]
    assert MinMax()(torch.full((1, 2, 2), 7.0)).abs().max().item() == 0.0


def test_imagenet_normalisation_values_and_channel_check():
    white = torch.ones(3, 2, 2)
    out = ImageNetNormalize()(white)
    assert out[:, 0, 0].tolist() == pytest.approx([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225])
    with pytest.raises(ValueError, match="needs 3 channels"):
        ImageNetNormalize()(torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="unknown intensity preset 'hu'"):
        intensity_preset("hu")


def test_image_to_tensor_layout_and_scaling():
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[..., 1] = 255
    tensor = image_to_tensor(rgb, scale=True)
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    assert tensor[1].min().item() == 1.0 and tensor[0].max().item() == 0.0
    sixteen = np.array([[0, 65535]], np.uint16)
    assert image_to_tensor(sixteen, scale=True).flatten().tolist() == [0.0, 1.0]
    hu = np.array([[-1024, 3071]], np.int16)
    assert image_to_tensor(hu, scale=False).flatten().tolist() == [-1024.0, 3071.0]


def test_image_to_tensor_resizes_uint8_like_float():
    rgb = np.random.default_rng(0).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    fast = image_to_tensor(rgb, scale=True, size=(32, 32))
    reference = resize_image(torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1), (32, 32))
    assert fast.shape == (3, 32, 32)
    assert (fast - reference).abs().max().item() <= 1 / 255 + 1e-6  # at most one gray level apart


def test_match_channels():
    rgb = torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand(3, 2, 2)
    assert match_channels(rgb, 1).flatten().tolist() == pytest.approx([0.299] * 4)
    assert match_channels(torch.ones(1, 2, 2), 3).shape == (3, 2, 2)
    assert match_channels(rgb, None) is rgb
    with pytest.raises(ValueError, match="2-channel"):
        match_channels(torch.ones(2, 2, 2), 3)


def test_resize_mask_keeps_class_values_and_restore_size_undoes_resize():
    mask = torch.zeros(40, 30, dtype=torch.int64)
    mask[10:30, 5:20] = 3
    mask[12:15, 6:9] = 7
    small = resize_mask(mask, (20, 15))
    assert small.dtype == torch.int64 and set(small.unique().tolist()) == {0, 3, 7}
    assert resize_mask(mask.to(torch.uint8), (20, 15)).dtype == torch.uint8
    logits = resize_image((mask == 3).float()[None], (32, 32))
    restored = restore_size(logits, (40, 30))
    assert restored.shape == (1, 40, 30)
    assert ((restored[0] > 0.5) == (mask == 3)).float().mean().item() > 0.97
    assert restore_size(logits[None].repeat(2, 1, 1, 1), torch.tensor([40, 30])).shape == (2, 1, 40, 30)


def _dihedral_index(image):
    """Which of the 8 square symmetries turned the reference pattern into ``image``."""
    reference = torch.arange(16.0).reshape(1, 4, 4)
    variants = [torch.rot90(v, k, (-2, -1)) for v in (reference, reference.flip(-1)) for k in range(4)]
    return next(i for i, v in enumerate(variants) if torch.equal(v, image))


def test_rot90_and_flips_move_image_and_mask_together_and_reach_all_symmetries():
    augment = RandomAugment()
    image = torch.arange(16.0).reshape(1, 4, 4)
    seen = set()
    for seed in range(64):
        out_image, out_mask = augment(image, image[0].long(), torch.Generator().manual_seed(seed))
        assert torch.equal(out_image[0].long(), out_mask)
        seen.add(_dihedral_index(out_image))
    assert seen == set(range(8))


def test_augment_is_reproducible_with_a_generator():
    augment = RandomAugment(affine=True, intensity=True)
    image, mask = torch.rand(3, 16, 16), (torch.rand(16, 16) > 0.5).long()
    a = augment(image, mask, torch.Generator().manual_seed(3))
    b = augment(image, mask, torch.Generator().manual_seed(3))
    c = augment(image, mask, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_affine_keeps_mask_values_and_follows_the_image():
    augment = RandomAugment(rot90=False, flip=False, affine=True, degrees=30, translate=0.1)
    mask = torch.zeros(32, 32, dtype=torch.int64)
    mask[8:24, 10:22] = 2
    for seed in range(5):
        image, out = augment(mask.float()[None], mask, torch.Generator().manual_seed(seed))
        assert set(out.unique().tolist()) <= {0, 2} and out.dtype == torch.int64
        assert not torch.equal(out, mask)
        # The bilinear image and the nearest mask agree away from edges.
        assert ((image[0] > 1.0) == (out == 2)).float().mean().item() > 0.97


def test_intensity_augment_changes_only_the_image():
    augment = RandomAugment(rot90=False, flip=False, intensity=True)
    image, mask = torch.rand(1, 16, 16), torch.ones(16, 16, dtype=torch.int64)
    out_image, out_mask = augment(image, mask, torch.Generator().manual_seed(0))
    assert not torch.allclose(out_image, image) and torch.equal(out_mask, mask)
