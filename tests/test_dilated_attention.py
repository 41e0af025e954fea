"""dilated_attention2d: every backend against the reference, forward and every gradient."""
import os
import warnings

import pytest
import torch

import fastseg
from fastseg.backend import unavailable_reason
from fastseg.layers import GlobalSelfAttention2d, SparseTransformer2d
from fastseg.ops import dilated_attention2d, dilated_attention2d_reference
from fastseg.ops.dilated_attention import _groups

FUSED = ["cpu", "triton"]


class Case:
    """q, k [N, H, W, heads, d_qk], v [N, H, W, heads, d_v], dilation s, scale."""

    def __init__(self, name, N, H, W, heads, d_qk, d_v, s, scale=None):
        self.name, self.N, self.H, self.W, self.heads = name, N, H, W, heads
        self.d_qk, self.d_v, self.s, self.scale = d_qk, d_v, s, scale

    def __repr__(self):
        return self.name

    @property
    def tokens(self):
        return (self.H // self.s) * (self.W // self.s)

    def inputs(self, dtype=torch.float32, seed=0, magnitude=1.0):
        g = torch.Generator().manual_seed(seed)
        shape = (self.N, self.H, self.W, self.heads)
        q = torch.randn(*shape, self.d_qk, generator=g, dtype=dtype) * magnitude
        k = torch.randn(*shape, self.d_qk, generator=g, dtype=dtype) * magnitude
        v = torch.randn(*shape, self.d_v, generator=g, dtype=dtype)
        return q, k, v


# Group sizes cross the cpu kernels' blocks (16 float32 / 8 float64 query lanes, 64-key blocks)
# and the Triton tiles the tests pick (16 queries/keys/value columns); d = 8 runs the cpu
# kernels' fixed-width path, other widths the general one.
CASES = [
    Case("lgmsnet-s2-72tokens", 2, 18, 16, 2, 8, 8, 2),
    Case("s3-odd-widths-batch1", 1, 9, 12, 3, 5, 7, 3),
    Case("s1-full-81tokens-dqk-ne-dv-scale1", 1, 9, 9, 1, 12, 20, 1, scale=1.0),
    Case("s2-heads1-21tokens", 2, 6, 14, 1, 8, 8, 2),
]
# Small enough for the interpreter (≤ ~50 programs), past every Triton tile at 16.
TRITON_CASES = [
    Case("s2-21tokens-d20-dv20", 1, 6, 14, 1, 20, 20, 2),
    Case("s3-12tokens-heads2", 1, 9, 12, 2, 8, 8, 3, scale=0.7),
    Case("s1-18tokens", 1, 3, 6, 1, 8, 24, 1, scale=1.0),
]


def _qkv_slices(t):
    """As the q (or k, v) slice of one qkv Linear output: dense heads and d, token stride wider."""
    wide = torch.cat([torch.zeros_like(t), t, torch.zeros_like(t)], dim=-2)
    return wide[..., t.shape[-2]:2 * t.shape[-2], :]


LAYOUTS = {
    "contiguous": None,
    "qkv-slices": _qkv_slices,
    # rows and columns swapped in memory: no dimension of the token grid is dense
    "transposed": lambda t: t.transpose(1, 2).contiguous().transpose(1, 2),
    # a last dimension with stride 2 (the fused backends copy it)
    "strided-last": lambda t: torch.stack([t, torch.zeros_like(t)], dim=-1).flatten(-2)[..., ::2],
}


def skip_unless(backend):
    why = unavailable_reason(backend, "cpu")
    if why is not None:
        pytest.skip(why)


def assert_close(actual, expected, rtol, name):
    scale = expected.abs().max().item()
    assert scale > 0, f"{name}: reference is all zeros, the comparison would prove nothing"
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol} × {scale:.3g}"


