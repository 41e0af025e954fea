"""Scoring a trained model on a dataset folder: every case predicted whole (a volume slice by
slice, reassembled and scored in 3-D with its voxel spacing; a 2-D image in pixels), per-case
metrics as :mod:`fastseg.engine.metrics` defines them, their summary, a printed table and a CSV.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..data.cases import read_case
from ..data.layouts import CaseIndex, find_cases
from .metrics import METRICS, compute_metrics, summarize
from .predict import Predictor

__all__ = ["evaluate", "format_results", "write_csv"]


def evaluate(predictor: Predictor, source: str | Path | CaseIndex, *, case_ids: Sequence[str] | None = None,
             layout: str | None = None, label_values: Sequence[int] | None = None,
             metrics: Iterable[str] = METRICS, empty: str = "monai", num_classes: int | None = None,
             progress: bool = True) -> list[dict]:
    """One row of metrics per case of ``source`` (a folder or a :class:`CaseIndex`).

    Args:
        predictor: the model and its preprocessing.
        case_ids: score only these cases (e.g. a split's test ids).
        layout, label_values: as for :func:`fastseg.data.find_cases`.
        metrics, empty: as for :func:`fastseg.engine.metrics.compute_metrics`.
        num_classes: the model's classes (``None`` or 1: binary, truth ``label > 0``; ``K > 1``:
            each foreground class scored, keys ``"dice/1"`` ...).
    Returns ``[{"case_id": str, "shape": "HxW" or "XxYxZ", metric: float, ...}]``.
    """
    index = source if isinstance(source, CaseIndex) else find_cases(source, layout, label_values=label_values)
    if case_ids is not None:
        index = index.subset(case_ids)
    multi = num_classes is not None and num_classes > 1
    metrics = tuple(metrics)
    cases = index.cases
    if progress:
        from tqdm import tqdm
        cases = tqdm(cases, desc="evaluate", unit="case", leave=False)
    rows = []
    for case in cases:
        record, truth = read_case(case, index.labels)
        spatial = len(record.original_size)
        pred = predictor.predict(record.array, spatial)
        # Images are scored in pixels; volumes in their header's units (mm).
        spacing = record.spacing if spatial == 3 else None
        if multi:
            scores = compute_metrics(pred.astype(np.int64), truth.astype(np.int64), num_classes=num_classes,
                                     spacing=spacing, metrics=metrics, empty=empty)
        else:
            scores = compute_metrics(pred > 0, truth > 0, spacing=spacing, metrics=metrics, empty=empty)
        rows.append({"case_id": case.case_id, "shape": "x".join(map(str, record.original_size)), **scores})
    return rows


def write_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """Per-case rows, then ``mean``/``std``/``median`` rows, as CSV (inf and nan spelled so)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    summary = summarize(rows)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
        for stat in ("mean", "std", "median"):
            writer.writerow({"case_id": stat, **{k: v[stat] for k, v in summary.items()}})
    return path


def _cell(value) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def format_results(rows: Sequence[dict], *, per_case: bool = True) -> str:
    """A plain-text table: one line per case (with ``per_case``), then mean ± std over the cases
    where the metric is finite, with the counts of undefined (NaN) and infinite ones."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = []
    if per_case:
        widths = {k: max(len(k), *(len(_cell(r.get(k, ""))) for r in rows)) for k in keys}
        lines.append("  ".join(k.ljust(widths[k]) for k in keys))
        lines += ["  ".join(_cell(r.get(k, "")).ljust(widths[k]) for k in keys) for r in rows]
        lines.append("")
    for key, s in summarize(rows).items():
        extra = "".join(f", {s[n]} {label}" for n, label in (("n_nan", "undefined"), ("n_inf", "infinite")) if s[n])
        lines.append(f"{key:>12}: {_cell(s['mean'])} ± {_cell(s['std'])} (median {_cell(s['median'])}; "
                     f"{s['n']} cases{extra})")
    return "\n".join(lines)
