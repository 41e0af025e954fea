"""Training recipes: the optimisation, loss, precision and data settings of a run, as one
dataclass, and the two papers' recipes with their training scripts' defects fixed.

``batch_size`` is the *global* batch of one optimiser step: images per step summed over every
process and every accumulated micro-batch. Each process loads ``batch_size / world_size`` images
per step and runs them as ``accumulate`` micro-batches, so one recipe gives the same steps on one
process or on several (BatchNorm statistics are per micro-batch: equal micro-batches give equal
results).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Recipe", "lgmsnet_recipe", "lightawnet_recipe", "recipe_for", "OPTIMIZERS",
           "SCHEDULES", "AMP_DTYPES"]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "poly", "cosine")
AMP_DTYPES = ("bfloat16", "float16")


@dataclass
class Recipe:
    """How to train. Every field is a plain value, so a recipe is stored in checkpoints.

    Optimisation: ``optimizer`` (``sgd``: with ``momentum``; ``adam``; ``adamw``), ``lr``,
    ``weight_decay``; ``schedule`` per iteration: ``constant``, ``poly`` (``lr · (1 −
    it/total)^poly_power``, the total over all epochs) or ``cosine``.

    Loss: ``loss``, a name of :data:`fastseg.losses.LOSSES` (``bce``, ``dice_bce``, ``ce``,
    ``dice_ce``, ``dice``) with ``loss_kwargs``; a sigmoid loss on a multi-class model becomes its
    softmax counterpart (``bce`` → ``ce``, ``dice_bce`` → ``dice_ce``).

    Steps: ``epochs``, ``batch_size`` (global, see the module docstring), ``accumulate``
    (micro-batches per step), ``shuffle``, ``num_workers`` (DataLoader workers per process; with
    0 a resumed run repeats an uninterrupted one exactly).

    Precision and kernels: ``amp`` ``None`` (float32), ``"bfloat16"`` (CPU or CUDA) or
    ``"float16"`` (CUDA, with a gradient scaler); losses always compute in float32. ``backend``:
    the fastseg op backend (``auto``, ``reference``, ``cpu``, ``cuda``, ``triton``).

    Data (used by :func:`fastseg.engine.train` to build datasets): ``size`` ``(H, W)``,
    ``channels``, ``intensity`` (preset name), ``augment`` (random 90° rotations and flips).

    Validation: every ``val_every`` epochs; the best checkpoint maximises ``select`` (``dice``,
    ``iou``) or minimises it (``loss``), on the validation split only; ``threshold`` for binary
    predictions; ``overlays`` images drawn per validation round. ``seed`` seeds everything.
    """

    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "poly"
    poly_power: float = 0.9
    loss: str = "dice_bce"
    loss_kwargs: dict = field(default_factory=dict)
    epochs: int = 100
    batch_size: int = 8
    accumulate: int = 1
    shuffle: bool = True
    num_workers: int = 0
    amp: str | None = None
    backend: str = "auto"
    size: tuple = (256, 256)
    channels: int = 3
    intensity: str = "imagenet"
    augment: bool = True
    val_every: int = 1
    select: str = "dice"
    threshold: float = 0.5
    overlays: int = 4
    seed: int = 0

    def __post_init__(self):
        from ..backend import _check_name
        from .losses import LOSSES

        def choose(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {options}, got {getattr(self, name)!r}")

        def positive(name, number=int, minimum=1):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, number) or value < minimum:
                kind = "an int" if number is int else "a number"
                raise ValueError(f"{name} must be {kind} >= {minimum}, got {value!r}")

        choose("optimizer", OPTIMIZERS)
        choose("schedule", SCHEDULES)
        choose("loss", tuple(LOSSES))
        choose("amp", (None,) + AMP_DTYPES)
        choose("select", ("dice", "iou", "loss"))
        _check_name(self.backend, "backend")
        for name in ("epochs", "batch_size", "accumulate", "val_every", "channels"):
            positive(name)
        for name in ("num_workers", "overlays", "seed"):
            positive(name, minimum=0)
        for name in ("lr", "momentum", "weight_decay", "poly_power"):
            positive(name, (int, float), 0)
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold!r}")
        size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ValueError(f"size must be an int or (H, W) of positive ints, got {self.size!r}")
        self.size = size
        if self.batch_size % self.accumulate:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by accumulate "
                             f"({self.accumulate})")

    def replace(self, **changes) -> "Recipe":
        """A copy with ``changes`` (checked); unknown names are a ``ValueError``."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown recipe fields {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (``size`` as a list), as stored in checkpoints."""
        values = dataclasses.asdict(self)
        values["size"] = list(self.size)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Recipe":
        """The recipe :meth:`to_dict` wrote (unknown keys are a ``ValueError``)."""
        return cls().replace(**values)


def lgmsnet_recipe(**changes) -> Recipe:
    """LGMSNet's recipe (Dong et al. 2025): SGD, momentum 0.9, weight decay 1e-4, lr 0.01 with a
    poly (power 0.9) decay per iteration, loss ``0.5·BCE + (1 − soft Dice)``, random 90°
    rotations and flips, ImageNet normalisation of RGB 256², batch 8, 300 epochs. Shuffled
    (as the original), model selection on the validation split (the original picked it on the
    test split). ``changes`` override fields."""
    return Recipe(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, schedule="poly",
                  poly_power=0.9, loss="dice_bce", loss_kwargs={"lambda_bce": 0.5},
                  epochs=300, batch_size=8, size=(256, 256), channels=3, intensity="imagenet",
                  augment=True).replace(**changes)


def lightawnet_recipe(**changes) -> Recipe:
    """LightAWNet's recipe (Wang et al. 2024): Adam, lr 1e-4, constant, BCE on the logits, no
    augmentation, per-image min–max normalisation of grayscale 256², batch 16, 50 epochs. Fixed:
    the data are shuffled (the original did not), and the best model is selected on the
    validation split, never on the test split. ``changes`` override fields."""
    return Recipe(optimizer="adam", lr=1e-4, momentum=0.0, weight_decay=0.0, schedule="constant",
                  loss="bce", epochs=50, batch_size=16, size=(256, 256), channels=1,
                  intensity="minmax", augment=False).replace(**changes)


def recipe_for(model_name: str, **changes) -> Recipe:
    """The paper's recipe of a seed model (``lgmsnet``, ``lightawnet``); the generic
    :class:`Recipe` defaults for any other name."""
    recipes = {"lgmsnet": lgmsnet_recipe, "lightawnet": lightawnet_recipe}
    make = recipes.get(model_name.lower() if isinstance(model_name, str) else model_name)
    return make(**changes) if make else Recipe().replace(**changes)
