"""Training and evaluation machinery: ``losses`` (segmentation losses on logits), ``metrics``
(Dice, IoU, HD95, ASSD with MONAI's conventions), ``recipes`` (the papers' training recipes),
``trainer`` (:class:`Trainer`, :func:`train`), ``checkpoint`` (the checkpoint file format),
``records`` (log, plots, overlays), ``distributed`` (torchrun process groups), ``predict``
(:class:`Predictor`: whole images and volumes with the training's preprocessing) and ``evaluate``
(per-case metrics on a dataset folder).

Submodules load on use: ``import fastseg.engine`` imports none of them, nor ``fastseg.data`` or
``fastseg.models``; ``fastseg.engine.Trainer`` and the other names below load theirs on first
access.
"""
import importlib

_EXPORTS = {
    "Trainer": "trainer", "train": "trainer", "Interrupted": "trainer",
    "seed_everything": "trainer",
    "Recipe": "recipes", "lgmsnet_recipe": "recipes", "lightawnet_recipe": "recipes",
    "recipe_for": "recipes",
    "CheckpointError": "checkpoint", "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint", "model_from_checkpoint": "checkpoint",
    "checkpoint_payload": "checkpoint",
    "Predictor": "predict", "evaluate": "evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
