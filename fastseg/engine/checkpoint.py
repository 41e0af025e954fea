"""Checkpoints: one file that both resumes a training run and predicts with nothing else.

A checkpoint is a ``torch.save``'d dict (the *payload*)::

    format        "fastseg-checkpoint"
    version       1
    model         {"name": str, "kwargs": dict}    # fastseg.create_model(name, **kwargs); no backend
    model_state   the model's state_dict
    preprocessing {"size": [H, W], "channels": int, "intensity": str, "kind": "image" | "volume"}
    labels        {"num_classes": int (1: binary, sigmoid output),
                   "values": list[int] | None (raw label values in class order),
                   "names": list[str] | None}
    epoch         int (epochs completed)
    metrics       dict
    ...           training state (optimizer, scheduler, scaler, rng, sampler, recipe) when saved
                  by the trainer

It holds only tensors, dicts, lists, tuples, str, int, float, bool and None, so it loads with
``torch.load(weights_only=True)``: loading a file never runs code from it. :func:`save_checkpoint`
refuses anything else, :func:`load_checkpoint` refuses a file that needs arbitrary pickled
objects.

Writes are atomic: the payload goes to ``<path>.tmp-<pid>`` in the same directory, is flushed to
disk, then renamed over ``path``, so an interrupted or failed write never leaves a partial file at
``path`` (the previous checkpoint stays intact).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

__all__ = ["CheckpointError", "FORMAT", "VERSION", "checkpoint_payload", "save_checkpoint",
           "load_checkpoint", "load_weights_only", "model_from_checkpoint"]

FORMAT = "fastseg-checkpoint"
VERSION = 1
_PLAIN = (str, int, float, bool, type(None))


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, truncated or corrupt, needing arbitrary
    pickled objects, or not a fastseg checkpoint. The message starts with the file's path."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):
        return CheckpointError, (self.path, self.problem)


def _check_plain(value: Any, where: str) -> None:
    """``ValueError`` naming the key path of the first value ``weights_only`` loading refuses."""
    if isinstance(value, (torch.Tensor, *_PLAIN)):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise ValueError(f"payload{where}: key {key!r} is a {type(key).__name__}, "
                                 "not a str or int")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    raise ValueError(f"payload{where} is a {type(value).__module__}.{type(value).__qualname__}; "
                     "a checkpoint holds only tensors, dicts, lists, tuples, str, int, float, "
                     "bool and None (so it loads with weights_only=True)")


def checkpoint_payload(model: nn.Module, *, name: str, kwargs: Mapping[str, Any],
                       preprocessing: Mapping[str, Any], labels: Mapping[str, Any],
                       epoch: int = 0, metrics: Mapping[str, Any] | None = None,
                       **training_state) -> dict:
    """The payload dict for ``model`` (its ``state_dict`` taken now, tensors on CPU).

    Args:
        model: the network (a DistributedDataParallel wrapper is unwrapped).
        name, kwargs: how to rebuild it: ``fastseg.create_model(name, **kwargs)``; a ``backend``
            key in ``kwargs`` is dropped (the backend is chosen where the model runs).
        preprocessing: ``{"size": [H, W], "channels": C, "intensity": preset, "kind": "image" |
            "volume"}``.
        labels: ``{"num_classes": int, "values": [raw values] | None, "names": [str] | None}``.
        epoch, metrics: epochs completed and the latest scores.
        training_state: further keys (optimizer, scheduler, rng, ...), plain values only.
    """
    model = getattr(model, "module", model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    kwargs = {k: v for k, v in dict(kwargs).items() if k != "backend"}
    return {"format": FORMAT, "version": VERSION, "model": {"name": name, "kwargs": kwargs},
            "model_state": state, "preprocessing": dict(preprocessing), "labels": dict(labels),
            "epoch": int(epoch), "metrics": dict(metrics or {}), **training_state}


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically and return ``path``.

    The file is written as ``<path>.tmp-<pid>`` in ``path``'s directory (created if needed),
    fsync'ed, and renamed onto ``path`` with ``os.replace``: ``path`` holds either the previous
    file or the new one, never a partial write. ``ValueError`` (naming the key) for a payload
    without ``format == "fastseg-checkpoint"`` or with values ``weights_only`` loading refuses.
    """
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        raise ValueError(f"payload must be a dict with format {FORMAT!r} (see checkpoint_payload)")
    _check_plain(payload, "")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(payload), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable; not every file system lets a directory be opened
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
    return path


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - a file it cannot even scan is corrupt, said by the caller
        return []


