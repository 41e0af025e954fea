"""``fastseg train | evaluate | predict``: what the command line runs, on files in and files out.

Each ``run_*`` takes the parsed arguments and returns an exit status. A user's mistake (unknown
or unreadable file, a folder no layout matches, a checkpoint of another model, wrong channels,
out of memory) ends in one ``fastseg <command>: error: ...`` line and status 2, never a traceback;
an interruption of training saves ``last.pt`` and exits 130 with the command that resumes it.
Nothing is ever written into an input folder. Each command keeps freed memory for reuse
(:mod:`fastseg.memory`; ``FASTSEG_RETAIN_FREED_MEMORY=0`` turns that off).
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

SYNTHETIC = {
    # name: (generator, arguments): sized to train a model to a useful Dice in minutes on a CPU
    "synthetic-2d": ("make_synthetic_2d", {"n": 300, "size": (96, 96), "image_format": "png",
                                           "mask_format": "png"}),
    "synthetic-3d": ("make_synthetic_ct", {"n": 6, "shape": (96, 96, 24)}),
}


class UserError(Exception):
    """A problem the user can fix; printed as one line."""


@contextmanager
def _user_errors(command: str):
    """Turn the errors a user can act on into one line on stderr and exit status 2."""
    from .data.errors import DataError

    if os.environ.get("FASTSEG_DEBUG"):  # full tracebacks, for reporting a bug
        yield
        return
    try:
        yield
    except (DataError, UserError, ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as err:
        raise SystemExit(_fail(command, str(err)))
    except RuntimeError as err:
        text = str(err)
        if "out of memory" in text.lower() or type(err).__name__ == "OutOfMemoryError":
            raise SystemExit(_fail(command, "out of memory: try a smaller --batch-size or --size"))
        raise
    except MemoryError:
        raise SystemExit(_fail(command, "out of memory: try a smaller --batch-size or --size"))


def _fail(command: str, message: str) -> int:
    print(f"fastseg {command}: error: {message}", file=sys.stderr)
    return 2


def _retain_freed_memory() -> None:
    """Each command repeats one kind of step: keep freed memory for reuse (fastseg.memory) unless
    FASTSEG_RETAIN_FREED_MEMORY=0; a value other than 0 or 1 is a user error."""
    from .memory import retain_freed_memory_from_environment

    retain_freed_memory_from_environment(default=True)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def synthetic_data(name: str, out: Path) -> Path:
    """The built-in dataset ``name`` under ``out/data/name``, generated on first use (each
    process of a torchrun job writes its own copy and renames it into place; the data are
    deterministic, so whichever lands is the same)."""
    import importlib

    target = out / "data" / name
    if target.is_dir():
        return target
    generator, kwargs = SYNTHETIC[name]
    make = getattr(importlib.import_module("fastseg.data.synthetic"), generator)
    staging = out / "data" / f".{name}.{os.getpid()}"
    if _rank() == 0:
        print(f"generating {name}: {kwargs['n']} cases in {target}", flush=True)
    make(staging, **kwargs)
    try:
        os.replace(staging, target)
    except OSError:  # another process put its identical copy there first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def run_train(args) -> int:
    """``fastseg train``: the paper recipe of ``--model`` with the given changes, on a folder or
    on built-in synthetic data; checkpoints, log, curves and overlays under ``--out``."""
    with _user_errors("train"):
        _retain_freed_memory()
        from .engine.trainer import Interrupted, train

        out = Path(args.out)
        data = synthetic_data(args.data, out) if args.data in SYNTHETIC else Path(args.data)
        if not data.is_dir():
            raise UserError(f"--data {args.data}: not a folder (or one of {', '.join(SYNTHETIC)})")
        changes = {key: value for key, value in (
            ("epochs", args.epochs), ("batch_size", args.batch_size), ("backend", args.backend),
            ("lr", args.lr), ("seed", args.seed), ("num_workers", args.workers),
            ("size", args.size), ("amp", args.amp)) if value is not None}
        start = time.perf_counter()
        try:
            result = train(args.model, data, out, num_classes=args.num_classes, layout=args.layout,
                           label_values=args.label_values, device=args.device,
                           resume=bool(args.resume), progress=not args.quiet, **changes)
        except Interrupted as stop:
            print(f"\ninterrupted: {stop}; resume with the same command and --resume", file=sys.stderr)
            return 130
        if _rank() == 0:
            best = result.get("best") or {}
            score = (f"{best['metric']} {best['value']:.4f} at epoch {best['epoch']}"
                     if best.get("value") is not None else "- (no validation)")
            print(f"done in {time.perf_counter() - start:.0f} s; best on validation: {score}")
            print(f"checkpoints: {out / 'best.pt'} (best), {out / 'last.pt'} (last)")
    return 0


def _predictor(args):
    from .engine.checkpoint import load_checkpoint
    from .engine.predict import Predictor

    payload = load_checkpoint(args.checkpoint)
    predictor = Predictor.from_checkpoint(payload, backend=args.backend, device=args.device,
                                          batch_size=args.batch_size, tta=args.tta)
    return payload, predictor


def run_evaluate(args) -> int:
    """``fastseg evaluate``: per-case and summary metrics of a checkpoint on a folder (by default
    the test cases of the split it was trained with), printed and written as CSV."""
    with _user_errors("evaluate"):
        _retain_freed_memory()
        from .data.layouts import find_cases
        from .engine.evaluate import evaluate, format_results, write_csv
        from .engine.metrics import EMPTY_MASK_NOTE

        payload, predictor = _predictor(args)
        index = find_cases(args.data, args.layout, label_values=args.label_values)
        case_ids = None
        if args.split != "all":
            splits = payload.get("splits")
            if not splits or args.split not in splits:
                raise UserError(f"{args.checkpoint} records no '{args.split}' split; pass --split all "
                                f"to score every case of {args.data}")
            case_ids = splits[args.split]
            if not case_ids:
                raise UserError(f"the '{args.split}' split of {args.checkpoint} is empty")
            known = {c.case_id for c in index.cases}
            missing = [c for c in case_ids if c not in known]
            if missing:
                raise UserError(f"{len(missing)} of the {args.split} cases are not in {args.data} "
                                f"(e.g. {missing[0]}): is it the folder the model was trained on? "
                                "--split all scores every case found")
        csv_path = Path(args.csv) if args.csv else Path(args.checkpoint).with_name(
            f"evaluate-{args.split}.csv")
        _check_outside(csv_path, [Path(args.data)], "--csv")
        labels = payload.get("labels") or {}
        rows = evaluate(predictor, index, case_ids=case_ids, num_classes=labels.get("num_classes"),
                        empty=args.empty, progress=not args.quiet)
        print(format_results(rows))
        units = "mm (the volumes' voxel spacing)" if index.kind == "volume" else "pixels"
        print(f"\nhd95, hd95_pooled and assd are in {units}. {EMPTY_MASK_NOTE}")
        print(f"\nper-case metrics: {write_csv(rows, csv_path)}")
    return 0


def _check_outside(path: Path, inputs, option: str) -> None:
    """Refuse an output path inside an input folder."""
    resolved = path.resolve()
    for folder in inputs:
        folder = folder.resolve()
        if folder.is_dir() and (resolved == folder or folder in resolved.parents):
            raise UserError(f"{option} {path} is inside the input folder {folder}; fastseg never "
                            "writes into input data: choose another place")


def run_predict(args) -> int:
    """``fastseg predict``: label maps for one file or a folder of images/volumes."""
    with _user_errors("predict"):
        _retain_freed_memory()
        from .data.io import data_suffix, is_nifti, list_data_files, read, write_image, write_nifti
        from .engine.predict import output_path
        from .engine.records import overlay_image

        source, output = Path(args.input), Path(args.output)
        if source.is_dir():
            files = list_data_files(source, recursive=True)
            if not files:
                raise UserError(f"--input {source}: no image or NIfTI files in this folder")
            _check_outside(output, [source], "--output")
            targets = [None] * len(files)
        elif source.is_file():
            files = [source]
            targets = [output if data_suffix(output) else None]  # a file name, or a folder
        else:
            raise UserError(f"--input {source}: no such file or folder")
        _, predictor = _predictor(args)
        for i, path in enumerate(files):
            record = read(path)
            spatial = len(record.original_size)
            try:
                classes = predictor.predict(record.array, spatial)
            except ValueError as err:
                raise UserError(f"{path}: {err}") from err
            rel = path.relative_to(source) if source.is_dir() else Path(path.name)
            folder = output / rel.parent if source.is_dir() else output
            if is_nifti(path):
                target = targets[i] or output_path(path, folder, "_pred.nii.gz")
                write_nifti(target, predictor.label_values(classes), like=record)
            else:
                target = targets[i] or output_path(path, folder, "_pred.png")
                write_image(target, predictor.label_values(classes, visible=True))
            line = f"{path} -> {target}"
            if args.overlay:
                overlay = target.with_name(target.name.split(".")[0] + "_overlay.png")
                write_image(overlay, overlay_image(record.array, classes))
                line += f" (+ {overlay.name})"
            print(line, flush=True)
    return 0
