"""``fastseg data inspect PATH``: what fastseg makes of a dataset folder, read-only.

Detects the layout, decodes every case (so corrupt files, mismatched grids and unexpected label
values are found now rather than mid-training) and summarises shapes, spacing and classes.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .cases import read_case
from .errors import DataError
from .layouts import find_cases


@dataclass
class InspectionReport:
    """Summary of a dataset folder.

    Attributes:
        root, layout, kind: the folder (the one inside, when the folder given holds only that
            one), the detected layout and ``"image"``/``"volume"``.
        label_mapping: how raw label values become classes.
        cases_found, cases_ok: cases paired by the layout, and those that also decoded cleanly.
        shapes, channels, dtypes: counts of each spatial shape (``"HxW"``/``"XxYxZ"``), channel
            count and image dtype over the good cases.
        spacing: ``{"min", "median", "max"}`` voxel size per axis (NIfTI only).
        classes: class index -> number of cases in which it occurs.
        problems: one line per bad file, naming it.
    """

    root: str
    layout: str | None = None
    kind: str | None = None
    label_mapping: str | None = None
    cases_found: int = 0
    cases_ok: int = 0
    shapes: dict[str, int] = field(default_factory=dict)
    channels: dict[int, int] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)
    spacing: dict[str, list[float]] = field(default_factory=dict)
    classes: dict[int, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.cases_ok > 0


def inspect_dataset(root: str | Path, layout: str | None = None, label_values=None,
                    progress: bool = False) -> InspectionReport:
    """Inspect ``root`` without writing anything; problems are collected, never raised."""
    report = InspectionReport(str(root))
    try:
        index = find_cases(root, layout, skip_bad=True, label_values=label_values)
    except DataError as err:
        report.problems.append(str(err))
        return report
    report.root = str(index.root)  # the folder inside, for an archive unpacked into one folder
    report.layout, report.kind, report.label_mapping = index.layout, index.kind, index.labels.describe()
    report.cases_found = len(index.cases)
    report.problems += [str(err) for err in index.skipped]
    shapes, channels, dtypes, classes, spacings = Counter(), Counter(), Counter(), Counter(), []
    for case in tqdm(index.cases, desc="reading cases", file=sys.stderr, disable=not progress):
        try:
            image, label = read_case(case, index.labels)
        except DataError as err:
            report.problems.append(str(err))
            continue
        report.cases_ok += 1
        shapes["x".join(map(str, image.original_size))] += 1
        channels[int(np.prod(image.array.shape[len(image.original_size):]))] += 1
        dtypes[str(image.array.dtype)] += 1
        if image.affine is not None:  # pixel images have no physical spacing to report
            spacings.append(image.spacing)
        classes.update(np.flatnonzero(np.bincount(label.ravel().astype(np.int64))).tolist())
    report.shapes, report.channels, report.dtypes = dict(shapes.most_common()), dict(channels), dict(dtypes)
    report.classes = dict(sorted(classes.items()))
    if spacings:
        stats = {"min": np.min, "median": np.median, "max": np.max}
        report.spacing = {name: [round(float(v), 4) for v in f(np.array(spacings), axis=0)] for name, f in stats.items()}
    return report


def format_report(report: InspectionReport, max_shapes: int = 5) -> str:
    """The report as the lines ``fastseg data inspect`` prints."""
    lines = [f"dataset: {report.root}"]
    if report.layout is not None:
        shown = list(report.shapes.items())[:max_shapes]
        more = f", ... ({len(report.shapes)} distinct)" if len(report.shapes) > max_shapes else ""
        lines += [
            f"layout:  {report.layout} ({report.kind} files)",
            f"cases:   {report.cases_found} paired, {report.cases_ok} readable",
            "shapes:  " + ", ".join(f"{s} ({n})" for s, n in shown) + more,
            "channels: " + ", ".join(f"{c} ({n})" for c, n in report.channels.items()),
            "dtypes:  " + ", ".join(f"{d} ({n})" for d, n in report.dtypes.items()),
        ]
        if report.spacing:
            lines.append("spacing: " + ", ".join(f"{k} {v}" for k, v in report.spacing.items()))
        lines += [f"labels:  {report.label_mapping}",
                  "classes: " + ", ".join(f"{c} (in {n} cases)" for c, n in report.classes.items())]
    lines.append(f"problems: {len(report.problems)}")
    lines += ["  " + p.replace("\n", "\n  ") for p in report.problems]
    lines.append("usable:  " + ("yes" if report.usable else "no"))
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    """Print the report of ``args.path``; exit code 0 when at least one case is usable, else 1."""
    report = inspect_dataset(args.path, args.layout, args.label_values, progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps({**asdict(report), "usable": report.usable}, indent=2))
    else:
        print(format_report(report))
    return 0 if report.usable else 1