def grads(fn, case, inputs, layout=None, **kwargs):
    """Output and the gradients of q, k, v for a fixed grad_out."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    args = [layout(t) for t in leaves] if layout is not None else leaves
    out = fn(*args, case.s, case.scale, **kwargs)
    # Drawn in float64 and cast: the same values whatever the dtype of the call.
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64).to(out.device, out.dtype)
    return out, torch.autograd.grad(out, leaves, grad_out)


def check_against_reference(case, backend, dtype=torch.float32, layout=None, rtol=None,
                            magnitude=1.0):
    inputs = case.inputs(dtype, magnitude=magnitude)
    rtol = rtol if rtol is not None else (1e-4 if dtype == torch.float32 else 1e-10)
    out_ref, g_ref = grads(dilated_attention2d_reference, case, inputs, layout)
    out, g = grads(dilated_attention2d, case, inputs, layout, backend=backend)
    assert_close(out, out_ref, rtol, "output")
    for name, a, b in zip("qkv", g, g_ref):
        assert_close(a, b, rtol, "grad " + name)


@pytest.fixture
def small_triton_tiles(monkeypatch):
    """16-wide Triton tiles, so that the test shapes cross every tile boundary."""
    from fastseg.kernels import dilated_attention as kernels

    monkeypatch.setattr(kernels, "attention_config", lambda tokens, d_qk, d_v, dtype:
                        kernels.AttentionConfig(16, 16, max(16, 1 << (d_qk - 1).bit_length()),
                                                16, 4))


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_matches_reference(case, layout, dtype):
    skip_unless("cpu")
    check_against_reference(case, "cpu", dtype, LAYOUTS[layout])


@pytest.mark.parametrize("case", TRITON_CASES, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_matches_reference(case, dtype, small_triton_tiles):
    skip_unless("triton")
    check_against_reference(case, "triton", dtype)


@pytest.mark.parametrize("layout", ["qkv-slices", "transposed", "strided-last"])
def test_triton_layouts(layout, small_triton_tiles):
    skip_unless("triton")
    check_against_reference(TRITON_CASES[0], "triton", layout=LAYOUTS[layout])


def test_triton_default_tiles():
    """The launcher's own tiles (32 queries and keys per tile) on a group past one tile."""
    skip_unless("triton")
    check_against_reference(Case("s2-40tokens", 1, 10, 16, 1, 8, 8, 2), "triton")


def test_reference_is_masked_dense_softmax():
    """The definition, checked against attention over all H·W pixels with the other parity
    groups masked out."""
    case = Case("tiny", 2, 6, 9, 2, 4, 3, 3, scale=0.8)
    q, k, v = case.inputs(torch.float64)
    N, H, W, heads = q.shape[:4]
    r, c = torch.arange(H).repeat_interleave(W), torch.arange(W).repeat(H)
    same_group = ((r[:, None] - r[None, :]) % case.s == 0) & ((c[:, None] - c[None, :]) % case.s == 0)
    flat = lambda t: t.reshape(N, H * W, heads, -1).transpose(1, 2)  # noqa: E731
    scores = (flat(q) @ flat(k).transpose(-1, -2)) * case.scale
    dense = scores.masked_fill(~same_group, float("-inf")).softmax(-1) @ flat(v)
    expected = dense.transpose(1, 2).reshape(N, H, W, heads, -1)
    assert_close(dilated_attention2d_reference(q, k, v, case.s, case.scale), expected, 1e-12,
                 "reference")
    for backend in FUSED:
        if unavailable_reason(backend, "cpu") is None:
            assert_close(dilated_attention2d(q, k, v, case.s, case.scale, backend=backend),
                         expected, 1e-10, backend)


