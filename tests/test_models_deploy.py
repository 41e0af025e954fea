"""Deployment of the published models: BatchNorm folding (`fuse_for_inference`) and
`torch.compile`."""
import pytest
import torch
from torch import nn

from fastseg.layers import DynamicConv2d
from fastseg.models import LGMSNet, LightAWNet

MODELS = {"lgmsnet": (LGMSNet, 3, 32), "lightawnet": (LightAWNet, 1, 16)}


def calibrated(name, backend, x):
    """A model with non-trivial weights and norms: random BatchNorm affines, running statistics
    of a real batch (with the initial 0/1 statistics LightAWNet's unscaled normal experts grow
    activations to ~1e10 in eval mode), and a non-zero attention γ."""
    cls = MODELS[name][0]
    torch.manual_seed(0)
    model = cls(backend=backend)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
                module.momentum = None  # cumulative average: the statistics of this batch
        if name == "lightawnet":
            model.attention.gamma.fill_(0.5)
        model(x)
    return model.eval()


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fuse_for_inference_keeps_the_outputs(name, backend):
    _, channels, multiple = MODELS[name]
    x = torch.randn(2, channels, 2 * multiple, multiple, generator=torch.Generator().manual_seed(1))
    model = calibrated(name, backend, x)
    norms = {n: m.num_features for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    no_bias = {n: m.out_channels for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d) and m.bias is None}
    before = parameter_count(model)
    with torch.no_grad():
        expected = model(x)
        assert model.fuse_for_inference() is model
        actual = model(x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())

    left = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    modules = dict(model.named_modules())
    if name == "lightawnet":
        # Every norm folds; those after dynamic convs leave their shift as the layer's output_shift.
        assert not left
        dynamic = [m for m in model.modules() if isinstance(m, DynamicConv2d)]
        assert len(dynamic) == 10 and all(m.output_shift is not None for m in dynamic)
        shifts = sum(m.out_channels for m in dynamic)
    else:
        # Only the last norm of each Fusion block (after a GELU, before the next block's
        # upsample and 3×3 conv) stays.
        assert sorted(left) == ["decoder2.8", "decoder3.8", "decoder4.0.8"]
        shifts = 0
    gained_bias = sum(c for n, c in no_bias.items() if modules[n].bias is not None)
    removed = sum(2 * c for n, c in norms.items() if n not in left)
    assert parameter_count(model) == before - removed + gained_bias < before
    assert sum(b.numel() for n, b in model.named_buffers() if n.endswith("output_shift")) == shifts


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fused_model_keeps_the_input_gradient(name, backend):
    """The eval-mode input gradient (saliency maps) survives the folding: the activations it
    leaves in place and the dynamic convs' in-place output shifts keep autograd valid. float64,
    so that no value crosses an activation's kink through the folding's rounding."""
    _, channels, multiple = MODELS[name]
    x = torch.randn(2, channels, multiple, multiple, generator=torch.Generator().manual_seed(1))
    model = calibrated(name, backend, x).double()
    x = x.double().requires_grad_()
    expected, = torch.autograd.grad(model(x).square().sum(), x)
    model.fuse_for_inference()
    actual, = torch.autograd.grad(model(x).square().sum(), x)
    torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-9 * expected.abs().max().item())


@pytest.mark.parametrize("name", list(MODELS))
def test_fuse_for_inference_needs_eval_mode(name):
    model = MODELS[name][0](backend="reference")
    with pytest.raises(RuntimeError, match=r"fuse_for_inference needs eval mode"):
        model.fuse_for_inference()
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # nothing folded


@pytest.mark.parametrize("backend", [pytest.param("reference", marks=pytest.mark.slow), "cpu"])
@pytest.mark.parametrize("name", list(MODELS))
def test_torch_compile_fullgraph(name, backend):
    """One graph for the whole model (no graph breaks), training mode: the compiled model's
    logits and parameter gradients equal eager's."""
    cls, channels, multiple = MODELS[name]
    torch.manual_seed(0)
    model = cls(backend=backend)
    if name == "lightawnet":
        with torch.no_grad():
            model.attention.gamma.fill_(0.5)
    x = torch.randn(2, channels, multiple, multiple, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    results = []
    for run in (model, compiled):
        model.zero_grad()
        y = run(x)
        y.square().mean().backward()
        results.append((y.detach(), [p.grad.clone() for p in model.parameters()]))
    (y_eager, g_eager), (y_comp, g_comp) = results
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-4, atol=1e-4 * y_eager.abs().max().item())
    largest = max(g.abs().max() for g in g_eager)
    for (param, _), a, b in zip(model.named_parameters(), g_comp, g_eager):
        assert (a - b).abs().max() <= 1e-3 * b.abs().max() + 1e-5 * largest, param
