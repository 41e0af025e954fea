"""The training loop: a segmentation model, a training and a validation dataset, a
:class:`~fastseg.engine.recipes.Recipe`, an output folder.

What a run writes to ``out_dir`` (rank 0 only under torchrun)::

    last.pt        checkpoint after every epoch and on SIGINT/SIGTERM (resume from it)
    best.pt        checkpoint of the best validation score so far
    log.jsonl      one JSON object per epoch: losses, metrics, learning rate, images/s
    loss.png       training and validation loss per epoch
    metrics.png    validation Dice and IoU per epoch
    overlays/      epoch_XXX.png per validation round: image | truth | prediction

Determinism: everything is seeded from ``recipe.seed``; the epoch order is
``DistributedSampler``'s permutation of ``(seed, epoch)``; augmentations draw from a generator
seeded by ``(seed, epoch, sample index)``. A checkpoint stores the model, optimiser, scheduler,
gradient scaler, RNG states and the position inside the epoch (steps done), so with
``num_workers=0`` an interrupted run resumed from ``last.pt`` ends with the weights an
uninterrupted run ends with.

A sample is a dict with ``"image"`` ``[C, H, W]`` and ``"mask"`` (``[1, H, W]`` float for a
binary model, ``[H, W]`` int64 class indices for a multi-class one), as :mod:`fastseg.data`'s
datasets yield, or a tuple ``(image, mask)``.
"""
from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .checkpoint import checkpoint_payload, load_checkpoint, save_checkpoint
from .distributed import DistributedContext, all_reduce_sum, setup_distributed
from .recipes import Recipe, recipe_for

__all__ = ["Trainer", "Interrupted", "seed_everything", "train"]

Hook = Callable[["Trainer", int, int], None]


class Interrupted(KeyboardInterrupt):
    """Training stopped between two steps by SIGINT, SIGTERM or a ``KeyboardInterrupt`` from a
    hook; ``checkpoint`` is the file holding the state to resume from."""

    def __init__(self, message: str, checkpoint: Path | None):
        super().__init__(message)
        self.checkpoint = checkpoint


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "cached_gaussian": cached},
             "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _EpochSampler(Sampler[int]):
    """This process's share of an epoch: ``DistributedSampler``'s ``(seed, epoch)`` order
    (one process: a seeded permutation of the whole set), from position ``skip`` on."""

    def __init__(self, dataset: Dataset, context: DistributedContext, shuffle: bool, seed: int):
        self.inner = DistributedSampler(dataset, num_replicas=context.world_size,
                                        rank=context.rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(self.inner)[self.skip:])

    def __len__(self) -> int:
        return len(self.inner) - self.skip


class _Augmented(Dataset):
    """``dataset`` with ``augment(image, mask, generator)`` applied, the generator seeded by
    ``(seed, epoch, index)``: a sample gets the same draw whichever process or worker loads it,
    and after a resume."""

    def __init__(self, dataset: Dataset, augment: Callable, seed: int):
        self.dataset, self.augment, self.seed, self.epoch = dataset, augment, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample = self.dataset[index]
        generator = torch.Generator().manual_seed(
            ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % 2 ** 63)
        if isinstance(sample, Mapping):
            image, mask = self.augment(sample["image"], sample["mask"], generator=generator)
            return {**sample, "image": image.contiguous(), "mask": mask.contiguous()}
        image, mask = self.augment(sample[0], sample[1], generator=generator)
        return (image.contiguous(), mask.contiguous(), *sample[2:])


def _unpack(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, Mapping):
        return batch["image"], batch["mask"]
    return batch[0], batch[1]


def _intensity_name(transform) -> str:
    """The preset name of a :mod:`fastseg.data.transforms` intensity transform."""
    from ..data.transforms import CT_WINDOWS, CTWindow, ImageNetNormalize, MinMax, PercentileZScore

    if transform is None:
        return "none"
    if isinstance(transform, CTWindow):
        for name, window in CT_WINDOWS.items():
            if (transform.low, transform.high) == window:
                return f"ct-{name}"
        return f"ct-window({transform.low:g},{transform.high:g})"
    names = {MinMax: "minmax", PercentileZScore: "zscore", ImageNetNormalize: "imagenet"}
    return names.get(type(transform), type(transform).__name__)


