"""fastseg.losses: hand-computed values, the training recipes they replace, gradients, precision."""
import pytest
import torch
import torch.nn.functional as F

from fastseg import losses as L


def test_dice_loss_by_hand():
    # p = [[1, .5], [0, .5]], g = [[1, 1], [0, 0]]: Σpg = 1.5, Σp + Σg = 4 -> loss 1 - 3/4.
    probs = torch.tensor([[[[1.0, 0.5], [0.0, 0.5]]]])
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    assert L.dice_loss(probs, target, smooth_nr=0, smooth_dr=0).item() == pytest.approx(0.25)
    assert L.dice_loss(probs, target).item() == pytest.approx(1 - 3.00001 / 4.00001)
    # An empty target and an empty prediction: the smooth terms make it a perfect 0.
    assert L.dice_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).item() == 0.0


def test_per_sample_versus_batch_dice():
    # Sample 0: Σpg = 1, Σp + Σg = 2 (Dice 1); sample 1: Σpg = 0, Σp + Σg = 2 (Dice 0).
    probs = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    target = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    options = dict(smooth_nr=0.0, smooth_dr=0.0)
    per_sample = L.dice_loss(probs, target, reduction="none", **options)
    assert per_sample.shape == (2, 1) and per_sample.flatten().tolist() == [0.0, 1.0]
    pooled = L.dice_loss(probs, target, batch=True, reduction="none", **options)
    assert pooled.shape == (1,) and pooled.item() == pytest.approx(0.5)  # 1 - 2·1 / 4
    assert L.dice_loss(probs, target, reduction="sum", **options).item() == 1.0


def test_softmax_dice_targets_and_background():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 3, 5, 6), torch.randint(0, 3, (2, 5, 6))
    one_hot = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    probs = logits.softmax(1)
    for include_background, channels in ((True, slice(None)), (False, slice(1, None))):
        p, g = probs[:, channels], one_hot[:, channels]
        expected = 1 - (2 * (p * g).sum((2, 3)) + 1e-5) / (p.sum((2, 3)) + g.sum((2, 3)) + 1e-5)
        for target in (labels, labels[:, None], one_hot):
            loss = L.dice_loss(logits, target, softmax=True, include_background=include_background,
                               reduction="none")
            torch.testing.assert_close(loss, expected)
    with pytest.warns(UserWarning, match="single channel"):
        L.dice_loss(logits[:, :1], one_hot[:, :1], sigmoid=True, include_background=False)


def test_lgmsnet_recipe():
    # LGMSNet's training loss as coded: 0.5·BCEWithLogits + 1 - mean per-sample soft Dice.
    torch.manual_seed(1)
    logits, target = torch.randn(4, 1, 8, 8), (torch.rand(4, 1, 8, 8) > 0.5).float()
    p, g = logits.sigmoid().flatten(1), target.flatten(1)
    dice = (2 * (p * g).sum(1) + 1e-5) / (p.sum(1) + g.sum(1) + 1e-5)
    expected = 0.5 * F.binary_cross_entropy_with_logits(logits, target) + 1 - dice.mean()
    torch.testing.assert_close(L.DiceBCELoss()(logits, target), expected)
    torch.testing.assert_close(L.create_loss("dice_bce")(logits, target), expected)
    torch.testing.assert_close(L.dice_bce_loss(logits, target[:, 0]), expected)  # [N, H, W] mask


def test_dice_ce_is_cross_entropy_plus_softmax_dice():
    torch.manual_seed(2)
    logits, labels = torch.randn(2, 4, 3, 5, 6), torch.randint(0, 4, (2, 3, 5, 6))
    expected = F.cross_entropy(logits, labels) + L.dice_loss(logits, labels, softmax=True,
                                                             include_background=False)
    loss = L.DiceCELoss(include_background=False)
    torch.testing.assert_close(loss(logits, labels), expected)
    torch.testing.assert_close(loss(logits, labels[:, None]), expected)
    one_hot = F.one_hot(labels, 4).movedim(-1, 1).float()
    torch.testing.assert_close(loss(logits, one_hot), expected)  # CE against probabilities


def test_bad_arguments():
    logits = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="mutually exclusive"):
        L.dice_loss(logits, logits, sigmoid=True, softmax=True)
    with pytest.raises(ValueError, match="class indices"):
        L.dice_loss(logits, torch.zeros(2, 4, 4), softmax=True)  # float labels are ambiguous
    with pytest.raises(ValueError, match="reduction"):
        L.dice_loss(logits, logits, reduction="max")
    with pytest.raises(ValueError, match="unknown loss"):
        L.create_loss("focal")
    assert isinstance(L.create_loss("bce"), torch.nn.BCEWithLogitsLoss)
    assert "lambda_bce=0.5" in repr(L.DiceBCELoss())


@pytest.mark.parametrize("loss", [
    lambda x, y: L.dice_loss(x, y, sigmoid=True),
    lambda x, y: L.dice_loss(x, y, softmax=True, include_background=False, batch=True),
    lambda x, y: L.dice_bce_loss(x, y),
    lambda x, y: L.dice_ce_loss(x, y.argmax(1)),
], ids=["dice-sigmoid", "dice-softmax-batch", "dice-bce", "dice-ce"])
def test_gradcheck_float64(loss):
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    target = (torch.rand(2, 3, 3, 4, dtype=torch.float64) > 0.5).double()
    assert torch.autograd.gradcheck(lambda x: loss(x, target), (logits,))


def test_computed_in_float32_under_autocast():
    torch.manual_seed(4)
    conv = torch.nn.Conv2d(2, 3, 3, padding=1)
    x, labels = torch.randn(2, 2, 16, 16), torch.randint(0, 3, (2, 16, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x)
        losses = [L.dice_loss(logits, labels, softmax=True), L.dice_ce_loss(logits, labels),
                  L.dice_bce_loss(logits[:, :1], (labels[:, None] > 0).float())]
    assert logits.dtype == torch.bfloat16
    assert all(loss.dtype == torch.float32 for loss in losses)
    # Same value as upcasting the bfloat16 logits by hand and computing in float32 outside autocast.
    torch.testing.assert_close(losses[0], L.dice_loss(logits.float(), labels, softmax=True),
                               rtol=0, atol=0)
    losses[1].backward()
    assert conv.weight.grad is not None and conv.weight.grad.dtype == torch.float32
