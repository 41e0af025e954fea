"""The published models: exact structure, the registry, input checks, backends that agree."""
import itertools

import pytest
import torch

import fastseg
from fastseg.backend import unavailable_reason
from fastseg.models import LGMSNet, LightAWNet
from fastseg.layers import BatchNormAct2d

LGMSNET_MODULES = {
    "stem": 480, "encoder1": 1_672, "encoder2": 1_960, "encoder3": 6_224, "encoder4": 391_424,
    "encoder5": 538_880, "up5": 147_840, "decoder5": 833_792, "up4": 73_920,
    "decoder4": 262_592, "up3": 18_528, "decoder3": 31_392, "up2": 4_656, "decoder2": 8_016,
    "head": 17, "pool": 0,
}

LIGHTAWNET_MODULES = {
    "encoder1": 696, "encoder2": 22_709, "encoder3": 88_421, "encoder4": 348_869, "side4": 8_320,
    "side5": 33_024, "encoder5": 1_385_861, "attention": 82_241, "skip4": 32_896, "gate": 0,
    "decoder4": 627_844, "decoder3": 157_252, "decoder2": 39_460, "decoder1": 9_940, "head": 646,
    "pool": 0,
}
MODELS = {"lgmsnet": (LGMSNet, 3, 32), "lightawnet": (LightAWNet, 1, 16)}


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_lgmsnet_parameter_counts_match_the_paper():
    model = LGMSNet()
    assert count(model) == 2_321_393
    assert {name: count(child) for name, child in model.named_children()} == LGMSNET_MODULES


def test_lightawnet_parameter_counts_match_the_paper():
    model = LightAWNet()
    assert count(model) == 2_838_179
    assert {name: count(child) for name, child in model.named_children()} == LIGHTAWNET_MODULES


def test_registry():
    assert fastseg.list_models() == ["lgmsnet", "lightawnet"]
    assert isinstance(fastseg.create_model("lightawnet", in_channels=3), LightAWNet)
    model = fastseg.create_model("LGMSNet", num_classes=3)
    assert isinstance(model, LGMSNet) and model.head.out_channels == 3
    with pytest.raises(ValueError, match=r"unknown model 'unet'; known: \['lgmsnet', 'lightawnet'\]"):
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


@pytest.mark.parametrize("x,match", [
    (torch.randn(1, 1, 40, 64), r"LightAWNet needs H and W divisible by 16; got H=40 \(nearest valid: 32 or 48"),
    (torch.randn(1, 3, 64, 64), r"x has 3 channels but the model was built with in_channels=1"),
])
def test_lightawnet_rejects_inputs_it_cannot_take(x, match):
    with pytest.raises(ValueError, match=match):
        LightAWNet(backend="reference")(x)


def _run(model, x, seed=3):
    x = x.clone().requires_grad_()
    y = model(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64).to(y.device, y.dtype)
    grads = torch.autograd.grad(y, [x, *model.parameters()], g)
    return y, grads


def _assert_agree(y, grads, y_ref, grads_ref, reference, rtol):
    """Logits within rtol/20 of the largest reference logit; each gradient (of x, then of
    ``reference``'s parameters in order) within rtol of its largest value plus rtol/20 of the
    largest gradient. In train mode the gradient of a conv bias followed by BatchNorm is zero in
    exact arithmetic (the norm removes any constant): there both sides are rounding noise, hence
    the absolute part."""
    assert (y - y_ref).abs().max() <= rtol / 20 * y_ref.abs().max()
    largest = max(b.abs().max() for b in grads_ref)
    names = ["x"] + [n for n, _ in reference.named_parameters()]
    for param, a, b in zip(names, grads, grads_ref):
        assert (a - b).abs().max() <= rtol * b.abs().max() + rtol / 20 * largest, param


# Under the Triton interpreter every kernel launch is slow: LGMSNet only (≈ 90 s; LightAWNet's
# dynamic convs and gates take > 12 min there, and test_every_fused_layer_gets_the_backend
# covers its wiring), on the smallest input, in train mode only (eval mode normalises with
# running variances estimated from a few pixels at the coarsest stages of so small an input,
# which amplifies float32 rounding past the tolerance).
@pytest.mark.parametrize("name,backend,train", [
    ("lgmsnet", "cpu", False), ("lgmsnet", "cpu", True), ("lightawnet", "cpu", False),
    ("lightawnet", "cpu", True),
    pytest.param("lgmsnet", "triton", True, marks=pytest.mark.slow)])
