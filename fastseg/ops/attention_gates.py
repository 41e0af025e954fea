"""Fused attention gates: LightAWNet's spatial, channel (squeeze-excitation) and cross-branch gates
and the Attention U-Net additive gate.

Each gate is a chain of cheap elementwise and reduction steps that eager PyTorch runs as several
passes over the same large tensors; the fused kernels read each input and write each output about
once, and their backward recomputes the cheap intermediates instead of storing them.

* :func:`spatial_gate` ``x ⊙ σ(w·x + b)`` (one gate value per pixel);
* :func:`gated_pointwise` ``W_a·a + σ(w_s·a + b_s) ⊙ (W_b·a) + bias``: LightAWNet's
  "spatial attention → concat[a, a·s] → 1×1 conv" without the concat or the ``a·s`` tensor;
* :func:`channel_gate` squeeze-excitation ``z ⊙ σ(W2·ReLU(W1·GAP(z))) (+ skip)`` with
  ``z = x`` or, fused, the bilinear ×2 upsample of ``x`` (LightAWNet's decoder);
* :func:`cross_gate` ``a ⊙ σ(resize_bilinear(b → a's H, W))`` (LightAWNet's two-branch gating);
* :func:`attention_gate` ``x ⊙ σ(psi·ReLU(W_x·x + W_g·g + b) + psi_b)`` (MONAI's AttentionBlock
  with its BatchNorms folded away).

Backends: ``reference`` (the definitions below), ``cpu`` and ``cuda`` (``fastseg._C``), ``triton``
(``fastseg.kernels.attention_gates``). 1×1 projections are 2-D ``[out, in]`` matrices (an
``nn.Conv2d(in, out, 1)`` weight viewed as ``[out, in]``, or an ``nn.Linear`` weight).

Layouts: the fused kernels compute on NCHW-contiguous data; channels-last or non-contiguous inputs
are copied once to NCHW on entry, and outputs come back in the (first) input's memory format.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._layout import empty_like_output
from ..backend import resolve_backend
from ._registry import autocast_inputs, check_finite, cpp_op, register_cpp

__all__ = ["spatial_gate", "gated_pointwise", "channel_gate", "cross_gate", "attention_gate",
           "spatial_gate_reference", "gated_pointwise_reference", "channel_gate_reference",
           "cross_gate_reference", "attention_gate_reference"]


# --- the definitions ---------------------------------------------------------------------------

def _pointwise(x, w, b=None):
    return F.conv2d(x, w[:, :, None, None], b)


def spatial_gate_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x ``[N, C, H, W]``, w ``[1, C]``, b ``[1]`` → ``x ⊙ σ(w·x + b)`` ``[N, C, H, W]``."""
    return x * torch.sigmoid(_pointwise(x, w, b))