def test_matches_flex_attention_forward():
    """torch's FlexAttention (eager, on CPU) with the parity mask gives the same forward."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    skip_unless("cpu")
    case = Case("flex", 1, 8, 8, 2, 8, 8, 2)
    q, k, v = case.inputs()
    N, H, W, heads = q.shape[:4]

    def parity(b, h, q_idx, kv_idx):
        return (((q_idx // W - kv_idx // W) % case.s) == 0) & (((q_idx % W - kv_idx % W) % case.s) == 0)

    flat = lambda t: t.reshape(N, H * W, heads, -1).transpose(1, 2)  # noqa: E731
    mask = flex.create_block_mask(parity, None, None, H * W, H * W, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it runs unfused
        out = flex.flex_attention(flat(q), flat(k), flat(v), block_mask=mask)
    expected = out.transpose(1, 2).reshape(N, H, W, heads, -1)
    assert_close(dilated_attention2d(q, k, v, case.s, backend="cpu"), expected, 1e-4, "cpu")


@pytest.mark.parametrize("backend", FUSED)
def test_large_scores_are_stable(backend, small_triton_tiles):
    """Scores of magnitude ~1e4 give finite outputs and gradients, equal to the reference's.

    float64: random scores that large (a near one-hot softmax), exactly. float32, where random
    near-ties at 1e4 would make the reference itself ill-conditioned: every score shifted by
    the same 1e4 (q and k share one large component), which the softmax cancels exactly.
    """
    skip_unless(backend)
    case = TRITON_CASES[0] if backend == "triton" else CASES[3]
    q, k, v = case.inputs(torch.float64, magnitude=60.0)
    scores = _groups(q, case.s) @ _groups(k, case.s).transpose(-1, -2)
    assert scores.abs().max() * (case.scale or case.d_qk ** -0.5) > 1e4
    # The gradients of a near one-hot softmax are ~1e-6, differences of terms ~1e2: float64
    # rounding of those terms is 1e-14, so compare at 1e-6 of the gradients' size.
    check_against_reference(case, backend, torch.float64, rtol=1e-6, magnitude=60.0)

    q, k, v = case.inputs(torch.float32)
    shift = (1e4 / case.scale if case.scale else 1e4 * case.d_qk ** 0.5) ** 0.5
    q[..., 0], k[..., 0] = shift, shift
    out_ref, g_ref = grads(dilated_attention2d_reference, case, [t.double() for t in (q, k, v)])
    out, g = grads(dilated_attention2d, case, (q, k, v), backend=backend)
    assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in g)
    # The shifted scores keep float32's ~1e-3 absolute rounding of 1e4, not the 1e-7 of 1. The
    # gradient along the shift (component 0 of q and k) is scale · shift · Σ dS, a cancellation
    # whose rounding the shift amplifies (≈ 8 % of the largest dk in torch's own float32
    # softmax backward; the flash-style D = Σ dO·O rounds apart from the recomputed P):
    # compared without that component.
    assert_close(out.double(), out_ref, 1e-2, "output")
    for name, a, b in zip("qkv", g, g_ref):
        a, b = (a[..., 1:], b[..., 1:]) if name != "v" else (a, b)
        assert_close(a.double(), b, 1e-2, "grad " + name)


@pytest.mark.parametrize("backend", FUSED)
def test_gradcheck_float64(backend, small_triton_tiles):
    skip_unless(backend)
    case = Case("gradcheck", 1, 4, 6, 1, 3, 5, 2, scale=0.9)
    leaves = [t.requires_grad_() for t in case.inputs(torch.float64)]
    fn = lambda q, k, v: dilated_attention2d(q, k, v, case.s, case.scale, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, fast_mode=backend == "triton")


def fused_op(backend):
    return {"cpu": torch.ops.fastseg.dilated_attention2d.default,
            "triton": torch.ops.fastseg.dilated_attention2d_triton.default}[backend]


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend, small_triton_tiles):
    skip_unless(backend)
    q, k, v = Case("opcheck", 1, 4, 6, 2, 8, 5, 2).inputs()
    args = (_qkv_slices(q).requires_grad_(), k.requires_grad_(), v.requires_grad_(), 2, 0.5)
    torch.library.opcheck(fused_op(backend), args)


def test_lse_is_the_log_sum_exp_of_the_scores():
    skip_unless("cpu")
    case = CASES[1]
    q, k, v = case.inputs(torch.float64)
    scale = case.d_qk ** -0.5
    _, lse = torch.ops.fastseg.dilated_attention2d(q, k, v, case.s, scale)
    expected = torch.logsumexp(scale * _groups(q, case.s) @ _groups(k, case.s).transpose(-1, -2), -1)
    N, H, W, heads = q.shape[:4]
    s = case.s
    expected = (expected.reshape(N, s, s, heads, H // s, W // s).permute(0, 4, 1, 5, 2, 3)
                .reshape(N, H, W, heads))
    assert_close(lse, expected, 1e-12, "lse")


# aot_eager checks the capture (fake kernels, autograd, no graph break) in seconds.
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_compile_fullgraph(backend):
    skip_unless(backend)
    torch._dynamo.reset()
    case = Case("compile", 1, 4, 6, 2, 8, 8, 2)
    q, k, v = [t.requires_grad_() for t in case.inputs()]
    fn = torch.compile(lambda q, k, v: dilated_attention2d(q, k, v, 2, backend=backend),
                       fullgraph=True, backend="aot_eager")
    out = fn(q, k, v)
    out.square().sum().backward()
    assert_close(out.detach(), dilated_attention2d_reference(q, k, v, 2).detach(), 1e-4, "output")
    assert q.grad is not None and k.grad is not None and v.grad is not None


def test_cpu_stores_no_score_matrix():
    """No torch allocation during forward + backward is as large as one group's score matrix."""
    skip_unless("cpu")
    case = Case("scores", 1, 64, 64, 1, 8, 8, 2)  # 1,024 tokens per group: 4 MB of scores
    q, k, v = [t.requires_grad_() for t in case.inputs()]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        dilated_attention2d(q, k, v, 2, backend="cpu").sum().backward()
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest < case.tokens ** 2 * 4 // 4, largest


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("change,error", [
    (lambda q, k, v: (q[0], k, v, 2), r"q must have shape \[N, H, W, heads, d\]"),
    (lambda q, k, v: (q, k[..., :3], v, 2), r"k must have q's shape"),
    (lambda q, k, v: (q, k, v[:, :2], 2), r"v must have q's N, H, W, heads"),
    (lambda q, k, v: (q, k.double(), v, 2), r"k has dtype torch.float64 but q has torch.float32"),
    (lambda q, k, v: (q, k, v, 4), r"dilation=4 must divide H=6 and W=8"),
    (lambda q, k, v: (q, k, v, 0), r"dilation must be a positive int"),
    (lambda q, k, v: (q, k, v, True), r"dilation must be a positive int"),
    (lambda q, k, v: (q[:0], k[:0], v[:0], 2), r"q must be non-empty"),
    (lambda q, k, v: (q.int(), k.int(), v.int(), 2), r"q must be a floating-point tensor"),
    (lambda q, k, v: (q.index_fill(1, torch.tensor([1]), float("nan")), k, v, 2),
     r"q contains NaN or inf"),
    (lambda q, k, v: (q, k, v.index_fill(2, torch.tensor([0]), float("inf")), 2),
     r"v contains NaN or inf"),
])
def test_bad_inputs_raise_clear_errors(backend, change, error):
    skip_unless(backend)
    q, k, v = Case("bad", 1, 6, 8, 2, 4, 4, 2).inputs()
    with pytest.raises(ValueError, match=error):
        dilated_attention2d(*change(q, k, v), backend=backend)