def test_backends_agree_with_the_reference(name, backend, train, monkeypatch):
    """Same weights, same input: the fused backend's logits and every gradient equal the
    reference backend's, in train mode (batch statistics) and eval mode, on a channels-last
    input. The cpu backend runs in float64, where both must agree to rounding (in float32 the
    BatchNorms of the coarsest stages, normalising over a few pixels, amplify the rounding
    differences of any change of summation order past any tolerance that would still catch a
    bug); Triton in float32 (its kernels' type)."""
    if unavailable_reason(backend, "cpu") is not None:
        pytest.skip(unavailable_reason(backend, "cpu"))
    cls, channels, multiple = MODELS[name]
    dtype = torch.float64 if backend == "cpu" else torch.float32
    rtol = 1e-9 if dtype == torch.float64 else 2e-3
    torch.manual_seed(0)
    reference = cls(in_channels=channels, num_classes=2, backend="reference").to(dtype)
    fused = cls(in_channels=channels, num_classes=2, backend=backend).to(dtype)
    x = (torch.randn(2, channels, 2 * multiple, multiple, dtype=dtype) if backend == "cpu"
         else torch.randn(2, channels, multiple, multiple))
    with torch.no_grad():
        if name == "lightawnet":
            reference.attention.gamma.fill_(0.5)  # γ = 0 at init leaves the attention out
        # Running statistics of a real batch: with the initial ones (0 and 1) eval mode would
        # let LightAWNet's unscaled normal expert init grow activations to ~1e10.
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None
        reference(x)
    fused.load_state_dict(reference.state_dict())
    reference.train(train), fused.train(train)
    y_ref, g_ref = _run(reference, x)
    # every BatchNormAct2d takes the fused op, however small its input
    monkeypatch.setattr(BatchNormAct2d, "min_numel", 0)
    # LGMSNet on the cpu backend computes in channels-last whatever the input's layout
    # (cpu_channels_last); both settings are checked, and which layout its stages ran in
    internal = (True, False) if hasattr(fused, "cpu_channels_last") else (None,)
    seen = []
    hook = next(fused.children()).register_forward_hook(
        lambda module, args, out: seen.append(not out.is_contiguous()
                                              and out.is_contiguous(memory_format=torch.channels_last)))
    for layout, channels_last in itertools.product((torch.channels_last, torch.contiguous_format),
                                                   internal):
        if channels_last is not None:
            fused.cpu_channels_last = channels_last
        y, g = _run(fused, x.contiguous(memory_format=layout))
        assert y.shape == (x.shape[0], 2, *x.shape[2:])
        if channels_last is not None:  # LGMSNet: returned in the input's layout
            assert y.is_contiguous(memory_format=layout)
            assert seen[-1] == ((channels_last and backend == "cpu") or layout == torch.channels_last)
        _assert_agree(y, g, y_ref, g_ref, reference, rtol)
    hook.remove()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("backend", ["reference", "cpu", "cuda", "triton"])
def test_every_fused_layer_gets_the_backend(name, backend):
    """The model's backend reaches every layer that dispatches to fused ops."""
    model = MODELS[name][0](backend=backend)
    fused = [m for m in model.modules() if hasattr(m, "backend") and m is not model]
    kinds = {type(m).__name__ for m in fused}
    expected = ({"MixedDepthwiseConv2d", "SparseTransformer2d"} if name == "lgmsnet" else
                {"DynamicConv2d", "GatedPointwise", "CrossGate", "GlobalSelfAttention2d",
                 "SqueezeExcite", "DepthwiseConv2d"}) | {"PointwiseConv2d", "BatchNormAct2d",
                                                          "MaxPool2x2"}
    assert kinds == expected
    assert all(m.backend == backend for m in fused)
    # every dense 1×1 convolution the model runs as one is a PointwiseConv2d (the GEMM path on
    # the cpu backend); the fused layers' own 1×1 convs only hold their ops' weights
    layers = [n + "." for n, m in model.named_modules() if hasattr(m, "backend") and m is not model]
    plain = [n for n, m in model.named_modules() if type(m) is torch.nn.Conv2d
             and m.kernel_size == (1, 1) and m.groups == 1 and not n.startswith(tuple(layers))]
    assert not plain
    # every BatchNorm followed by ReLU, LeakyReLU or SiLU, or after a GELU, is a BatchNormAct2d
    # (one op on cpu)
    acts = (torch.nn.ReLU, torch.nn.LeakyReLU, torch.nn.SiLU)
    pairs = [(n, i) for n, m in model.named_modules() if isinstance(m, torch.nn.Sequential)
             for i in range(len(m) - 1)
             if type(m[i]) is torch.nn.BatchNorm2d and isinstance(m[i + 1], acts)
             or isinstance(m[i], torch.nn.GELU) and type(m[i + 1]) is torch.nn.BatchNorm2d]
    assert not pairs


@pytest.mark.parametrize("name", list(MODELS))
def test_state_dicts_identical_across_backends(name):
    dicts = [MODELS[name][0](backend=b).state_dict() for b in ("reference", "cpu")]
    assert [(k, v.shape) for k, v in dicts[0].items()] == [(k, v.shape) for k, v in dicts[1].items()]


# --- CUDA (runs only where a GPU is present) -------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name", list(MODELS))
def test_gpu_backends_agree_with_the_reference(name, backend):
    """On a GPU, train mode: the fused backend's logits and every gradient equal the reference
    backend's, both in float64 (as the cpu backend's test: in float32 the train-mode BatchNorms
    of the coarsest stages amplify rounding so much that LGMSNet's float32 reference on the CPU
    is itself 1–6 % off some float64 gradients at 64², depending on the layout and threads; the
    float32 kernels are checked op by op)."""
    cls, channels, _ = MODELS[name]
    torch.manual_seed(0)
    reference = cls(in_channels=channels, num_classes=2, backend="reference").cuda().double()
    fused = cls(in_channels=channels, num_classes=2, backend=backend).cuda().double()
    if name == "lightawnet":
        with torch.no_grad():
            reference.attention.gamma.fill_(0.5)  # γ = 0 at init leaves the attention out
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(2, channels, 64, 64, device="cuda", dtype=torch.float64)
    y_ref, g_ref = _run(reference, x)
    for layout in (torch.contiguous_format, torch.channels_last):
        y, g = _run(fused, x.contiguous(memory_format=layout))
        _assert_agree(y, g, y_ref, g_ref, reference, rtol=1e-9)
