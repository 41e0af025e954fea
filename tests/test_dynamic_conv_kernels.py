"""The Triton kernels of dynamic_conv2d (fastseg.kernels.dynamic_conv) against torch, called directly.

Under the interpreter (no GPU) with 16-wide tiles, so that every case crosses tile boundaries:
more output channels, input channels and pixels than one tile, with a partial last tile, and the
weight gradient's pixels split over several programs. The launch configurations the launchers
pick for the GPU are checked on meta tensors (no data, no GPU), as the static GPU report records
them.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastseg.kernels import dynamic_conv as kernels
from fastseg.kernels._launch import record_launches

SMALL = kernels.ConvConfig(block_m=16, block_p=16, block_k=16, num_warps=4)


def small_weight_grad(splits):
    return kernels.WeightGradConfig(block_co=16, block_ci=16, block_p=16, pixel_splits=splits,
                                    num_warps=4)


def reference(x, experts, routing, bias, stride, padding, dilation, groups):
    """Per-sample conv2d with the mixed kernel Σ_k routing[n, k] · experts[k] (differentiable)."""
    weights = torch.einsum("nk,koihw->noihw", routing, experts)
    y = torch.cat([F.conv2d(x[n:n + 1], weights[n], None, stride, padding, dilation, groups)
                   for n in range(x.shape[0])])
    if bias is not None:
        y = y + (routing @ bias)[:, :, None, None]
    return y


def make_inputs(N, C_in, C_out, H, W, kernel, K, groups, bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C_in, H, W, generator=g, dtype=dtype)
    experts = torch.randn(K, C_out, C_in // groups, *kernel, generator=g, dtype=dtype)
    routing = torch.rand(N, K, generator=g, dtype=dtype)
    b = torch.randn(K, C_out, generator=g, dtype=dtype) if bias else None
    return x, experts, routing, b


def reference_grads(inputs, conv, grad_out):
    leaves = [t.detach().double().requires_grad_() for t in inputs if t is not None]
    x, experts, routing, *rest = leaves
    y = reference(x, experts, routing, rest[0] if rest else None, *conv)
    grads = torch.autograd.grad(y, leaves, grad_out.double())
    if not rest:  # without a bias its gradient is still Σ_n routing[n, k] · Σ_hw grad_out_n
        grads = (*grads, routing.detach().t() @ grad_out.double().sum((2, 3)))
    return y.detach(), grads


def assert_close(actual, expected, rtol, name):
    scale = expected.abs().max().item()
    assert scale > 0, f"{name}: reference is all zeros, the comparison would prove nothing"
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = (actual.double() - expected).abs().max().item()
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol} × {scale:.3g}"


def programs(launch_fn):
    """Largest number of programs of any launch ``launch_fn`` makes (recorded, not run)."""
    with record_launches() as launches:
        launch_fn()
    return max(math.prod(launch.grid) for launch in launches)


# (N, C_in, C_out, H, W, (kh, kw), K, stride, padding, dilation, groups, bias, splits)
CASES = {
    # 17 output and 17 input channels: two channel tiles each, the second partial; 5×4 = 20
    # pixels: two pixel tiles, the second partial, in two weight-gradient splits; K = 3 experts.
    "tiles": (2, 17, 17, 5, 4, (3, 3), 3, (1, 1), (1, 1), (1, 1), 1, True, 2),
    "stride2": (2, 5, 6, 7, 6, (3, 3), 4, (2, 2), (1, 1), (1, 1), 1, False, 1),
    "dilation2_unpadded": (1, 3, 5, 8, 7, (3, 3), 2, (1, 1), (0, 0), (2, 2), 1, True, 1),
    "nonsquare_mixed": (2, 4, 6, 7, 8, (3, 2), 2, (2, 1), (1, 0), (1, 2), 2, False, 2),
    "groups": (2, 6, 8, 5, 5, (1, 3), 3, (1, 2), (0, 1), (1, 1), 2, True, 1),
    "depthwise": (1, 4, 4, 6, 5, (3, 3), 2, (1, 1), (1, 1), (1, 1), 4, True, 1),
    "one_output_channel": (2, 5, 1, 6, 5, (3, 3), 4, (1, 1), (1, 1), (1, 1), 1, False, 2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_backward_match_torch(case, dtype):
    *shape, stride, padding, dilation, groups, bias, splits = CASES[case]
    N, C_in, C_out, H, W, kernel, K = shape
    x, experts, routing, b = make_inputs(N, C_in, C_out, H, W, kernel, K, groups, bias, dtype)
    conv = (stride, padding, dilation, groups)
    tiles = dict(input_grad_tiles=SMALL, weight_grad_tiles=small_weight_grad(splits))
    y = kernels.forward(x, experts, routing, b, *conv, tiles=SMALL)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    grads = kernels.backward(grad_out, x, experts, routing, b, *conv, **tiles)

    y_ref, grads_ref = reference_grads((x, experts, routing, b), conv, grad_out)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_close(y, y_ref, rtol, "output")
    for name, actual, expected in zip(("x", "experts", "routing", "bias"), grads, grads_ref):
        assert actual.dtype == dtype
        assert_close(actual, expected, rtol, "grad " + name)

    # ≈ 100 programs per launch keep the interpreter fast.
    assert programs(lambda: kernels.forward(x, experts, routing, b, *conv, tiles=SMALL)) <= 128
    assert programs(lambda: kernels.backward(grad_out, x, experts, routing, b, *conv,
                                             **tiles)) <= 128


def test_default_configs_match_torch():
    """The tiles the launchers pick by themselves (larger than one tile's worth of work here)."""
    x, experts, routing, b = make_inputs(2, 3, 5, 13, 11, (3, 3), 4, 1, True, torch.float32)
    conv = ((1, 1), (1, 1), (1, 1), 1)
    grad_out = torch.randn(2, 5, 13, 11, generator=torch.Generator().manual_seed(1))
    y_ref, grads_ref = reference_grads((x, experts, routing, b), conv, grad_out)
    assert_close(kernels.forward(x, experts, routing, b, *conv), y_ref, 1e-5, "output")
    grads = kernels.backward(grad_out, x, experts, routing, b, *conv)
    for name, actual, expected in zip(("x", "experts", "routing", "bias"), grads, grads_ref):
        assert_close(actual, expected, 1e-5, "grad " + name)


def test_float16_accumulates_in_float32():
    """(bfloat16 cannot run here: the interpreter multiplies its tl.dot operands as integers.)"""
    dtype = torch.float16
    x, experts, routing, b = make_inputs(2, 17, 17, 5, 4, (3, 3), 3, 1, True, dtype)
    conv = ((1, 1), (1, 1), (1, 1), 1)
    grad_out = torch.randn(2, 17, 5, 4, generator=torch.Generator().manual_seed(1), dtype=dtype)
    y_ref, grads_ref = reference_grads((x, experts, routing, b), conv, grad_out)
    y = kernels.forward(x, experts, routing, b, *conv, tiles=SMALL)
    assert y.dtype == dtype
    assert_close(y, y_ref, 1e-2, "output")
    grads = kernels.backward(grad_out, x, experts, routing, b, *conv, input_grad_tiles=SMALL,
                             weight_grad_tiles=small_weight_grad(2))
    for name, actual, expected in zip(("x", "experts", "routing", "bias"), grads, grads_ref):
        assert actual.dtype == dtype
        assert_close(actual, expected, 1e-2, "grad " + name)


LAYOUTS = {
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    # every other column of a tensor twice as wide
    "strided": lambda t: torch.stack([t, torch.zeros_like(t)], dim=-1).flatten(-2)[..., ::2],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts(layout):
    x, experts, routing, b = make_inputs(2, 5, 6, 5, 4, (3, 3), 2, 1, True, torch.float64)
    conv = ((1, 1), (1, 1), (1, 1), 1)
    grad_out = torch.randn(2, 6, 5, 4, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64)
    y_ref, grads_ref = reference_grads((x, experts, routing, b), conv, grad_out)
    to_layout = LAYOUTS[layout]
    if layout == "strided":  # the parameters as non-contiguous views too
        experts = experts.transpose(1, 2).contiguous().transpose(1, 2)
        routing, b = routing.t().contiguous().t(), b.t().contiguous().t()
        assert not (experts.is_contiguous() or routing.is_contiguous() or b.is_contiguous())
    y = kernels.forward(to_layout(x), experts, routing, b, *conv, tiles=SMALL)
    grads = kernels.backward(to_layout(grad_out), to_layout(x), experts, routing, b, *conv,
                             input_grad_tiles=SMALL, weight_grad_tiles=small_weight_grad(1))
    assert_close(y, y_ref, 1e-12, "output")
    for name, actual, expected in zip(("x", "experts", "routing", "bias"), grads, grads_ref):
        assert_close(actual, expected, 1e-12, "grad " + name)
    channels_last = layout == "channels_last"
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert grads[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    assert grads[1].is_contiguous()


def test_block_sizes_below_dot_minimum_are_rejected():
    x, experts, routing, b = make_inputs(1, 4, 4, 5, 5, (3, 3), 2, 1, False, torch.float32)
    with pytest.raises(ValueError, match="block_p must be a power of two >= 16"):
        kernels.forward(x, experts, routing, b, (1, 1), (1, 1), (1, 1), 1,
                        tiles=kernels.ConvConfig(16, 8, 16, 4))
    with pytest.raises(ValueError, match="block_ci must be a power of two >= 16"):
        kernels.backward(torch.ones(1, 4, 5, 5), x, experts, routing, b, (1, 1), (1, 1),
                         (1, 1), 1, weight_grad_tiles=kernels.WeightGradConfig(16, 24, 16, 1, 4))


# --- the launch configurations picked for the GPU (recorded on meta tensors) -------------------

# Every dynamic conv of LightAWNet: (C_in, C_out, resolution divisor), at 128² and 256², batch 8.
MODEL_LAYERS = [(1, 16, 1), (16, 32, 2), (32, 64, 4), (64, 128, 8), (128, 256, 16),
                (16, 16, 1), (32, 32, 2), (64, 64, 4), (128, 128, 8), (256, 256, 16), (16, 1, 1)]


def model_launches(dtype):
    for size in (128, 256):
        for C_in, C_out, divisor in MODEL_LAYERS:
            side = size // divisor
            x = torch.empty(8, C_in, side, side, dtype=dtype, device="meta")
            experts = torch.empty(4, C_out, C_in, 3, 3, dtype=dtype, device="meta")
            routing = torch.empty(8, 4, dtype=dtype, device="meta")
            grad_out = torch.empty(8, C_out, side, side, dtype=dtype, device="meta")
            with record_launches() as launches:
                kernels.forward(x, experts, routing, None, (1, 1), (1, 1), (1, 1), 1)
                grads = kernels.backward(grad_out, x, experts, routing, None, (1, 1), (1, 1),
                                         (1, 1), 1)
            yield (C_in, C_out, side), launches, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d)[6:])
def test_model_shapes_launch_on_meta_tensors(dtype):
    for (C_in, C_out, side), launches, grads in model_launches(dtype):
        assert [launch.kernel.fn.__name__ for launch in launches] == [
            "_dynamic_conv_forward_kernel", "_dynamic_conv_input_grad_kernel",
            "_dynamic_conv_weight_grad_kernel"]
        assert [g.shape for g in grads] == [(8, C_in, side, side), (4, C_out, C_in, 3, 3),
                                            (8, 4), (4, C_out)]
        forward, input_grad, weight_grad = launches
        assert forward.grid[0] == 8 * math.ceil(side * side / forward.constexprs["BLOCK_P"]) * \
            math.ceil(C_out / forward.constexprs["BLOCK_CO"])
        assert input_grad.grid[0] == 8 * math.ceil(side * side / input_grad.constexprs["BLOCK_P"]) * \
            math.ceil(C_in / input_grad.constexprs["BLOCK_CI"])
        tiles, splits = weight_grad.grid
        assert tiles == math.ceil(C_out / weight_grad.constexprs["BLOCK_CO"]) * 9 * \
            math.ceil(C_in / weight_grad.constexprs["BLOCK_CI"])
        # Pixels are split until a large GPU has enough programs, each split keeping at least
        # four pixel tiles of every sample.
        pixel_tiles = math.ceil(side * side / weight_grad.constexprs["BLOCK_P"])
        assert 1 <= splits <= pixel_tiles
        assert tiles * splits >= 256 or splits >= pixel_tiles // 4
        for launch in launches:
            assert launch.num_warps in (2, 4, 8)
            for name, value in launch.constexprs.items():
                if name.startswith("BLOCK"):
                    assert value >= 16 and value & (value - 1) == 0, (name, value)
            assert launch.constexprs["ACC_DTYPE"].primitive_bitwidth == 32
        # fp32 products keep float32 accuracy on tensor cores; half precision runs natively.
        assert forward.constexprs["DOT_PRECISION"] == ("tf32x3" if dtype == torch.float32
                                                       else "ieee")


def test_configs_cover_small_and_large_layers():
    for kernel in ("forward", "input_grad"):
        wide = kernels.conv_config(kernel, 256, 256, 16 * 16, torch.float16)
        narrow = kernels.conv_config(kernel, 1, 16, 256 * 256, torch.float16)
        assert wide.block_m > narrow.block_m and narrow.block_p > wide.block_p
        # Never more pixels per program than the image has (but tl.dot's 16 at least).
        assert kernels.conv_config(kernel, 16, 16, 20, torch.float32).block_p == 32
    # A 16→16 layer at 256² has 9 weight tiles: its pixels are split for parallelism.
    assert kernels.weight_grad_config(16, 16, 9, 1, 256 * 256, torch.float16).pixel_splits > 1
    # A 256→256 layer at 8² has hundreds of weight tiles and few pixels: no split.
    assert kernels.weight_grad_config(256, 256, 9, 1, 8 * 8, torch.float16).pixel_splits == 1
