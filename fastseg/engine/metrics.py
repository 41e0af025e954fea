"""Segmentation metrics as MONAI defines them: Dice, IoU, precision, recall, HD95 and average
symmetric surface distance (ASSD), for one case or a batch, binary or multi-class, 2-D ``(H, W)`` or
3-D ``(D, H, W)`` (any number of spatial axes works), on numpy arrays or torch tensors.

Inputs. A binary mask: non-zero = foreground; a floating-point mask must hold only 0 and 1
(threshold probabilities first, e.g. ``prob > 0.5``). A label map: integer class indices
``0 .. num_classes - 1``. Tensors on any device are copied to host memory. Scores are Python floats.

Definitions (voxel counts tp, fp, fn of the prediction P against the truth T):

- ``dice = 2·tp / (2·tp + fp + fn)``, ``iou = tp / (tp + fp + fn)`` (Jaccard),
  ``precision = tp / (tp + fp)``, ``recall = tp / (tp + fn)``.
- Edges: a mask XOR its binary erosion by the face-connected (cross) structuring element, with
  voxels outside the array counted as background, so a mask touching the image border has an edge
  there (MONAI's ``get_mask_edges``). ``d(P→T)`` holds, for each edge voxel of P, the Euclidean
  distance to the nearest edge voxel of T in physical units: ``spacing`` gives the voxel size per
  array axis, in the order of the axes (a scalar means isotropic; default 1, i.e. voxels).
- ``hd95 = max(p95(d(P→T)), p95(d(T→P)))``, p95 being numpy's default linear-interpolation
  percentile: MONAI's ``compute_hausdorff_distance(percentile=95)``. ``hd95_pooled`` is the p95 of
  both sets concatenated (the variant of some challenge toolkits).
- ``assd = mean(d(P→T) ∪ d(T→P))``, each edge voxel weighing once: MONAI's
  ``compute_average_surface_distance(symmetric=True)``.

Empty masks, ``empty="monai"`` (default; MONAI's behaviour):

- dice, iou: NaN when T is empty (MONAI's ``ignore_empty=True``), whatever P is; 0 when only P is.
- precision, recall: NaN when P, resp. T, is empty (0/0), as MONAI's confusion-matrix metrics.
- hd95, hd95_pooled, assd: NaN when both are empty; +inf when exactly one is (a surface is missing).
  One difference from MONAI (1.6.1, checked): there ``compute_hausdorff_distance(percentile=95)``
  gives NaN when exactly one mask is empty, its percentile interpolating between infinite distances
  (inf - inf), while its plain Hausdorff distance (no percentile) and its ASSD give +inf. fastseg
  keeps +inf for hd95 as well, at every percentile: a missed or spurious structure is the worst
  case, counted in :func:`summarize`'s ``n_inf``, rather than "undefined" (``n_nan``) like a case
  with nothing to find. :data:`EMPTY_MASK_NOTE` says it in one paragraph, for reports.

``empty="perfect"``: a ratio whose denominator is 0 is 1 and two empty masks are at distance 0, so
"both empty" scores perfectly; this is the ``s → 0`` limit of the smoothed per-image scores
``(x + s) / (y + s)`` (s = 1e-5) of the LightAWNet and LGMSNet evaluations. Exactly one empty mask
still gives Dice and IoU 0 and infinite distances.

NaN means "undefined for this case": :func:`summarize` leaves it out of mean/std/median and counts
it (``n_nan``). +inf is reported per case as such; :func:`summarize` counts it (``n_inf``) and
leaves it out of mean/std/median, which would otherwise all be inf.

Speed: distances come from SciPy's exact Euclidean distance transform of ``~edges`` with
``sampling=spacing`` (SciPy: a declared dependency, well maintained, and what MONAI itself uses
here), O(voxels) instead of the O(edges²) of pairwise distances. Both masks are first cropped to the
bounding box of their union: outside it lies only background, which the erosion assumes beyond the
array anyway, and every edge voxel lies inside it, so the crop changes no edge and no distance.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
from scipy import ndimage

__all__ = ["METRICS", "ISIC_JACCARD_THRESHOLD", "EMPTY_MASK_NOTE", "dice", "iou", "precision", "recall",
           "hd95", "assd", "compute_metrics", "compute_metrics_batch", "summarize"]

Array = Union[np.ndarray, torch.Tensor]
Spacing = Union[float, Sequence[float], None]

METRICS = ("dice", "iou", "precision", "recall", "hd95", "hd95_pooled", "assd")
_OVERLAP = ("dice", "iou", "precision", "recall")
_EMPTY = ("monai", "perfect")
ISIC_JACCARD_THRESHOLD = 0.65
# What a report of per-case scores should say about empty masks (``empty="monai"``).
EMPTY_MASK_NOTE = (
    "Empty masks: Dice and IoU are NaN when the ground truth is empty, precision when the prediction "
    "is; HD95 and ASSD are +inf when exactly one of prediction and ground truth is empty and NaN when "
    "both are. NaN and inf are left out of mean/std/median and counted (n_nan, n_inf). MONAI 1.6.1 "
    "gives NaN, not +inf, for HD95 with one mask empty (+inf for its plain Hausdorff distance and ASSD).")


def _numpy(x: Array) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        # numpy has no bfloat16
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


def _binary(x: Array) -> np.ndarray:
    x = _numpy(x)
    if x.dtype == bool:
        return x
    if np.issubdtype(x.dtype, np.floating) and not ((x == 0) | (x == 1)).all():
        raise ValueError("a floating-point mask must hold only 0 and 1; threshold probabilities "
                         "first (e.g. prob > 0.5)")
    return x != 0


def _pair(pred: Array, target: Array) -> tuple[np.ndarray, np.ndarray]:
    p, t = _binary(pred), _binary(target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target shapes differ: {p.shape} vs {t.shape}")
    return p, t


def _check_empty(empty: str) -> None:
    if empty not in _EMPTY:
        raise ValueError(f"empty must be one of {_EMPTY}, got {empty!r}")


def _spacing(spacing: Spacing, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    values = np.atleast_1d(np.asarray(spacing, dtype=float))
    if values.size == 1:
        values = np.repeat(values, ndim)
    if values.shape != (ndim,) or not (values > 0).all():
        raise ValueError(f"spacing must be a positive number or {ndim} positive numbers (one per "
                         f"array axis), got {spacing!r}")
    return tuple(values.tolist())


def _ratio(numerator: int, denominator: int, empty: str) -> float:
    if denominator:
        return numerator / denominator
    return 1.0 if empty == "perfect" else math.nan


def _overlap_scores(p: np.ndarray, t: np.ndarray, empty: str) -> dict[str, float]:
    tp = int(np.count_nonzero(p & t))
    fp, fn = int(np.count_nonzero(p)) - tp, int(np.count_nonzero(t)) - tp
    ignored = empty == "monai" and tp + fn == 0
    return {"dice": math.nan if ignored else _ratio(2 * tp, 2 * tp + fp + fn, empty),
            "iou": math.nan if ignored else _ratio(tp, tp + fp + fn, empty),
            "precision": _ratio(tp, tp + fp, empty),
            "recall": _ratio(tp, tp + fn, empty)}


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(hits[0], hits[-1] + 1))
    return tuple(box)


def _edges(mask: np.ndarray) -> np.ndarray:
    return mask ^ ndimage.binary_erosion(mask)  # border_value=0: outside the array is background


def _surface_distances(p: np.ndarray, t: np.ndarray, spacing: tuple[float, ...]):
    """Directed surface distances ``(d(P→T), d(T→P))`` of two non-empty masks (float64 arrays)."""
    box = _bounding_box(p | t)  # for speed only; why it changes nothing: module docstring
    edges_p, edges_t = _edges(p[box]), _edges(t[box])
    return (ndimage.distance_transform_edt(~edges_t, sampling=spacing)[edges_p],
            ndimage.distance_transform_edt(~edges_p, sampling=spacing)[edges_t])


def _distance_scores(p: np.ndarray, t: np.ndarray, spacing: Spacing, empty: str,
                     percentile: float = 95.0) -> dict[str, float]:
    spacing = _spacing(spacing, p.ndim)
    has_p, has_t = bool(p.any()), bool(t.any())
    if not (has_p and has_t):
        value = math.inf if has_p or has_t else (0.0 if empty == "perfect" else math.nan)
        return dict.fromkeys(("hd95", "hd95_pooled", "assd"), value)
    d_pt, d_tp = _surface_distances(p, t, spacing)
    pooled = np.concatenate([d_pt, d_tp])
    return {"hd95": float(max(np.percentile(d_pt, percentile), np.percentile(d_tp, percentile))),
            "hd95_pooled": float(np.percentile(pooled, percentile)),
            "assd": float(pooled.mean())}


def dice(pred: Array, target: Array, *, empty: str = "monai") -> float:
    """Dice ``2·tp / (2·tp + fp + fn)`` of two binary masks. Empty T: NaN (``monai``)."""
    _check_empty(empty)
    return _overlap_scores(*_pair(pred, target), empty)["dice"]


def iou(pred: Array, target: Array, *, empty: str = "monai") -> float:
    """IoU (Jaccard) ``tp / (tp + fp + fn)`` of two binary masks. Empty T: NaN (``monai``)."""
    _check_empty(empty)
    return _overlap_scores(*_pair(pred, target), empty)["iou"]


def precision(pred: Array, target: Array, *, empty: str = "monai") -> float:
    """Precision ``tp / (tp + fp)``. Empty P: NaN (``monai``) or 1 (``perfect``)."""
    _check_empty(empty)
    return _overlap_scores(*_pair(pred, target), empty)["precision"]


def recall(pred: Array, target: Array, *, empty: str = "monai") -> float:
    """Recall (sensitivity) ``tp / (tp + fn)``. Empty T: NaN (``monai``) or 1 (``perfect``)."""
    _check_empty(empty)
    return _overlap_scores(*_pair(pred, target), empty)["recall"]


def hd95(pred: Array, target: Array, spacing: Spacing = None, *, pooled: bool = False,
         percentile: float = 95.0, empty: str = "monai") -> float:
    """95th-percentile Hausdorff distance of two binary masks, in the units of ``spacing``.

    MONAI's definition: the larger of the two directed 95th percentiles (linear interpolation) of
    the edge-to-edge distances, ``max(p95(d(P→T)), p95(d(T→P)))``. ``pooled=True``: the 95th
    percentile of both directed sets together. ``percentile=100``: the classical Hausdorff distance.
    One mask empty: +inf; both empty: NaN (``monai``) or 0 (``perfect``).

    Unlike MONAI with one mask empty: MONAI 1.6.1's ``compute_hausdorff_distance(percentile=95)``
    returns NaN there (a percentile of infinite distances) and +inf only without a percentile;
    fastseg returns +inf at every percentile, so the case counts as a miss (``n_inf`` in
    :func:`summarize`), not as undefined. See :data:`EMPTY_MASK_NOTE`.
    """
    _check_empty(empty)
    scores = _distance_scores(*_pair(pred, target), spacing, empty, percentile)
    return scores["hd95_pooled" if pooled else "hd95"]


def assd(pred: Array, target: Array, spacing: Spacing = None, *, empty: str = "monai") -> float:
    """Average symmetric surface distance, in the units of ``spacing``.

    The mean of both directed edge-to-edge distance sets concatenated (MONAI's
    ``compute_average_surface_distance(symmetric=True)``), so the larger surface weighs more.
    One mask empty: +inf, as in MONAI (whose HD95 is NaN there; fastseg's :func:`hd95` is +inf too);
    both empty: NaN (``monai``) or 0 (``perfect``).
    """
    _check_empty(empty)
    return _distance_scores(*_pair(pred, target), spacing, empty)["assd"]


def _label_maps(pred: Array, target: Array, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    p, t = _numpy(pred), _numpy(target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target shapes differ: {p.shape} vs {t.shape}")
    for labels in (p, t):
        if not np.issubdtype(labels.dtype, np.integer) or (
                labels.size and (labels.min() < 0 or labels.max() >= num_classes)):
            raise ValueError(f"label maps must hold integers in [0, {num_classes}), got dtype "
                             f"{labels.dtype} (take the argmax over channels first)")
    return p, t


def compute_metrics(pred: Array, target: Array, *, num_classes: Optional[int] = None,
                    spacing: Spacing = None, metrics: Iterable[str] = METRICS,
                    empty: str = "monai", include_background: bool = False) -> dict[str, float]:
    """All requested metrics of one case: ``{name: value}`` (binary) or ``{"name/c": value}``.

    pred, target: one shape, ``(H, W)`` or ``(D, H, W)``. ``num_classes=None``: binary masks
    (non-zero = foreground), keys are the metric names. ``num_classes=C``: integer label maps with
    values in ``[0, C)``; each class ``c`` (from 1, or from 0 with ``include_background``) is scored
    as the binary masks ``pred == c`` vs ``target == c``, under keys ``"dice/1"``, ``"hd95/2"``...
    ``metrics``: a subset of :data:`METRICS`; the surface distances are computed once per class for
    all of hd95, hd95_pooled and assd. Conventions and empty-mask rules: see the module docstring.
    """
    _check_empty(empty)
    metrics = tuple(metrics)
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
    if num_classes is None:
        classes = [("", *_pair(pred, target))]
    else:
        labels_p, labels_t = _label_maps(pred, target, num_classes)
        # a generator: one class's masks in memory at a time
        classes = ((f"/{c}", labels_p == c, labels_t == c)
                 for c in range(0 if include_background else 1, num_classes))
    row = {}
    for suffix, p, t in classes:
        scores = _overlap_scores(p, t, empty)
        if any(m not in _OVERLAP for m in metrics):
            scores.update(_distance_scores(p, t, spacing, empty))
        row.update({f"{m}{suffix}": scores[m] for m in metrics})
    return row


def compute_metrics_batch(pred: Array, target: Array, **kwargs) -> list[dict[str, float]]:
    """:func:`compute_metrics` for each case along the leading dim of ``(N, H, W)`` or
    ``(N, D, H, W)``: one row per case, ready for :func:`summarize`. ``spacing`` applies to all."""
    if len(pred) != len(target):
        raise ValueError(f"pred and target hold {len(pred)} and {len(target)} cases")
    return [compute_metrics(p, t, **kwargs) for p, t in zip(pred, target)]


def _statistics(values: np.ndarray) -> dict[str, float]:
    finite = values[np.isfinite(values)]
    stats = ({"mean": float(finite.mean()), "std": float(finite.std()),
              "median": float(np.median(finite))} if finite.size
             else dict.fromkeys(("mean", "std", "median"), math.nan))
    return {**stats, "n": int(finite.size), "n_nan": int(np.isnan(values).sum()),
            "n_inf": int(np.isinf(values).sum())}


def summarize(rows: Iterable[dict], *, thresholded_jaccard: bool = False) -> dict[str, dict]:
    """Aggregate a per-case table into ``{key: {mean, std, median, n, n_nan, n_inf}}``.

    ``rows``: one dict per case (e.g. from :func:`compute_metrics`); each numeric key (per metric,
    and per class for multi-class) is summarised over the cases, non-numeric ones (case ids) are
    skipped, a key missing from a row counts as NaN. mean, std (population, ``ddof=0``) and median
    are over the finite values only; ``n`` counts those, ``n_nan`` the undefined cases, ``n_inf``
    the cases with a missing surface. ``thresholded_jaccard=True`` adds, for each ``iou`` key, a
    ``thresholded_jaccard`` key: the ISIC-2018 score, per-case IoU set to 0 below 0.65.
    """
    rows = list(rows)
    keys = dict.fromkeys(k for row in rows for k, v in row.items()
                         if isinstance(v, numbers.Real) and not isinstance(v, bool))
    columns = {k: np.array([row.get(k, math.nan) for row in rows], dtype=float) for k in keys}
    if thresholded_jaccard:
        for key in keys:
            name, slash, cls = key.partition("/")
            if name == "iou":
                v = columns[key]
                columns[f"thresholded_jaccard{slash}{cls}"] = np.where(
                    v < ISIC_JACCARD_THRESHOLD, 0.0, v)
    return {key: _statistics(values) for key, values in columns.items()}
