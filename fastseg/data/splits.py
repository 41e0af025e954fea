"""Deterministic train/val/test splits and k-fold cross-validation over case ids, saved as JSON.

Cases are ordered by a hash of ``(seed, case_id)``, not by a random generator: the same ids and
seed give the same split on any machine and NumPy version, and adding cases to a dataset keeps
the existing ones in the same relative order.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from .io import natural_key


def _shuffled(case_ids: Sequence[str], seed: int) -> list[str]:
    ids = list(dict.fromkeys(case_ids))
    if len(ids) != len(case_ids):
        raise ValueError("case ids must be unique")
    return sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())


def _sorted(ids) -> list[str]:
    return sorted(ids, key=natural_key)


def make_splits(case_ids: Sequence[str], fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
                seed: int = 0) -> dict[str, list[str]]:
    """Split case ids into ``{"train", "val", "test"}`` lists (each in natural order).

    ``fractions`` (train, val, test) must sum to 1; val and test get ``round(n * fraction)``
    cases but at least one when their fraction is positive, train the rest (at least one).
    """
    if abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
    ids = _shuffled(case_ids, seed)
    n_val, n_test = (max(1, int(len(ids) * f + 0.5)) if f > 0 else 0 for f in fractions[1:])
    if len(ids) - n_val - n_test < 1:
        raise ValueError(f"{len(ids)} cases are too few for fractions {fractions}")
    return {"train": _sorted(ids[n_val + n_test:]), "val": _sorted(ids[:n_val]),
            "test": _sorted(ids[n_val:n_val + n_test])}


def kfold_splits(case_ids: Sequence[str], k: int = 5, seed: int = 0) -> list[dict[str, list[str]]]:
    """``k`` folds ``{"train", "val"}``: every case is in exactly one fold's val; fold sizes
    differ by at most one."""
    ids = _shuffled(case_ids, seed)
    if not 2 <= k <= len(ids):
        raise ValueError(f"k must be between 2 and the number of cases ({len(ids)}), got {k}")
    folds = [ids[i::k] for i in range(k)]
    return [{"train": _sorted(c for j, fold in enumerate(folds) if j != i for c in fold), "val": _sorted(folds[i])}
            for i in range(k)]


def save_splits(path: str | Path, splits: dict | list, **meta) -> Path:
    """Write splits (from :func:`make_splits` or :func:`kfold_splits`) and any metadata (seed,
    fractions, dataset...) to a JSON file; it is what makes a run reproducible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, "splits": splits}, indent=1) + "\n")
    return path


def load_splits(path: str | Path) -> dict | list:
    """The splits saved by :func:`save_splits`."""
    return json.loads(Path(path).read_text())["splits"]