def gated_pointwise_reference(a: torch.Tensor, w_s: torch.Tensor, b_s: torch.Tensor,
                              w_a: torch.Tensor, w_b: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LightAWNet's original: ``s = σ(w_s·a + b_s)``, ``PW_{[W_a | W_b]}(concat[a, a·s]) + bias``.

    a ``[N, C_in, H, W]``; w_s ``[1, C_in]``; b_s ``[1]``; w_a, w_b ``[C_out, C_in]``;
    bias ``[C_out]``. Returns ``[N, C_out, H, W]``.
    """
    s = torch.sigmoid(_pointwise(a, w_s, b_s))
    return _pointwise(torch.cat([a, a * s], 1), torch.cat([w_a, w_b], 1), bias)


def channel_gate_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                           skip: Optional[torch.Tensor] = None, upsample: bool = False) -> torch.Tensor:
    """Squeeze-excitation ``z ⊙ σ(W2·ReLU(W1·GAP(z))) (+ skip)``, ``z = x`` or ``up×2(x)``.

    x ``[N, C, h, w]``; w1 ``[C_r, C]``; w2 ``[C, C_r]``; with ``upsample`` z is the bilinear ×2
    upsample of x (align_corners=False), ``[N, C, 2h, 2w]``; skip like z. Returns z's shape.
    """
    if upsample:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    gate = torch.sigmoid(F.linear(F.relu(F.linear(x.mean((2, 3)), w1)), w2))
    y = x * gate[:, :, None, None]
    return y + skip if skip is not None else y


def cross_gate_reference(a: torch.Tensor, b: torch.Tensor, align_corners: bool = True) -> torch.Tensor:
    """a ``[N, C, H, W]``, b ``[N, C, h, w]`` → ``a ⊙ σ(bilinear_resize(b → H, W))``."""
    if b.shape[-2:] != a.shape[-2:]:
        b = F.interpolate(b, size=a.shape[-2:], mode="bilinear", align_corners=align_corners)
    return a * torch.sigmoid(b)


def attention_gate_reference(x: torch.Tensor, g: torch.Tensor, w_x: torch.Tensor, w_g: torch.Tensor,
                             b: torch.Tensor, psi_w: torch.Tensor, psi_b: torch.Tensor) -> torch.Tensor:
    """Attention U-Net gate ``x ⊙ σ(psi_w·ReLU(W_x·x + W_g·g + b) + psi_b)``.

    x ``[N, C_x, H, W]``; g ``[N, C_g, H, W]``; w_x ``[C_i, C_x]``; w_g ``[C_i, C_g]``; b ``[C_i]``;
    psi_w ``[1, C_i]``; psi_b ``[1]``. Returns ``[N, C_x, H, W]``.
    """
    q = F.relu(_pointwise(x, w_x) + _pointwise(g, w_g, b))
    return x * torch.sigmoid(_pointwise(q, psi_w, psi_b))


# --- argument checks ---------------------------------------------------------------------------

def _check_feature(name, t, like=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape [N, C, H, W], got {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if like is not None:
        _check_same(name, t, like)


def _check_same(name, t, like):
    if t.dtype != like.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but the input has {like.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {like.device}")


def _check_param(name, t, shape, like):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    _check_same(name, t, like)


def _check_finite(named, backend):
    """NaN/inf check of every argument, except the feature maps the cpu kernels check themselves
    while they read them (``named``: ``(name, tensor, checked_by_cpu_kernel)``)."""
    check_finite([(name, t) for name, t, in_kernel in named if not (in_kernel and backend == "cpu")])


# --- custom ops: C++ (cpu, cuda) and Triton, one schema each -------------------------------------

# Forward and backward schemas; csrc/ops.cpp declares the same ones for the C++ ops, and the Triton
# ops are these with the suffix _triton.
SCHEMAS = {
    "spatial_gate": ("(Tensor x, Tensor w, Tensor b) -> Tensor",
                     "(Tensor grad_out, Tensor x, Tensor w, Tensor b) -> (Tensor, Tensor, Tensor)"),
    "gated_pointwise": (
        "(Tensor a, Tensor w_s, Tensor b_s, Tensor w_a, Tensor w_b, Tensor bias) -> Tensor",
        "(Tensor grad_out, Tensor a, Tensor w_s, Tensor b_s, Tensor w_a, Tensor w_b)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"),
    "channel_gate": ("(Tensor x, Tensor w1, Tensor w2, Tensor? skip, bool upsample) -> Tensor",
                     "(Tensor grad_out, Tensor x, Tensor w1, Tensor w2, bool upsample)"
                     " -> (Tensor, Tensor, Tensor)"),
    "cross_gate": ("(Tensor a, Tensor b, bool align_corners) -> Tensor",
                   "(Tensor grad_out, Tensor a, Tensor b, bool align_corners) -> (Tensor, Tensor)"),
    "attention_gate": (
        "(Tensor x, Tensor g, Tensor w_x, Tensor w_g, Tensor b, Tensor psi_w, Tensor psi_b) -> Tensor",
        "(Tensor grad_out, Tensor x, Tensor g, Tensor w_x, Tensor w_g, Tensor b, Tensor psi_w,"
        " Tensor psi_b) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"),
}


def _params_like(*ts):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in ts)


def _upsampled(x, upsample):
    N, C, H, W = x.shape
    return (N, C, 2 * H, 2 * W) if upsample else (N, C, H, W)


# Fake (meta) implementations: shapes and memory formats only.
_FAKES = {
    "spatial_gate": (lambda x, w, b: empty_like_output(x),
                     lambda gy, x, w, b: (empty_like_output(x), *_params_like(w, b))),
    "gated_pointwise": (
        lambda a, w_s, b_s, w_a, w_b, bias: empty_like_output(
            a, (a.shape[0], w_a.shape[0], *a.shape[2:])),
        lambda gy, a, w_s, b_s, w_a, w_b: (empty_like_output(a),
                                           *_params_like(w_s, b_s, w_a, w_b, w_a[:, 0]))),
    "channel_gate": (lambda x, w1, w2, skip, up: empty_like_output(x, _upsampled(x, up)),
                     lambda gy, x, w1, w2, up: (empty_like_output(x), *_params_like(w1, w2))),
    "cross_gate": (lambda a, b, ac: empty_like_output(a),
                   lambda gy, a, b, ac: (empty_like_output(a), empty_like_output(b))),
    "attention_gate": (
        lambda x, g, w_x, w_g, b, psi_w, psi_b: empty_like_output(x),
        lambda gy, x, g, w_x, w_g, b, psi_w, psi_b: (
            empty_like_output(x), empty_like_output(g), *_params_like(w_x, w_g, b, psi_w, psi_b))),
}


def _save_all(ctx, inputs, output):
    """Backward recomputes from the inputs; tensors are saved, flags kept on ctx."""
    ctx.save_for_backward(*[t for t in inputs if isinstance(t, torch.Tensor)])
    ctx.flags = [t for t in inputs if isinstance(t, bool)]


def _save_channel_gate(ctx, inputs, output):
    x, w1, w2, skip, upsample = inputs
    ctx.save_for_backward(x, w1, w2)
    ctx.upsample, ctx.has_skip = upsample, skip is not None


def _backwards(ops):
    """autograd backward of each op from its backward custom op ``ops[name]``."""
    def spatial_gate(ctx, gy):
        return ops["spatial_gate"](gy, *ctx.saved_tensors)

    def gated_pointwise(ctx, gy):
        a, w_s, b_s, w_a, w_b, bias = ctx.saved_tensors
        return ops["gated_pointwise"](gy, a, w_s, b_s, w_a, w_b)

    def channel_gate(ctx, gy):
        gx, gw1, gw2 = ops["channel_gate"](gy, *ctx.saved_tensors, ctx.upsample)
        return gx, gw1, gw2, (gy if ctx.has_skip else None), None

    def cross_gate(ctx, gy):
        return (*ops["cross_gate"](gy, *ctx.saved_tensors, *ctx.flags), None)

    def attention_gate(ctx, gy):
        return ops["attention_gate"](gy, *ctx.saved_tensors)

    return {"spatial_gate": spatial_gate, "gated_pointwise": gated_pointwise,
            "channel_gate": channel_gate, "cross_gate": cross_gate, "attention_gate": attention_gate}


_SETUP = {name: _save_all for name in SCHEMAS}
_SETUP["channel_gate"] = _save_channel_gate


def _triton_impl(name, backward):
    def impl(*args):
        from fastseg.kernels import attention_gates as kernels
        return getattr(kernels, name + ("_backward" if backward else "_forward"))(*args)
    return impl


_TRITON_FWD, _TRITON_BWD = {}, {}
for _name, (_fwd_schema, _bwd_schema) in SCHEMAS.items():
    _TRITON_FWD[_name] = torch.library.custom_op(f"fastseg::{_name}_triton", _triton_impl(_name, False),
                                                 mutates_args=(), schema=_fwd_schema)
    _TRITON_BWD[_name] = torch.library.custom_op(f"fastseg::{_name}_triton_backward",
                                                 _triton_impl(_name, True), mutates_args=(),
                                                 schema=_bwd_schema)
    _TRITON_FWD[_name].register_fake(_FAKES[_name][0])
    _TRITON_BWD[_name].register_fake(_FAKES[_name][1])

_CPP_BWD = {name: cpp_op(name + "_backward") for name in SCHEMAS}
for _name, _backward in _backwards(_TRITON_BWD).items():
    _TRITON_FWD[_name].register_autograd(_backward, setup_context=_SETUP[_name])
for _name, _backward in _backwards(_CPP_BWD).items():
    register_cpp(_name, *_FAKES[_name], _SETUP[_name], _backward)


_CPP_FWD = {name: cpp_op(name) for name in SCHEMAS}


def _fused(name, backend):
    return _TRITON_FWD[name] if backend == "triton" else _CPP_FWD[name]


# --- public API --------------------------------------------------------------------------------

@autocast_inputs
def spatial_gate(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, *,
                 backend: str = "auto") -> torch.Tensor:
    """Spatial gate ``x ⊙ σ(w·x + b)``: every channel of a pixel scaled by one gate value.

    Args:
        x: ``[N, C, H, W]``.
        w: ``[1, C]`` (a ``Conv2d(C, 1, 1)`` weight as a matrix); b: ``[1]``.
        backend: ``"auto"`` or ``reference``/``cpu``/``cuda``/``triton``.

    Returns:
        ``[N, C, H, W]`` in x's memory format; differentiable in x, w and b.

    Raises:
        ValueError: naming the argument (shapes, dtypes, devices, empty or non-finite inputs).
    """
    _check_feature("x", x)
    C = x.shape[1]
    _check_param("w", w, (1, C), x)
    _check_param("b", b, (1,), x)
    chosen = resolve_backend(backend, x.device, x.dtype)
    _check_finite([("x", x, True), ("w", w, False), ("b", b, False)], chosen)
    if chosen == "reference":
        return spatial_gate_reference(x, w, b)
    return _fused("spatial_gate", chosen)(x, w, b)


@autocast_inputs
def gated_pointwise(a: torch.Tensor, w_s: torch.Tensor, b_s: torch.Tensor, w_a: torch.Tensor,
                    w_b: torch.Tensor, bias: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``h = W_a·a + s ⊙ (W_b·a) + bias`` with ``s = σ(w_s·a + b_s)``, in one op.

    Equal to LightAWNet's ``PW_{2C→C_out}(concat[a, a·s])`` with the 1×1 weight split as
    ``[W_a | W_b]``, without materialising the concat or ``a·s``.

    Args:
        a: ``[N, C_in, H, W]``.
        w_s: ``[1, C_in]``, b_s: ``[1]``: the one-channel spatial attention map's 1×1 conv.
        w_a, w_b: ``[C_out, C_in]``; bias: ``[C_out]``.
        backend: ``"auto"`` or ``reference``/``cpu``/``cuda``/``triton``.

    Returns:
        ``[N, C_out, H, W]`` in a's memory format; differentiable in every argument.

    Raises:
        ValueError: naming the argument (shapes, dtypes, devices, empty or non-finite inputs).
    """
    _check_feature("a", a)
    C_in = a.shape[1]
    _check_param("w_s", w_s, (1, C_in), a)
    _check_param("b_s", b_s, (1,), a)
    if not isinstance(w_a, torch.Tensor) or w_a.dim() != 2 or w_a.shape[1] != C_in or w_a.shape[0] == 0:
        shape = list(w_a.shape) if isinstance(w_a, torch.Tensor) else type(w_a).__name__
        raise ValueError(f"w_a must have shape [C_out, {C_in}], got {shape}")
    C_out = w_a.shape[0]
    _check_param("w_a", w_a, (C_out, C_in), a)
    _check_param("w_b", w_b, (C_out, C_in), a)
    _check_param("bias", bias, (C_out,), a)
    chosen = resolve_backend(backend, a.device, a.dtype)
    _check_finite([("a", a, False), ("w_s", w_s, False), ("b_s", b_s, False), ("w_a", w_a, False),
                   ("w_b", w_b, False), ("bias", bias, False)], chosen)
    if chosen == "reference":
        return gated_pointwise_reference(a, w_s, b_s, w_a, w_b, bias)
    return _fused("gated_pointwise", chosen)(a, w_s, b_s, w_a, w_b, bias)


@autocast_inputs
def channel_gate(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                 skip: Optional[torch.Tensor] = None, upsample: bool = False, *,
                 backend: str = "auto") -> torch.Tensor:
    """Squeeze-excitation channel gate with optional fused bilinear ×2 upsample and skip add.

    ``z = up×2(x)`` (bilinear, align_corners=False) if ``upsample`` else ``x``;
    ``y = z ⊙ σ(W2·ReLU(W1·GAP(z))) (+ skip)``. With ``upsample`` the upsampled tensor is
    never materialised apart from the output (LightAWNet's decoder: upsample → SE → + skip).

    Args:
        x: ``[N, C, h, w]``.
        w1: ``[C_r, C]``, w2: ``[C, C_r]`` (bias-free ``nn.Linear`` weights).
        skip: ``None`` or z's shape ``[N, C, H, W]`` (``H, W = 2h, 2w`` with ``upsample``).
        upsample: fuse the bilinear ×2 upsample of x.
        backend: ``"auto"`` or ``reference``/``cpu``/``cuda``/``triton``.

    Returns:
        z's shape, in x's memory format; differentiable in x, w1, w2 and skip.

    Raises:
        ValueError: naming the argument (shapes, dtypes, devices, empty or non-finite inputs).
    """
    _check_feature("x", x)
    C = x.shape[1]
    if not isinstance(w1, torch.Tensor) or w1.dim() != 2 or w1.shape[1] != C or w1.shape[0] == 0:
        shape = list(w1.shape) if isinstance(w1, torch.Tensor) else type(w1).__name__
        raise ValueError(f"w1 must have shape [C_r, {C}], got {shape}")
    _check_param("w1", w1, tuple(w1.shape), x)
    _check_param("w2", w2, (C, w1.shape[0]), x)
    out_shape = _upsampled(x, bool(upsample))
    if skip is not None:
        _check_feature("skip", skip, x)
        if tuple(skip.shape) != out_shape:
            raise ValueError(f"skip must have shape {list(out_shape)} (x's"
                             f"{' upsampled' if upsample else ''} shape), got {list(skip.shape)}")
    chosen = resolve_backend(backend, x.device, x.dtype)
    _check_finite([("x", x, True), ("w1", w1, False), ("w2", w2, False), ("skip", skip, True)],
                  chosen)
    if chosen == "reference":
        return channel_gate_reference(x, w1, w2, skip, upsample)
    return _fused("channel_gate", chosen)(x, w1, w2, skip, bool(upsample))


@autocast_inputs
def cross_gate(a: torch.Tensor, b: torch.Tensor, align_corners: bool = True, *,
               backend: str = "auto") -> torch.Tensor:
    """Cross-branch gate ``a ⊙ σ(resize_bilinear(b → a's H, W))``.

    Args:
        a: ``[N, C, H, W]``; b: ``[N, C, h, w]`` (any size; same size is the plain
            ``a ⊙ σ(b)``).
        align_corners: of the bilinear resize (LightAWNet uses True).
        backend: ``"auto"`` or ``reference``/``cpu``/``cuda``/``triton``.

    Returns:
        ``[N, C, H, W]`` in a's memory format; differentiable in a and b.

    Raises:
        ValueError: naming the argument (shapes, dtypes, devices, empty or non-finite inputs).
    """
    _check_feature("a", a)
    _check_feature("b", b, a)
    if b.shape[:2] != a.shape[:2]:
        raise ValueError(f"b must have a's batch and channels {list(a.shape[:2])}, "
                         f"got {list(b.shape[:2])}")
    chosen = resolve_backend(backend, a.device, a.dtype)
    _check_finite([("a", a, True), ("b", b, True)], chosen)
    if chosen == "reference":
        return cross_gate_reference(a, b, align_corners)
    return _fused("cross_gate", chosen)(a, b, bool(align_corners))


@autocast_inputs
def attention_gate(x: torch.Tensor, g: torch.Tensor, w_x: torch.Tensor, w_g: torch.Tensor,
                   b: torch.Tensor, psi_w: torch.Tensor, psi_b: torch.Tensor, *,
                   backend: str = "auto") -> torch.Tensor:
    """Attention U-Net additive gate ``x ⊙ σ(psi_w·ReLU(W_x·x + W_g·g + b) + psi_b)``.

    Args:
        x: ``[N, C_x, H, W]`` (the skip features that are gated).
        g: ``[N, C_g, H, W]`` (the gating signal, already at x's resolution).
        w_x: ``[C_i, C_x]``; w_g: ``[C_i, C_g]``; b: ``[C_i]`` (the two projections' biases summed).
        psi_w: ``[1, C_i]``; psi_b: ``[1]``.
        backend: ``"auto"`` or ``reference``/``cpu``/``cuda``/``triton``.

    Returns:
        ``[N, C_x, H, W]`` in x's memory format; differentiable in every argument.

    Raises:
        ValueError: naming the argument (shapes, dtypes, devices, empty or non-finite inputs).
    """
    _check_feature("x", x)
    _check_feature("g", g, x)
    if g.shape[0] != x.shape[0] or g.shape[2:] != x.shape[2:]:
        raise ValueError(f"g must have x's batch and H, W ({x.shape[0]}, {list(x.shape[2:])}), "
                         f"got shape {list(g.shape)}")
    if not isinstance(w_x, torch.Tensor) or w_x.dim() != 2 or w_x.shape[1] != x.shape[1] \
            or w_x.shape[0] == 0:
        shape = list(w_x.shape) if isinstance(w_x, torch.Tensor) else type(w_x).__name__
        raise ValueError(f"w_x must have shape [C_i, {x.shape[1]}], got {shape}")
    C_i = w_x.shape[0]
    _check_param("w_x", w_x, (C_i, x.shape[1]), x)
    _check_param("w_g", w_g, (C_i, g.shape[1]), x)
    _check_param("b", b, (C_i,), x)
    _check_param("psi_w", psi_w, (1, C_i), x)
    _check_param("psi_b", psi_b, (1,), x)
    chosen = resolve_backend(backend, x.device, x.dtype)
    _check_finite([("x", x, False), ("g", g, False), ("w_x", w_x, False), ("w_g", w_g, False),
                   ("b", b, False), ("psi_w", psi_w, False), ("psi_b", psi_b, False)], chosen)
    if chosen == "reference":
        return attention_gate_reference(x, g, w_x, w_g, b, psi_w, psi_b)
    return _fused("attention_gate", chosen)(x, g, w_x, w_g, b, psi_w, psi_b)
