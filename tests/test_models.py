"""The published models: exact structure, the registry, input checks, backends that agree."""
import pytest
import torch

import fastseg
from fastseg.backend import unavailable_reason
from fastseg.models import LGMSNet

LGMSNET_MODULES = {
    "stem": 480, "encoder1": 1_672, "encoder2": 1_960, "encoder3": 6_224, "encoder4": 391_424,
    "encoder5": 538_880, "up5": 147_840, "decoder5": 833_792, "up4": 73_920,
    "decoder4": 262_592, "up3": 18_528, "decoder3": 31_392, "up2": 4_656, "decoder2": 8_016,
    "head": 17,
}


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_lgmsnet_parameter_counts_match_the_paper():
    model = LGMSNet()
    assert count(model) == 2_321_393
    assert {name: count(child) for name, child in model.named_children()} == LGMSNET_MODULES


def test_registry():
    assert "lgmsnet" in fastseg.list_models()
    model = fastseg.create_model("LGMSNet", num_classes=3)
    assert isinstance(model, LGMSNet) and model.head.out_channels == 3
    with pytest.raises(ValueError, match=r"unknown model 'unet'; known: \['lgmsnet'"):
        fastseg.create_model("unet")


@pytest.mark.parametrize("x,match", [
    (torch.randn(1, 3, 48, 64), r"divisible by 32; got H=48 \(nearest valid: 32 or 64"),
    (torch.randn(1, 3, 64, 20), r"got W=20 \(nearest valid: 32;"),
    (torch.randn(1, 1, 64, 64), r"x has 1 channels but the model was built with in_channels=3"),
    (torch.randn(3, 64, 64), r"x must have shape \[N, 3, H, W\]"),
])
def test_lgmsnet_rejects_inputs_it_cannot_take(x, match):
    with pytest.raises(ValueError, match=match):
        LGMSNet(backend="reference")(x)


def _run(model, x, seed=3):
    x = x.clone().requires_grad_()
    y = model(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad(y, [x, *model.parameters()], g)
    return y, grads


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.slow)])
@pytest.mark.parametrize("train", [False, True])
def test_lgmsnet_backends_agree_with_the_reference(backend, train):
    """Same weights, same input: the fused backend's logits and every gradient equal the
    reference backend's, in train mode (batch statistics) and eval mode."""
    if unavailable_reason(backend, "cpu") is not None:
        pytest.skip(unavailable_reason(backend, "cpu"))
    torch.manual_seed(0)
    reference = LGMSNet(num_classes=2, backend="reference")
    fused = LGMSNet(num_classes=2, backend=backend)
    fused.load_state_dict(reference.state_dict())
    reference.train(train), fused.train(train)
    # Under the Triton interpreter every kernel launch is slow: the smallest input there.
    x = torch.randn(2, 3, 64, 32) if backend == "cpu" else torch.randn(1, 3, 32, 32)
    y_ref, g_ref = _run(reference, x)
    y, g = _run(fused, x.contiguous(memory_format=torch.channels_last))
    assert y.shape == (x.shape[0], 2, *x.shape[2:])
    scale = y_ref.abs().max()
    assert (y - y_ref).abs().max() <= 1e-4 * scale
    # In train mode the gradient of a conv bias followed by BatchNorm is zero in exact arithmetic
    # (the norm removes any constant): there both sides are rounding noise, so every gradient
    # also gets 1e-4 of the largest one as absolute tolerance.
    largest = max(b.abs().max() for b in g_ref)
    names = ["x"] + [n for n, _ in reference.named_parameters()]
    for name, a, b in zip(names, g, g_ref):
        assert (a - b).abs().max() <= 2e-3 * b.abs().max() + 1e-4 * largest, name


def test_state_dicts_identical_across_backends():
    dicts = [LGMSNet(backend=b).state_dict() for b in ("reference", "cpu")]
    assert [(k, v.shape) for k, v in dicts[0].items()] == [(k, v.shape) for k, v in dicts[1].items()]