def test_bad_scale():
    q, k, v = Case("bad", 1, 6, 8, 2, 4, 4, 2).inputs()
    with pytest.raises(ValueError, match="scale must be a finite number or None"):
        dilated_attention2d(q, k, v, 2, float("inf"))


@pytest.mark.parametrize("change,match", [
    (lambda q, k, v: (q, k, v[..., :1, :], 2), "v must be"),
    (lambda q, k, v: (q, k, v, 3), "must be divisible by dilation=3"),
    (lambda q, k, v: (q, k.double(), v, 2), "k has dtype"),
])
def test_cpp_op_checks_name_the_argument(change, match):
    skip_unless("cpu")
    q, k, v = Case("bad", 1, 6, 8, 2, 4, 4, 2).inputs()
    with pytest.raises(ValueError, match=match):
        torch.ops.fastseg.dilated_attention2d(*change(q, k, v), 0.5)


def test_cpp_backward_checks_lse():
    skip_unless("cpu")
    q, k, v = Case("bad", 1, 6, 8, 2, 4, 4, 2).inputs()
    out, lse = torch.ops.fastseg.dilated_attention2d(q, k, v, 2, 0.5)
    with pytest.raises(ValueError, match="lse must be"):
        torch.ops.fastseg.dilated_attention2d_backward(out, q, k, v, out, lse[..., :1], 2, 0.5)


# --- layers ------------------------------------------------------------------------------------

