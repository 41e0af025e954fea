"""Checkpoints of the authors' code: the key mapping between their state_dicts and fastseg's.

The fastseg models hold every original tensor under another name and with the same shape (the
layers keep the original's parameter layout: per-group depthwise weights, ``[K, C_out, C_in, k,
k]`` experts, ``[q | k | v]`` projections, ``concat[a, a·s]`` input order), so converting is
renaming. The renaming is a list of regular-expression rules per model, applied in order to each
fastseg key; keys no rule touches are named the same in both (e.g. LightAWNet's ``attention.*``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

__all__ = ["from_original", "to_original", "original_key_map"]

_LMS_CONVS = ("local_dwc", "global_dwc_s", "global_dwc_m", "global_dwc_l")  # kernels 3, 5, 7, 9
_GMS = r"(encoder[45]\.0|Up_conv5|Up_conv4\.1)"  # the GMS blocks, once renamed

# LGMSNet (U-Bench, class LGMSNet). Rules apply in order, each to the result of the previous
# ones; (pattern, replacement) as for re.sub.
_LGMSNET_RULES: list[tuple[str, object]] = [
    # module names of the whole network
    (r"^stem\.", "stem.conv."),
    (r"^encoder([45])\.", r"encoder\1.0."),
    (r"^up(\d)\.", r"Up\1.up."),                       # Sequential(Upsample, Conv, BN, ReLU)
    (r"^decoder5\.", "Up_conv5."),
    (r"^decoder4\.0\.", "Up_conv4.0.conv."),           # Fusion: Sequential under `.conv`
    (r"^decoder4\.1\.", "Up_conv4.1."),
    (r"^decoder([23])\.", r"Up_conv\1.conv."),
    (r"^head\.", "Conv_1x1."),
    # LMS block: one depthwise conv per channel group, the GroupNorm inside `norm_act`
    (r"\.mixed\.weights\.(\d)$", lambda m: f".{_LMS_CONVS[int(m[1])]}.weight"),
    (r"\.mixed\.biases\.(\d)$", lambda m: f".{_LMS_CONVS[int(m[1])]}.bias"),
    (r"^(encoder\d\.0)\.norm\.", r"\1.norm_act.0."),
    (r"^(encoder\d\.0)\.reduce\.", r"\1.conv_1x1_bn."),
    (r"^(encoder\d\.0)\.expand\.", r"\1.conv_nxn_bn."),
    # GMS block: the local branch `conv_spilt` (sic) and the transformer's PreNorm layout
    (_GMS + r"\.local\.0\.", r"\1.conv_spilt.dwconv3x3."),
    (_GMS + r"\.local\.1\.", r"\1.conv_spilt.bn1."),
    (_GMS + r"\.local\.3\.", r"\1.conv_spilt.dwconv1x1."),
    (_GMS + r"\.local\.4\.", r"\1.conv_spilt.bn2."),
    (_GMS + r"\.transformer\.norm1\.", r"\1.transformer.layers.0.0.norm."),
    (_GMS + r"\.transformer\.to_qkv\.", r"\1.transformer.layers.0.0.to_qkv."),
    (_GMS + r"\.transformer\.to_out\.", r"\1.transformer.layers.0.0.to_out.0."),
    (_GMS + r"\.transformer\.norm2\.", r"\1.transformer.layers.0.1.net.0."),
    (_GMS + r"\.transformer\.ffn_in\.", r"\1.transformer.layers.0.1.net.1."),
    (_GMS + r"\.transformer\.ffn_out\.", r"\1.transformer.layers.0.1.net.4."),
]

# LightAWNet (archive lightawnet, class Net).
_LIGHTAWNET_RULES: list[tuple[str, object]] = [
    (r"^encoder([123])\.", r"layer\1."),
    (r"^encoder([45])\.", r"mul\1."),
    (r"^side4\.", "conv1_1."),
    (r"^side5\.", "conv1_2."),
    (r"^skip4\.", "downconv."),
    (r"^decoder(\d)\.", lambda m: f"De{5 - int(m[1])}."),   # decoder4 (first stage) is De1
    (r"^head\.", "output.dynamic."),                        # the head is a DynamicConvBN too
    # encoder block
    (r"\.depthwise\.", ".dwconv."),
    (r"\.expand\.", ".conv1_1."),
    (r"\.gate\.attention\.", ".conv1_2.0."),
    (r"\.gate\.proj\.", ".down."),
    # decoder stage
    (r"\.reduce\.", ".up."),
    (r"\.excite\.fc1\.", ".att.0."),
    (r"\.excite\.fc2\.", ".att.2."),
    # dynamic conv + BN: the original's module `weight` holds experts, routing and norm
    (r"\.dynamic\.0\.weight$", ".weight.weight"),
    (r"\.dynamic\.0\.routing\.", ".weight.attention.net."),
    (r"\.dynamic\.1\.", ".weight.norm."),
    (r"^output\.weight\.", "output."),                     # the head has no `weight` level
]

_RULES = {"lgmsnet": _LGMSNET_RULES, "lightawnet": _LIGHTAWNET_RULES}


def _rules(name: str) -> list[tuple[str, object]]:
    key = name.lower() if isinstance(name, str) else name
    if key not in _RULES:
        raise ValueError(f"name: unknown model {name!r}; known: {sorted(_RULES)}")
    return _RULES[key]


def original_key_map(name: str, model: nn.Module) -> dict[str, str]:
    """``{fastseg key: original key}`` for every entry of ``model.state_dict()`` (a
    ``name`` model, e.g. ``"lgmsnet"``), in fastseg's order."""
    rules = _rules(name)
    mapping = {}
    for key in model.state_dict():
        original = key
        for pattern, replacement in rules:
            original = re.sub(pattern, replacement, original)
        mapping[key] = original
    if len(set(mapping.values())) != len(mapping):  # a rule table bug, not a user error
        raise AssertionError(f"{name}: two fastseg keys map onto one original key")
    return mapping