def load_weights_only(path: str | Path, map_location: str | torch.device | None = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with its failures as :class:`CheckpointError`:
    a missing file, a truncated or corrupt one, or one needing arbitrary pickled objects (refused,
    naming them; nothing from the file runs). What :func:`load_checkpoint` and
    ``fastseg.models.from_original`` read files with."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = _unsafe_globals(path)
        if unsafe or "allowed global" in str(exc):
            names = ", ".join(unsafe) if unsafe else "see the cause below"
            raise CheckpointError(path, f"refusing to unpickle arbitrary objects ({names}): "
                                  "only tensors and plain containers are loaded, and loading "
                                  "never runs code from a file") from exc
        raise CheckpointError(path, f"truncated or corrupt checkpoint ({_first_line(exc)})") from exc
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, IndexError) as exc:
        raise CheckpointError(path, f"truncated or corrupt checkpoint ({_first_line(exc)})") from exc


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu") -> dict:
    """The payload of the checkpoint at ``path``, loaded with ``torch.load(weights_only=True)``.

    Raises :class:`CheckpointError` (a ``ValueError``; the message names the file) if the file is
    missing, truncated or corrupt, needs arbitrary pickled objects (it is refused, never
    unpickled), or is not a fastseg checkpoint (no ``format == "fastseg-checkpoint"``).
    """
    payload = load_weights_only(path, map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(path, f"not a fastseg checkpoint (no format {FORMAT!r}); for the "
                              "authors' state_dicts use fastseg.models.from_original")
    if payload.get("version", 0) > VERSION:
        raise CheckpointError(path, f"checkpoint version {payload['version']} is newer than this "
                              f"fastseg reads ({VERSION})")
    missing = [k for k in ("model", "model_state", "preprocessing", "labels") if k not in payload]
    if missing:
        raise CheckpointError(path, f"checkpoint lacks {missing}")
    return payload


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def model_from_checkpoint(checkpoint: str | Path | Mapping[str, Any],
                          backend: str = "auto") -> nn.Module:
    """The model a checkpoint describes, holding its weights, in eval mode.

    ``checkpoint``: a path (loaded with :func:`load_checkpoint`) or a payload dict. Built with
    ``fastseg.create_model(payload["model"]["name"], **kwargs, backend=backend)``;
    :class:`CheckpointError` for a model fastseg's registry does not know (a checkpoint of a
    custom network: build it and ``load_state_dict(payload["model_state"])``) or weights that
    do not fit it.
    """
    from ..models import create_model, list_models

    if isinstance(checkpoint, Mapping):
        payload, source = checkpoint, "<payload>"
    else:
        payload, source = load_checkpoint(checkpoint), checkpoint
    spec = payload.get("model") or {}
    name = spec.get("name")
    if not isinstance(name, str) or name.lower() not in list_models():
        raise CheckpointError(source, f"model {name!r} is not one fastseg builds ({list_models()}); "
                              "build the network yourself and load payload['model_state']")
    model = create_model(name, **dict(spec.get("kwargs") or {}), backend=backend)
    try:
        model.load_state_dict(payload["model_state"])
    except RuntimeError as exc:
        raise CheckpointError(source, f"weights do not fit {name}({spec.get('kwargs')}): "
                              f"{_first_line(exc)}") from exc
    return model.eval()