def _model_spec(model: nn.Module) -> tuple[str, dict]:
    from ..models import _REGISTRY

    for name, cls in _REGISTRY.items():
        if type(model) is cls:
            return name, {"in_channels": model.in_channels, "num_classes": model.num_classes}
    return f"{type(model).__module__}.{type(model).__qualname__}", {}


def _schedule(recipe: Recipe, total: int) -> Callable[[int], float]:
    if recipe.schedule == "poly":
        return lambda it: (1.0 - min(it, total) / total) ** recipe.poly_power
    if recipe.schedule == "cosine":
        return lambda it: 0.5 * (1.0 + math.cos(math.pi * min(it, total) / total))
    return lambda it: 1.0


class Trainer:
    """Train a segmentation model with a recipe; checkpoints, logs, plots, resume, DDP.

    Args:
        model: an ``nn.Module`` mapping ``[N, C, H, W]`` to logits ``[N, K, H, W]`` (K = 1: binary,
            sigmoid; K > 1: classes, softmax), or a seed model's name (``"lgmsnet"``,
            ``"lightawnet"``), built with the recipe's ``channels``, ``num_classes`` and
            ``backend``.
        train_set, val_set: datasets of samples (see the module docstring). The best checkpoint
            is selected on ``val_set`` only; without one, no validation and no ``best.pt``.
        recipe: a :class:`Recipe` (default: the seed model's paper recipe, else ``Recipe()``).
        out_dir: folder for checkpoints, log, plots and overlays.
        num_classes: output channels; default the model's ``num_classes`` or a probe forward.
        model_spec: ``(name, kwargs)`` rebuilding the model with ``fastseg.create_model``
            (inferred for the seed models).
        preprocessing, labels: checkpoint entries (see :mod:`fastseg.engine.checkpoint`);
            default: read from a :mod:`fastseg.data` dataset, overridden key by key.
        splits: the ``{"train", "val", "test"}`` case ids the datasets came from, stored in the
            checkpoints so that ``fastseg evaluate --split test`` needs nothing else.
        device: ``None``: this process's GPU under CUDA, else CPU.
        progress: show a tqdm bar (rank 0).
        hooks: ``hook(trainer, epoch, step)`` called after every optimiser step (0-based
            indices); a ``KeyboardInterrupt`` from a hook stops training as SIGINT does.

    Under ``torchrun`` each process builds the same Trainer: the model is wrapped in
    DistributedDataParallel, each process loads ``batch_size / world_size`` images per step,
    metrics are summed over processes, rank 0 logs and writes.
    """

    def __init__(self, model: nn.Module | str, train_set: Dataset, val_set: Dataset | None = None,
                 recipe: Recipe | None = None, out_dir: str | Path = "runs/train", *,
                 num_classes: int | None = None, model_spec: tuple[str, dict] | None = None,
                 preprocessing: Mapping[str, Any] | None = None,
                 labels: Mapping[str, Any] | None = None,
                 splits: Mapping[str, Sequence[str]] | None = None,
                 device: str | torch.device | None = None,
                 progress: bool = True, hooks: Sequence[Hook] = ()):
        if isinstance(model, str):
            recipe = recipe or recipe_for(model)
        recipe = recipe or Recipe()
        if not isinstance(recipe, Recipe):
            raise ValueError(f"recipe must be a fastseg.engine.Recipe, got {type(recipe).__name__}")
        if train_set is None or len(train_set) == 0:
            raise ValueError("train_set is empty")
        self.recipe = recipe
        self.context = setup_distributed(device)
        self.device = self.context.device
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.hooks = list(hooks)
        self.train_set, self.val_set = train_set, val_set
        world = self.context.world_size
        if recipe.batch_size % (world * recipe.accumulate):
            raise ValueError(f"batch_size ({recipe.batch_size}) must be divisible by world size "
                             f"× accumulate ({world} × {recipe.accumulate})")
        self.local_batch = recipe.batch_size // world
        seed_everything(recipe.seed)
        if isinstance(model, str):
            from ..models import create_model

            kwargs = {"in_channels": recipe.channels, "num_classes": num_classes or 1}
            model_spec = model_spec or (model.lower(), kwargs)
            model = create_model(model, **kwargs, backend=recipe.backend)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module or a model name, got {type(model).__name__}")
        self.model = model.to(self.device)
        self.model_spec = model_spec or _model_spec(model)
        self.num_classes = num_classes or getattr(model, "num_classes", None) or self._probe_classes()
        self.preprocessing = {**self._dataset_preprocessing(), **(preprocessing or {})}
        self.labels = {**self._dataset_labels(), **(labels or {})}
        self.splits = None if splits is None else {
            k: [str(i) for i in v] for k, v in splits.items() if isinstance(v, (list, tuple))}
        self.loss_fn = self._make_loss()
        self.ddp_model = self.model
        if self.context.distributed:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = self._make_optimizer()
        augment = None
        if recipe.augment:
            from ..data.transforms import RandomAugment

            augment = RandomAugment(rot90=True, flip=True)
        self._train_data = _Augmented(train_set, augment, recipe.seed) if augment else train_set
        self.sampler = _EpochSampler(self._train_data, self.context, recipe.shuffle, recipe.seed)
        self.steps_per_epoch = len(self.sampler) // self.local_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"train_set has {len(train_set)} samples, fewer than one batch "
                             f"({recipe.batch_size}); lower batch_size")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _schedule(recipe, recipe.epochs * self.steps_per_epoch))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=recipe.amp == "float16")
        if recipe.amp == "float16" and self.device.type != "cuda":
            raise ValueError("amp='float16' needs a CUDA device; use amp='bfloat16' on CPU")
        self.epoch, self.step_in_epoch = 0, 0
        self.history: list[dict] = []
        self.best: dict = {"metric": recipe.select, "value": None, "epoch": None}
        self._partial = {"loss_sum": 0.0, "images": 0, "seconds": 0.0}
        self._stop_signal: int | None = None
        self.last_overlays: list = []

    # --- construction helpers ---------------------------------------------------------------

    def _probe_classes(self) -> int:
        image, _ = _unpack(self.train_set[0])
        was_training = self.model.training
        with torch.no_grad():
            logits = self.model.eval()(image[None].to(self.device))
        self.model.train(was_training)
        return int(logits.shape[1])

    def _dataset_preprocessing(self) -> dict:
        data = self.train_set
        image, _ = _unpack(data[0])
        size = getattr(data, "size", None) or tuple(image.shape[-2:])
        return {"size": [int(s) for s in size], "channels": int(image.shape[0]),
                "intensity": _intensity_name(getattr(data, "intensity", None))
                if hasattr(data, "intensity") else self.recipe.intensity,
                "kind": getattr(data, "kind", "image")}

    def _dataset_labels(self) -> dict:
        spec = getattr(self.train_set, "labels", None)
        values = getattr(spec, "values", None)
        return {"num_classes": int(self.num_classes),
                "values": None if values is None else [int(v) for v in values], "names": None}

    def _make_loss(self) -> nn.Module:
        from .losses import create_loss

        name, kwargs = self.recipe.loss, dict(self.recipe.loss_kwargs)
        if self.num_classes > 1 and name in ("bce", "dice_bce"):
            name = {"bce": "ce", "dice_bce": "dice_ce"}[name]
            if "lambda_bce" in kwargs:
                kwargs["lambda_ce"] = kwargs.pop("lambda_bce")
        if self.num_classes == 1 and name in ("ce", "dice_ce"):
            raise ValueError(f"loss {name!r} needs a multi-class model; this one has 1 output "
                             "channel (use bce or dice_bce)")
        if name == "dice":
            kwargs.setdefault("sigmoid" if self.num_classes == 1 else "softmax", True)
        self.loss_name = name
        return create_loss(name, **kwargs)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        r, params = self.recipe, self.model.parameters()
        if r.optimizer == "sgd":
            return torch.optim.SGD(params, lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay)
        if r.optimizer == "adam":
            return torch.optim.Adam(params, lr=r.lr, weight_decay=r.weight_decay)
        return torch.optim.AdamW(params, lr=r.lr, weight_decay=r.weight_decay)

    # --- pieces of a step -------------------------------------------------------------------

    def _autocast(self):
        if self.recipe.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.recipe.amp))

    def _backend_scope(self):
        if self.recipe.backend == "auto":
            return contextlib.nullcontext()
        from ..backend import use_backend

        return use_backend(self.recipe.backend)

    def _target(self, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.to(self.device, non_blocking=True)
        if self.num_classes == 1:
            return (mask if mask.dim() == 4 else mask.unsqueeze(1)).float()
        return (mask[:, 0] if mask.dim() == 4 else mask).long()

    def _train_step(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """One optimiser step on this process's ``[B/world, C, H, W]`` batch, as ``accumulate``
        micro-batches ``batch[j::accumulate]``; returns the mean loss (a 0-d tensor)."""
        accumulate = self.recipe.accumulate
        total = torch.zeros((), device=self.device)
        for j in range(accumulate):
            x = images[j::accumulate].to(self.device, non_blocking=True)
            y = self._target(masks[j::accumulate])
            last = j == accumulate - 1
            sync = contextlib.nullcontext() if last or self.ddp_model is self.model \
                else self.ddp_model.no_sync()
            with sync:
                with self._autocast():
                    logits = self.ddp_model(x)
                loss = self.loss_fn(logits.float(), y)
                self.scaler.scale(loss / accumulate).backward()
            total += loss.detach()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return total / accumulate

    # --- checkpoints ------------------------------------------------------------------------

    def _payload(self, metrics: Mapping[str, float]) -> dict:
        name, kwargs = self.model_spec
        return checkpoint_payload(
            self.model, name=name, kwargs=kwargs, preprocessing=self.preprocessing,
            labels=self.labels, epoch=self.epoch,
            metrics=dict(metrics), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
            rng=_rng_state(), sampler={"epoch": self.epoch, "step": self.step_in_epoch,
                                       **self._partial},
            recipe=self.recipe.to_dict(), history=list(self.history), best=dict(self.best),
            world_size=self.context.world_size, splits=self.splits)

    def save(self, name: str = "last.pt", metrics: Mapping[str, float] | None = None) -> Path | None:
        """Write the training state to ``out_dir/name`` atomically (rank 0; others return
        ``None``). ``epoch`` in the file counts completed epochs; ``sampler.step`` the steps
        done in the epoch in progress."""
        if not self.context.is_main:
            return None
        last = self.history[-1] if self.history else {}
        return save_checkpoint(self.out_dir / name, self._payload(metrics if metrics is not None
                                                                   else last))

    def resume(self, checkpoint: str | Path | Mapping) -> None:
        """Restore model, optimiser, scheduler, scaler, RNG states, history and the position in
        the epoch from a checkpoint (path or payload). A corrupt file raises
        :class:`~fastseg.engine.checkpoint.CheckpointError` before anything changes."""
        payload = checkpoint if isinstance(checkpoint, Mapping) else load_checkpoint(checkpoint)
        stored_model = (payload.get("model") or {}).get("name")
        if stored_model != self.model_spec[0]:
            where = "" if isinstance(checkpoint, Mapping) else f"{checkpoint}: "
            raise ValueError(f"{where}checkpoint of a {stored_model} model; this run trains "
                             f"{self.model_spec[0]} (use another --out folder, or the same model)")
        for key in ("optimizer", "scheduler", "scaler", "rng", "sampler"):
            if key not in payload:
                raise ValueError(f"checkpoint has no training state ({key!r} missing): it can "
                                 "predict but not resume")
        stored = payload.get("recipe") or {}
        changed = {k: (v, self.recipe.to_dict()[k]) for k, v in stored.items()
                   if k in self.recipe.to_dict() and self.recipe.to_dict()[k] != v}
        if changed and self.context.is_main:
            print("resume: recipe differs from the checkpoint's: " + ", ".join(
                f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
        self.model.load_state_dict(payload["model_state"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        _set_rng_state(payload["rng"])
        sampler = payload["sampler"]
        self.epoch, self.step_in_epoch = int(sampler["epoch"]), int(sampler["step"])
        self._partial = {k: sampler[k] for k in ("loss_sum", "images", "seconds")}
        self.history = list(payload.get("history") or [])
        self.best = dict(payload.get("best") or self.best)

    # --- validation -------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, dataset: Dataset | None = None, overlays: int = 0) -> dict[str, float]:
        """Mean validation loss and per-image Dice and IoU of ``dataset`` (default ``val_set``),
        over all processes (each scores ``indices[rank::world]``).

        Binary: a pixel is foreground when ``sigmoid(logit) > recipe.threshold``; multi-class:
        the argmax, Dice/IoU averaged over the foreground classes (``dice/1``, ... per class).
        Cases with an empty truth have no Dice (MONAI's convention) and are left out of the
        mean. With ``overlays``, the first samples' ``(image, truth, prediction)`` are kept in
        ``self.last_overlays``.
        """
        from .metrics import compute_metrics

        dataset = dataset if dataset is not None else self.val_set
        indices = list(range(self.context.rank, len(dataset), self.context.world_size))
        loader = DataLoader(dataset, batch_size=max(1, self.local_batch // self.recipe.accumulate),
                            sampler=indices, num_workers=self.recipe.num_workers)
        multi = self.num_classes > 1
        keys = ["dice", "iou"] + ([f"{m}/{c}" for m in ("dice", "iou")
                                   for c in range(1, self.num_classes)] if multi else [])
        sums = dict.fromkeys(keys, 0.0)
        counts = dict.fromkeys(keys, 0)
        loss_sum, seen, kept = 0.0, 0, []
        self.model.eval()
        try:
            for batch in loader:
                images, masks = _unpack(batch)
                x, y = images.to(self.device), self._target(masks)
                with self._autocast():
                    logits = self.model(x)
                logits = logits.float()
                loss_sum += float(self.loss_fn(logits, y)) * len(x)
                seen += len(x)
                if multi:
                    predictions, truths = logits.argmax(1), y
                else:
                    predictions = (logits.sigmoid() > self.recipe.threshold)[:, 0].long()
                    truths = (y[:, 0] > 0.5).long()
                for p, t in zip(predictions.cpu(), truths.cpu()):
                    row = compute_metrics(p, t, num_classes=self.num_classes if multi else None,
                                          metrics=("dice", "iou"))
                    if multi:
                        for m in ("dice", "iou"):
                            per_class = [row[f"{m}/{c}"] for c in range(1, self.num_classes)]
                            finite = [v for v in per_class if math.isfinite(v)]
                            row[m] = sum(finite) / len(finite) if finite else math.nan
                    for key in keys:
                        if math.isfinite(row[key]):
                            sums[key] += row[key]
                            counts[key] += 1
                if len(kept) < overlays:
                    kept.extend(zip(images[: overlays - len(kept)], truths.cpu(),
                                    predictions.cpu()))
        finally:
            self.model.train()
        totals = all_reduce_sum([loss_sum, seen] + [sums[k] for k in keys] +
                                [counts[k] for k in keys], self.context)
        n = len(keys)
        result = {"loss": totals[0] / max(totals[1], 1)}
        for i, key in enumerate(keys):
            result[key] = totals[2 + i] / totals[2 + n + i] if totals[2 + n + i] else math.nan
        self.last_overlays = kept
        return result

    # --- the loop ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _signals(self):
        """SIGINT/SIGTERM ask for a stop after the current step (a second SIGINT stops now)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _should_stop(self) -> bool:
        stop = self._stop_signal is not None
        if self.context.distributed:  # every process stops after the same step
            stop = all_reduce_sum([float(stop)], self.context)[0] > 0
        return stop

    def _stop(self, reason: str) -> None:
        path = self.save("last.pt")
        if self.context.distributed:
            torch.distributed.barrier()
        where = f"epoch {self.epoch + 1}, step {self.step_in_epoch}/{self.steps_per_epoch}"
        message = f"training interrupted ({reason}) at {where}"
        if self.context.is_main:
            message += f"; state saved to {path}: resume with resume=True"
            print(message, flush=True)
        raise Interrupted(message, self.out_dir / "last.pt")

    def _train_epoch(self) -> float:
        """Train the rest of epoch ``self.epoch``; returns the global images/s."""
        from tqdm.auto import tqdm

        epoch = self.epoch
        if isinstance(self._train_data, _Augmented):
            self._train_data.epoch = epoch
        self.sampler.set_epoch(epoch, self.step_in_epoch * self.local_batch)
        loader = DataLoader(self._train_data, batch_size=self.local_batch, sampler=self.sampler,
                            drop_last=True, num_workers=self.recipe.num_workers,
                            pin_memory=self.device.type == "cuda",
                            generator=torch.Generator().manual_seed(self.recipe.seed + epoch))
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, leave=False,
                   desc=f"epoch {epoch + 1}/{self.recipe.epochs}", dynamic_ncols=True,
                   disable=not (self.progress and self.context.is_main))
        world = self.context.world_size
        try:
            start = time.perf_counter()
            for batch in loader:
                images, masks = _unpack(batch)
                loss = float(self._train_step(images, masks))
                self.step_in_epoch += 1
                now = time.perf_counter()
                self._partial["loss_sum"] += loss
                self._partial["images"] += len(images) * world
                self._partial["seconds"] += now - start
                start = now
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}",
                                img_s=f"{self._partial['images'] / self._partial['seconds']:.1f}")
                try:
                    for hook in self.hooks:
                        hook(self, epoch, self.step_in_epoch - 1)
                except KeyboardInterrupt:
                    self._stop_signal = signal.SIGINT
                # At the end of an epoch the stop waits for its checkpoint (fit's loop).
                if self.step_in_epoch < self.steps_per_epoch and self._should_stop():
                    self._stop(signal.Signals(self._stop_signal or signal.SIGTERM).name)
        finally:
            bar.close()
        return self._partial["images"] / max(self._partial["seconds"], 1e-9)

    def fit(self, resume: bool | str | Path = False) -> dict:
        """Train ``recipe.epochs`` epochs (the rest of them when resuming).

        ``resume``: ``True`` continues from ``out_dir/last.pt`` when it exists (else starts
        afresh), a path continues from that checkpoint. A corrupt checkpoint raises
        :class:`~fastseg.engine.checkpoint.CheckpointError` and nothing is written.

        Returns ``{"history": [per-epoch records], "best": {"metric", "value", "epoch"},
        "last": path, "best_checkpoint": path or None}``. Raises :class:`Interrupted` (after
        writing ``last.pt``) on SIGINT/SIGTERM.
        """
        if resume:
            source = self.out_dir / "last.pt" if resume is True else Path(resume)
            if source.exists() or resume is not True:
                self.resume(source)
                if self.context.is_main:
                    print(f"resuming from {source}: epoch {self.epoch + 1}, step "
                          f"{self.step_in_epoch}/{self.steps_per_epoch}", flush=True)
            elif self.context.is_main:
                print(f"no checkpoint at {source}: starting afresh", flush=True)
        if self.context.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._stop_signal = None
        with self._signals(), self._backend_scope():
            self.model.train()
            while self.epoch < self.recipe.epochs:
                if self._should_stop():
                    self._stop(signal.Signals(self._stop_signal or signal.SIGTERM).name)
                self._end_epoch(self._train_epoch())
        last = self.out_dir / "last.pt"
        best = self.out_dir / "best.pt"
        return {"history": self.history, "best": self.best, "last": last,
                "best_checkpoint": best if best.exists() else None}

    def _end_epoch(self, images_per_s: float) -> None:
        epoch = self.epoch
        train_loss = all_reduce_sum([self._partial["loss_sum"]], self.context)[0] / (
            self.context.world_size * self.steps_per_epoch)
        record = {"epoch": epoch + 1, "train_loss": train_loss,
                  "lr": self.scheduler.get_last_lr()[0], "images_per_s": images_per_s,
                  "train_seconds": self._partial["seconds"]}
        validate = self.val_set is not None and ((epoch + 1) % self.recipe.val_every == 0
                                                 or epoch + 1 == self.recipe.epochs)
        improved = False
        if validate:
            scores = self.evaluate(overlays=self.recipe.overlays if self.context.is_main else 0)
            record.update({f"val_{k}": v for k, v in scores.items()})
            value = scores[self.recipe.select]
            previous = self.best["value"]
            better = (value < previous if self.recipe.select == "loss" else value > previous) \
                if previous is not None else True
            improved = math.isfinite(value) and better
            if improved:
                self.best = {"metric": self.recipe.select, "value": value, "epoch": epoch + 1}
        record["best"] = improved
        self.history.append(record)
        self.epoch, self.step_in_epoch = epoch + 1, 0
        self._partial = {"loss_sum": 0.0, "images": 0, "seconds": 0.0}
        if self.context.is_main:
            metrics = {k: v for k, v in record.items() if k != "best"}
            self.save("last.pt", metrics)
            if improved:
                self.save("best.pt", metrics)
            self._write_records(validate)
            from tqdm.auto import tqdm

            if self.progress:
                shown = "  ".join(f"{k} {v:.4g}" for k, v in record.items()
                                  if isinstance(v, float) and "/" not in k)
                tqdm.write(f"epoch {epoch + 1}/{self.recipe.epochs}  {shown}"
                           + ("  (best)" if improved else ""))
        if self.context.distributed:
            torch.distributed.barrier()

    def _write_records(self, validated: bool) -> None:
        from .records import line_plot, overlay_grid, write_jsonl

        write_jsonl(self.out_dir / "log.jsonl", self.history)
        epochs = [r["epoch"] for r in self.history]
        column = lambda key: [r.get(key, math.nan) for r in self.history]  # noqa: E731
        curves = {"train loss": (epochs, column("train_loss"))}
        if any("val_loss" in r for r in self.history):
            curves["validation loss"] = (epochs, column("val_loss"))
        line_plot(curves, self.out_dir / "loss.png", title=f"loss ({self.loss_name})",
                  xlabel="epoch", ylabel="loss")
        if any("val_dice" in r for r in self.history):
            line_plot({"validation Dice": (epochs, column("val_dice")),
                       "validation IoU": (epochs, column("val_iou"))},
                      self.out_dir / "metrics.png", title="validation scores (per image, mean)",
                      xlabel="epoch", ylabel="score")
        if validated and self.last_overlays:
            images, truths, predictions = (torch.stack(t) for t in zip(*self.last_overlays))
            overlay_grid(images, truths, predictions,
                         self.out_dir / "overlays" / f"epoch_{self.epoch:03d}.png")


def _describe_recipe(recipe: Recipe, loss: str) -> str:
    r = recipe
    optimiser = {"sgd": f"SGD(lr {r.lr:g}, momentum {r.momentum:g}, weight decay {r.weight_decay:g})",
                 "adam": f"Adam(lr {r.lr:g}, weight decay {r.weight_decay:g})",
                 "adamw": f"AdamW(lr {r.lr:g}, weight decay {r.weight_decay:g})"}[r.optimizer]
    schedule = {"poly": f"poly {r.poly_power:g} per iteration", "cosine": "cosine per iteration",
                "constant": "constant lr"}[r.schedule]
    return (f"{optimiser}, {schedule}; loss {loss}{r.loss_kwargs or ''}; {r.epochs} epochs of "
            f"batch {r.batch_size}" + (f" ({r.accumulate} micro-batches)" if r.accumulate > 1 else "")
            + f"; augment {'rot90+flips' if r.augment else 'none'}; amp {r.amp or 'off (float32)'}; "
            f"backend {r.backend}; seed {r.seed}")


def train(model: str | nn.Module, data: str | Path, out_dir: str | Path, *,
          recipe: Recipe | None = None, splits: str | Path | Mapping | None = None,
          num_classes: int = 1, layout: str | None = None,
          label_values: Sequence[int] | None = None, label_names: Sequence[str] | None = None,
          device: str | None = None, resume: bool | str | Path = False, progress: bool = True,
          **changes) -> dict:
    """Train a model on a dataset folder with plain arguments; what ``fastseg train`` calls.

    Args:
        model: a seed model's name (``"lgmsnet"``, ``"lightawnet"``: built with the recipe's
            ``channels`` and ``num_classes``) or any segmentation ``nn.Module``.
        data: a dataset folder in a layout :func:`fastseg.data.find_cases` detects.
        out_dir: where checkpoints, ``splits.json``, log, plots and overlays go.
        recipe: default: the model's paper recipe (:func:`recipe_for`); ``changes`` (e.g.
            ``epochs=5, batch_size=4, amp="bfloat16"``) override its fields.
        splits: a JSON file from :func:`fastseg.data.save_splits` or a ``{"train", "val",
            "test"}`` dict of case ids; default ``make_splits(case ids, seed=recipe.seed)``,
            written to ``out_dir/splits.json``. Training uses ``train``, model selection ``val``;
            ``test`` is never read here.
        num_classes: 1: binary (label > 0, sigmoid); K > 1: K classes (softmax), the labels'
            class indices (``label_values`` maps raw values to them, e.g. MM-WHS).
        layout, label_values: passed to :func:`fastseg.data.find_cases`; ``label_names``: class
            names stored in the checkpoint.
        device, resume, progress: see :class:`Trainer`.

    Prints what it found and what it will do, then returns :meth:`Trainer.fit`'s result.
    """
    from ..data import create_dataset, find_cases, load_splits, make_splits, save_splits
    from .distributed import setup_distributed

    name = model if isinstance(model, str) else None
    recipe = (recipe or recipe_for(name or "")).replace(**changes)
    context = setup_distributed(device)
    say = print if context.is_main else (lambda *a, **k: None)
    index = find_cases(data, layout, label_values=label_values)
    if index.kind == "volume" and "intensity" not in changes and recipe.intensity == "imagenet":
        recipe = recipe.replace(intensity="zscore")
        say("note: volumes: intensity 'zscore' instead of the recipe's 'imagenet' "
            "(pass intensity='ct-liver' etc. for CT windows)")
    out_dir = Path(out_dir)
    if splits is None:
        existing = out_dir / "splits.json"
        if existing.exists():
            chosen, origin = load_splits(existing), f"{existing} (kept from an earlier run)"
        else:
            chosen, origin = make_splits(index.case_ids, seed=recipe.seed), f"new, seed {recipe.seed}"
            if context.is_main:
                save_splits(existing, chosen, seed=recipe.seed, dataset=str(index.root))
    elif isinstance(splits, Mapping):
        chosen, origin = dict(splits), "given"
    else:
        chosen, origin = load_splits(splits), str(splits)
    if not isinstance(chosen, Mapping) or not chosen.get("train") or not chosen.get("val"):
        raise ValueError("splits must hold non-empty 'train' and 'val' case lists (one fold of "
                         "kfold_splits, not the list of folds)")
    say(f"data: {index.root} ({index.layout}, {index.kind}s): {len(index.cases)} cases, labels "
        f"{index.labels.describe()}" + (f", {len(index.skipped)} files skipped" if index.skipped else ""))
    say(f"split ({origin}): train {len(chosen['train'])}, val {len(chosen['val'])}, test "
        f"{len(chosen.get('test') or [])} (test is never used in training or model selection)")
    make = lambda ids: create_dataset(index.subset(ids), size=recipe.size,  # noqa: E731
                                      channels=recipe.channels, intensity=recipe.intensity,
                                      augment=None, binary=num_classes == 1)
    train_set, val_set = make(chosen["train"]), make(chosen["val"])
    trainer = Trainer(model, train_set, val_set, recipe, out_dir, num_classes=num_classes,
                      labels={"names": list(label_names) if label_names else None},
                      splits=chosen, device=device, progress=progress)
    spec_name, spec_kwargs = trainer.model_spec
    parameters = sum(p.numel() for p in trainer.model.parameters())
    say(f"model: {spec_name}({', '.join(f'{k}={v}' for k, v in spec_kwargs.items())}), "
        f"{parameters:,} parameters")
    say(f"input: {recipe.size[0]}×{recipe.size[1]}, {recipe.channels} channel(s), intensity "
        f"{recipe.intensity}; {len(train_set)} training and {len(val_set)} validation samples, "
        f"{trainer.steps_per_epoch} steps per epoch")
    say(f"recipe: {_describe_recipe(recipe, trainer.loss_name)}")
    say(f"device: {context.device}, {context.world_size} process(es)"
        + (f", {recipe.batch_size // context.world_size} images per process per step"
           if context.distributed else ""))
    say(f"writing to {out_dir}: last.pt, best.pt, log.jsonl, loss.png, metrics.png, overlays/")
    return trainer.fit(resume=resume)