def _check_keys(source: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                what: str) -> None:
    """ValueError naming the missing and unexpected keys and the shape mismatches of ``source``
    against ``expected`` (both ``{key: tensor}``)."""
    missing = [k for k in expected if k not in source]
    unexpected = [k for k in source if k not in expected]
    mismatched = [f"{k}: {tuple(source[k].shape)} (expected {tuple(v.shape)})"
                  for k, v in expected.items()
                  if k in source and tuple(source[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches {mismatched}")
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


def from_original(name: str, state_dict: Mapping[str, torch.Tensor] | str | os.PathLike,
                  **kwargs) -> nn.Module:
    """The fastseg model ``name`` (``"lgmsnet"`` or ``"lightawnet"``, built with ``kwargs``:
    ``in_channels``, ``num_classes``, ``backend``) holding the weights of ``state_dict``, a
    checkpoint of the authors' code (keys and shapes: ``original_state_dicts.md``; BatchNorm
    running statistics and ``num_batches_tracked`` included), as a dict or the path of a
    ``torch.save``'d one. A file is read with ``torch.load(weights_only=True)``: one that needs
    arbitrary pickled objects is refused (``fastseg.engine.checkpoint.CheckpointError``, a
    ``ValueError``), nothing from it runs.

    Strict: missing or unexpected keys and shape mismatches raise a ``ValueError`` naming them
    (build with the checkpoint's ``in_channels`` / ``num_classes``). Given the same input, the
    returned model computes what the original computes, in train and eval mode; LightAWNet returns
    logits where the original returns their sigmoid. The model is in training mode, as a freshly
    built one; call ``.eval()`` for inference.
    """
    from . import create_model  # the package imports this module

    _rules(name)  # an unknown name is an error about `name`, before building anything
    if isinstance(state_dict, (str, os.PathLike)):
        from ..engine.checkpoint import load_weights_only

        state_dict = load_weights_only(Path(state_dict))
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"state_dict must be a dict of tensors or a file holding one, got "
                         f"{type(state_dict).__name__}")
    model = create_model(name, **kwargs)
    mapping = original_key_map(name, model)
    target = model.state_dict()
    expected = {mapping[k]: v for k, v in target.items()}
    _check_keys(state_dict, expected, f"from_original({name!r}) state_dict")
    model.load_state_dict({k: state_dict[mapping[k]] for k in target})
    return model


def to_original(name: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s (a fastseg ``name`` model) state_dict under the original code's keys, in the
    original's registration order where the two agree (tensors shared, not copied): what the
    authors' code loads."""
    state = model.state_dict()
    mapping = original_key_map(name, model)
    return {mapping[k]: v for k, v in state.items()}
