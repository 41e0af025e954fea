"""Checkpoints of the authors' code: fastseg's models load them and compute what the originals
compute.

The originals are rebuilt in plain PyTorch in ``original_models.py`` (their module structure,
checked key by key against ``../shared/spec/original_state_dicts.md``, and models.md's formulas);
random weights and BatchNorm statistics go through :func:`fastseg.models.from_original`, and the
outputs, the gradients and the updated running statistics must agree.
"""
import re
from pathlib import Path

import pytest
import torch
from fastseg.models import LGMSNet, from_original, to_original
from fastseg.models.convert import original_key_map
from original_models import OriginalLGMSNet, OriginalLightAWNet

SPEC = Path(__file__).resolve().parents[2] / "shared" / "spec" / "original_state_dicts.md"
ORIGINALS = {"lgmsnet": OriginalLGMSNet, "lightawnet": OriginalLightAWNet}
SECTIONS = {"lgmsnet": "LGMSNet", "lightawnet": "LightAWNet"}
# Smallest inputs the networks take with an even bottleneck (batch 2: batch statistics).
INPUTS = {"lgmsnet": (2, 3, 64, 32), "lightawnet": (2, 1, 32, 32)}


def spec_entries(name):
    """[(key, shape)] of one model's section of the spec, in its order."""
    if not SPEC.exists():
        pytest.skip(f"{SPEC} not present")
    text = SPEC.read_text()
    section = re.search(rf"^## {SECTIONS[name]} .*?\n```\n(.*?)```", text, re.S | re.M)
    entries = []
    for line in section[1].strip().splitlines():
        key, shape = line.split(" ", 1)
        entries.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    return entries


@pytest.mark.parametrize("name", list(ORIGINALS))
def test_original_structure_has_the_spec_keys(name):
    """The plain-PyTorch originals produce exactly the spec's keys and shapes, in order (so the
    checkpoints the tests build are the authors' format)."""
    entries = spec_entries(name)
    assert [(k, tuple(v.shape)) for k, v in ORIGINALS[name]().state_dict().items()] == entries


def randomize(model, seed):
    """Random weights and BatchNorm statistics: fan-in scaled weights (LightAWNet's unscaled
    normal experts would grow activations by ~10⁴ over its ten dynamic convs), non-trivial affine
    norms and running statistics, a non-zero attention γ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if key.endswith("num_batches_tracked"):
                t.fill_(int(torch.randint(1, 100, (), generator=g)))
            elif key.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif key.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
            elif key.endswith("gamma"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.2 + 0.5)
            elif t.dim() >= 2:
                fan_in = t[0].numel() if t.dim() != 5 else t[0, 0].numel()
                t.copy_(torch.randn(t.shape, generator=g) / fan_in ** 0.5)
            elif key.endswith(".weight"):  # 1-D weights: the scales of Batch/Group/LayerNorms
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)  # biases, norm shifts


def capture_logits(original):
    """LightAWNet's original returns σ(logits): record the logits (its `output` module's result)
    too, so saturated sigmoids cannot hide a difference."""
    seen = {}
    if isinstance(original, OriginalLightAWNet):
        original.output.register_forward_hook(lambda m, i, o: seen.__setitem__("logits", o))
    return seen


def assert_close(actual, expected, what):
    scale = expected.abs().max().clamp_min(1e-6)
    err = (actual - expected).abs().max()
    assert err <= 1e-9 * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", list(ORIGINALS))
def test_from_original_computes_what_the_original_computes(name, backend, train):
    torch.manual_seed(0)
    original = ORIGINALS[name]()
    randomize(original, seed=1)
    model = from_original(name, original.state_dict(), backend=backend)
    # float64: train-mode BatchNorm's backward cancels large terms, so float32 gradients of the
    # two formulations differ by their rounding (up to 0.5 % of stem.conv.0.weight's gradient
    # with one CPU's convolution algorithms); in float64 what is compared is the computation.
    original.double(), model.double()
    original.train(train), model.train(train)
    seen = capture_logits(original)
    x = torch.randn(INPUTS[name], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = original(x)
    logits = model(x)
    if name == "lightawnet":
        assert_close(logits, seen["logits"], "logits")
        assert_close(torch.sigmoid(logits), expected, "σ(logits)")
    else:
        assert_close(logits, expected, "logits")
    # Gradients of the same upstream gradient (through the sigmoid for LightAWNet), per key.
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (torch.sigmoid(logits) if name == "lightawnet" else logits).backward(grad)
    expected.backward(grad)
    mapping = original_key_map(name, model)
    ours = {mapping[k]: p.grad for k, p in model.named_parameters()}
    theirs = dict(original.named_parameters())
    assert ours.keys() == theirs.keys()
    largest = max(p.grad.abs().max() for p in theirs.values())
    for key, p in theirs.items():
        err = (ours[key] - p.grad).abs().max()
        # A conv bias before a train-mode BatchNorm has gradient 0 up to rounding: the absolute
        # part of the tolerance is relative to the largest gradient.
        assert err <= 1e-7 * p.grad.abs().max() + 1e-9 * largest, key
    # Train mode updated the running statistics (and counters) the same way.
    converted = to_original(name, model)
    for key, value in original.state_dict().items():
        if "running" in key or key.endswith("num_batches_tracked"):
            torch.testing.assert_close(converted[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", list(ORIGINALS))
def test_other_channel_and_class_counts_load(name):
    original = ORIGINALS[name](in_channels=2, num_classes=3)
    model = from_original(name, original.state_dict(), in_channels=2, num_classes=3)
    assert model.in_channels == 2 and model.num_classes == 3
    with pytest.raises(ValueError, match=r"shape mismatches"):
        from_original(name, original.state_dict())  # built for 1 / 3 channels, 1 class


@pytest.mark.parametrize("name", list(ORIGINALS))
def test_state_dicts_round_trip(name):
    """fastseg → fastseg, and fastseg → original keys → fastseg, bit for bit (buffers included)."""
    torch.manual_seed(0)
    original = ORIGINALS[name]()
    randomize(original, seed=4)
    model = from_original(name, original.state_dict())
    state = model.state_dict()
    copy = type(model)()
    copy.load_state_dict(state)
    back = from_original(name, to_original(name, copy))
    for key, value in state.items():
        assert torch.equal(back.state_dict()[key], value), key
    assert to_original(name, model).keys() == original.state_dict().keys()
    for key, value in original.state_dict().items():
        assert torch.equal(to_original(name, model)[key], value), key


def test_from_original_names_what_is_wrong():
    state = OriginalLGMSNet().state_dict()
    missing = {k: v for k, v in state.items() if k != "Up4.up.2.running_var"}
    with pytest.raises(ValueError, match=r"missing keys \['Up4\.up\.2\.running_var'\]"):
        from_original("lgmsnet", missing)
    extra = {**state, "Up4.up.9.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys \['Up4\.up\.9\.weight'\]"):
        from_original("lgmsnet", extra)
    wrong = {**state, "Conv_1x1.bias": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"Conv_1x1\.bias: \(2,\) \(expected \(1,\)\)"):
        from_original("lgmsnet", wrong)
    with pytest.raises(ValueError, match=r"name: unknown model 'unet'"):
        from_original("unet", state)
    # A fastseg state_dict is not an original checkpoint: named as such, not loaded silently.
    with pytest.raises(ValueError, match=r"unexpected keys \['stem\.0\.weight'"):
        from_original("lgmsnet", LGMSNet().state_dict())