def _original_sparse_transformer(layer, x):
    """LGMSNet's transformer as its authors wrote it: rearrange into the four parity groups,
    pre-norm attention with matmul + softmax, rearrange back, pre-norm FFN."""
    N, C, H, W = x.shape
    s, heads = layer.dilation, layer.heads
    t = x.reshape(N, C, H // s, s, W // s, s).permute(0, 3, 5, 2, 4, 1).reshape(N, s * s, -1, C)
    q, k, v = layer.to_qkv(layer.norm1(t)).chunk(3, dim=-1)
    q, k, v = (u.reshape(N, s * s, -1, heads, layer.head_dim).transpose(2, 3) for u in (q, k, v))
    attn = torch.softmax(q @ k.transpose(-1, -2) * layer.head_dim ** -0.5, dim=-1)
    t = t + layer.to_out((attn @ v).transpose(2, 3).reshape(N, s * s, -1, heads * layer.head_dim))
    t = t + layer.ffn_out(torch.nn.functional.silu(layer.ffn_in(layer.norm2(t))))
    return t.reshape(N, s, s, H // s, W // s, C).permute(0, 5, 3, 1, 4, 2).reshape(N, C, H, W)


def _original_self_attention(layer, x):
    """LightAWNet's SAGAN attention as its authors wrote it (bmm over all positions)."""
    N, C, H, W = x.shape
    q = layer.query(x).view(N, -1, H * W).permute(0, 2, 1)
    k = layer.key(x).view(N, -1, H * W)
    attention = torch.softmax(torch.bmm(q, k), dim=-1)
    out = torch.bmm(layer.value(x).view(N, -1, H * W), attention.permute(0, 2, 1))
    return layer.gamma * out.view(N, C, H, W) + x


def _assert_grads_close(grads, grads_ref, names):
    """Each gradient to 1e-4 of its size; one that is zero in exact arithmetic (the key bias of
    a softmax over keys: it shifts every score of a row alike) to 1e-6 of the largest one."""
    largest = max(g.abs().max().item() for g in grads_ref)
    for name, a, b in zip(["x", *names], grads, grads_ref):
        if name == "key.bias":
            assert (a - b).abs().max().item() <= 1e-6 * largest, name
        else:
            assert_close(a, b, 1e-4, "grad " + name)


def _layer_grads(layer, x):
    x = x.clone().requires_grad_()
    y = layer(x)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    params = [p for p in layer.parameters()]
    return y, torch.autograd.grad(y, [x, *params], grad_out)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("channels_last", [False, True])
def test_sparse_transformer_matches_original(backend, channels_last, small_triton_tiles):
    skip_unless(backend)
    torch.manual_seed(0)
    layer = SparseTransformer2d(12, 20, heads=2, head_dim=8, dilation=2, backend=backend)
    x = torch.randn(2, 12, 6, 10)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y, g = _layer_grads(layer, x)
    original = lambda x: _original_sparse_transformer(layer, x)  # noqa: E731
    layer_ref = type("Original", (torch.nn.Module,), {"forward": lambda self, x: original(x)})()
    layer_ref.params = torch.nn.ParameterList(layer.parameters())
    y_ref, g_ref = _layer_grads(layer_ref, x)
    assert_close(y, y_ref, 1e-5, "output")
    _assert_grads_close(g, g_ref, [name for name, _ in layer.named_parameters()])


def test_sparse_transformer_parameters_match_lgmsnet():
    """LGMSNet's GMS(…, [96, 32], mlp 256) transformer: the original's shapes, 62,272 params."""
    layer = SparseTransformer2d(96, 256)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {"norm1.weight": (96,), "norm1.bias": (96,), "to_qkv.weight": (96, 96),
                      "to_out.weight": (96, 32), "to_out.bias": (96,), "norm2.weight": (96,),
                      "norm2.bias": (96,), "ffn_in.weight": (256, 96), "ffn_in.bias": (256,),
                      "ffn_out.weight": (96, 256), "ffn_out.bias": (96,)}
    assert sum(p.numel() for p in layer.parameters()) == 62_272


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_global_self_attention_matches_original(backend, small_triton_tiles):
    skip_unless(backend)
    torch.manual_seed(0)
    layer = GlobalSelfAttention2d(16, qk_reduction=8, backend=backend)
    with torch.no_grad():
        layer.gamma.fill_(0.7)  # 0 at init would hide the attention branch
    x = torch.randn(2, 16, 4, 5)
    y, g = _layer_grads(layer, x)
    layer_ref = type("Original", (torch.nn.Module,), {
        "forward": lambda self, x: _original_self_attention(layer, x)})()
    layer_ref.params = torch.nn.ParameterList(layer.parameters())
    y_ref, g_ref = _layer_grads(layer_ref, x)
    assert_close(y, y_ref, 1e-5, "output")
    _assert_grads_close(g, g_ref, [name for name, _ in layer.named_parameters()])


def test_global_self_attention_loads_lightawnet_keys():
    """The original's attention.{gamma, query, key, value} load unchanged: 82,241 parameters."""
    layer = GlobalSelfAttention2d(256)
    assert sum(p.numel() for p in layer.parameters()) == 82_241
    original = {"gamma": torch.tensor([0.5]), "query.weight": torch.randn(32, 256, 1, 1),
                "query.bias": torch.randn(32), "key.weight": torch.randn(32, 256, 1, 1),
                "key.bias": torch.randn(32), "value.weight": torch.randn(256, 256, 1, 1),
                "value.bias": torch.randn(256)}
    layer.load_state_dict(original)
    assert layer.query.weight.dtype == torch.float32
    # float64: with unit-variance weights over 256 channels the unscaled scores reach the
    # hundreds, and the softmax turns float32 rounding differences between two ways of computing
    # the 1×1 projections into 1e-5 of the output.
    layer.double()
    x = torch.randn(1, 256, 4, 4, dtype=torch.float64)
    assert_close(layer(x), _original_self_attention(layer, x), 1e-10, "output")
    assert torch.equal(GlobalSelfAttention2d(8, 2).double()(x[:, :8]), x[:, :8]), "γ = 0 at init"


@pytest.mark.parametrize("make,match", [
    (lambda: SparseTransformer2d(0, 8), "dim must be a positive int"),
    (lambda: SparseTransformer2d(8, 8, heads=2.0), "heads must be a positive int"),
    (lambda: GlobalSelfAttention2d(12, 8), r"channels \(12\) must be divisible by qk_reduction"),
    (lambda: SparseTransformer2d(8, 8, backend="gpu"), "backend must be one of"),
])
def test_layer_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("layer,x,match", [
    (lambda: SparseTransformer2d(8, 8), torch.randn(1, 6, 4, 4), r"x must have shape \[N, 8, H, W\]"),
    (lambda: SparseTransformer2d(8, 8), torch.randn(1, 8, 5, 4), "must be divisible by the dilation 2"),
    (lambda: GlobalSelfAttention2d(16), torch.randn(16, 4, 4), r"x must have shape \[N, 16, H, W\]"),
])
def test_layer_rejects_wrong_inputs(layer, x, match):
    with pytest.raises(ValueError, match=match):
        layer()(x)


def test_layer_state_dicts_identical_across_backends():
    dicts = [SparseTransformer2d(8, 16, backend=b).state_dict() for b in ("reference", "cpu")]
    assert {k: v.shape for k, v in dicts[0].items()} == {k: v.shape for k, v in dicts[1].items()}


# --- CUDA (runs only where a GPU is present) -------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.float16, 1e-2),
                                        (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("case", CASES + TRITON_CASES + [
    Case("lightawnet", 2, 16, 16, 1, 32, 256, 1, scale=1.0),
    Case("lgmsnet-64x64-s2", 2, 64, 64, 4, 8, 8, 2)], ids=repr)
def test_gpu_matches_reference(backend, dtype, rtol, case):
    inputs = [t.cuda() for t in case.inputs(torch.float64)]
    out_ref, g_ref = grads(dilated_attention2d_reference, case, inputs)
    out, g = grads(dilated_attention2d, case, [t.to(dtype) for t in inputs], backend=backend)
    assert_close(out.double(), out_ref, rtol, "output")
    for name, a, b in zip("qkv", g, g_ref):
        assert_close(a.double(), b, rtol, "grad " + name)


def test_cuda_kernels_registered_when_built_with_cuda():
    """CI builds with FASTSEG_CUDA=1: the CUDA sources must have compiled, linked and registered."""
    if os.environ.get("FASTSEG_CUDA") != "1":
        pytest.skip("FASTSEG_CUDA=1 not set: the CUDA build is not required in this run")
    assert fastseg.backend.extension() is not None, "fastseg._C failed to import"
    for op in ("fastseg::dilated_attention2d", "fastseg::dilated_attention2d_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


@pytest.mark.parametrize("layer", ["sparse", "global"])
def test_layers_return_the_input_memory_format(layer):
    """NCHW in, NCHW-contiguous out (a channels-last view would make every NCHW kernel after the
    layer copy its input and its gradient); channels-last in, channels-last out."""
    module = (SparseTransformer2d(32, heads=2, mlp_dim=16, dilation=2) if layer == "sparse"
              else GlobalSelfAttention2d(32))
    x = torch.randn(2, 32, 8, 6)
    assert module(x).is_contiguous()
    y = module(x.contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
