"""Dataset layouts: recognise a folder as the public dataset it was unpacked from, list its cases.

Each layout is a function ``root -> CaseIndex | None`` (``None``: not this layout) registered in
:data:`LAYOUTS` with a line saying what it expects to find; detection tries them in registration
order, the generic pairings last, and takes the first that pairs at least one case. Unpaired or
ambiguous files are collected as problems in ``CaseIndex.skipped`` rather than dropped. Besides
the public datasets as shipped, common repackagings are recognised: BUSI with ``images/`` and
``mask/`` inside each class folder, any flat folder of ``<case>`` + ``<case>_mask`` (``_label``,
``_seg`` ...) pairs, and ``images/`` + ``masks/`` folders whose mask names carry such a suffix.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .cases import MASK_THRESHOLD, Case, LabelSpec
from .errors import DataError
from .io import file_stem, is_jpeg, is_nifti, list_data_files, natural_key

MMWHS_LABEL_VALUES = (0, 205, 420, 500, 550, 600, 820, 850)
LITS_LABEL_VALUES = (0, 1, 2)  # background, liver, tumour
# Names of image and mask folders (case-insensitive), and the file-name endings that mark a file
# as a mask or as an image, as repackaged datasets use them: "case_mask.png", "case-seg.nii.gz".
IMAGE_FOLDERS = ("images", "image", "imgs")
MASK_FOLDERS = ("masks", "mask", "labels", "label")
LABEL_NAME_SUFFIXES = ("label", "labels", "seg", "segmentation", "mask", "gt")
IMAGE_NAME_SUFFIXES = ("image", "img")
_LABEL_NAME = re.compile(rf"(.+)[_-](?:{'|'.join(LABEL_NAME_SUFFIXES)})", re.IGNORECASE)
_IMAGE_NAME = re.compile(rf"(.+)[_-](?:{'|'.join(IMAGE_NAME_SUFFIXES)})", re.IGNORECASE)


@dataclass
class CaseIndex:
    """The cases found in a dataset folder.

    Attributes:
        layout: name of the detected layout (a key of :data:`LAYOUTS`).
        kind: ``"image"`` (2-D files) or ``"volume"`` (NIfTI).
        root: the folder.
        cases: usable cases, in natural order of their ids.
        labels: how label values become classes for this dataset.
        skipped: problems found while pairing files (image without mask, ...), one per file.
    """

    layout: str
    kind: str
    root: Path
    cases: list[Case]
    labels: LabelSpec = LabelSpec()
    skipped: list[DataError] = field(default_factory=list)

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.cases]

    def subset(self, case_ids: Iterable[str]) -> CaseIndex:
        """The same index restricted to ``case_ids`` (e.g. one split); unknown ids are an error."""
        by_id = {c.case_id: c for c in self.cases}
        wanted = list(case_ids)
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise DataError(f"{len(missing)} case ids not in this dataset, e.g. {missing[:3]}", self.root)
        return replace(self, cases=[by_id[i] for i in wanted])


Layout = Callable[[Path], "CaseIndex | None"]
LAYOUTS: dict[str, Layout] = {}


def register_layout(name: str, expects: str | None = None) -> Callable[[Layout], Layout]:
    """Decorator adding a layout function to :data:`LAYOUTS` under ``name``. ``expects``: what
    the layout looks for, one line, shown when a folder matches no layout (default: the first
    line of the function's docstring)."""
    def register(function: Layout) -> Layout:
        function.expects = expects or (function.__doc__ or "").strip().split("\n")[0]
        LAYOUTS[name] = function
        return function
    return register


def expectation(name: str) -> str:
    """What the layout ``name`` looks for, in one line."""
    return getattr(LAYOUTS[name], "expects", "")


def label_key(path: Path) -> str | None:
    """``case`` for a mask file named ``case_mask.png`` (``_label``, ``-seg``, ... any of
    :data:`LABEL_NAME_SUFFIXES`, any case), else ``None``."""
    match = _LABEL_NAME.fullmatch(file_stem(path))
    return match.group(1) if match else None


def image_key(path: Path) -> str:
    """``case`` for ``case_image.nii.gz`` or ``case-img.png`` (:data:`IMAGE_NAME_SUFFIXES`), else the stem."""
    stem = file_stem(path)
    match = _IMAGE_NAME.fullmatch(stem)
    return match.group(1) if match else stem


def subfolder(root: Path, names: Sequence[str]) -> Path | None:
    """The first folder of ``root`` named one of ``names`` (in that order, case-insensitive)."""
    folders = {p.name.lower(): p for p in sorted(root.iterdir()) if p.is_dir()} if root.is_dir() else {}
    return next((folders[n] for n in names if n in folders), None)


def _group(files: Iterable[Path], key: Callable[[Path], str | None], what: str
           ) -> tuple[dict[str, tuple[Path]], list[DataError]]:
    """Files by pairing key (files whose key is None are not part of the dataset). A key with
    several files is ambiguous: it becomes a problem, not a case."""
    found: dict[str, list[Path]] = {}
    for path in files:
        k = key(path)
        if k is not None:
            found.setdefault(k, []).append(path)
    problems = [DataError(f"{len(paths)} {what} files for case {k!r}: {', '.join(p.name for p in paths)}", paths[0], k)
                for k, paths in found.items() if len(paths) > 1]
    return {k: (paths[0],) for k, paths in found.items() if len(paths) == 1}, problems


def _pair(images: dict[str, tuple[Path, ...]], labels: dict[str, tuple[Path, ...]],
          problems: list[DataError]) -> tuple[list[Case], list[DataError]]:
    """Cases for the keys present on both sides; ``problems`` plus one for each file without its
    partner (keys that already have a problem are not reported twice)."""
    known = {e.case_id for e in problems}
    cases = [Case(k, images[k], labels[k]) for k in sorted(images.keys() & labels.keys() - known, key=natural_key)]
    problems = problems + [DataError("image has no mask", images[k][0], k)
                           for k in sorted(images.keys() - labels.keys() - known, key=natural_key)]
    problems += [DataError("mask has no image", labels[k][0], k)
                 for k in sorted(labels.keys() - images.keys() - known, key=natural_key)]
    return cases, problems


def _pair_files(layout: str, root: Path, image_files: Iterable[Path], label_files: Iterable[Path],
                image_key: Callable[[Path], str | None], label_key: Callable[[Path], str | None],
                labels: LabelSpec, kind: str) -> CaseIndex:
    images, image_problems = _group(image_files, image_key, "image")
    masks, mask_problems = _group(label_files, label_key, "mask")
    cases, problems = _pair(images, masks, image_problems + mask_problems)
    return CaseIndex(layout, kind, root, cases, labels, problems)


def _matcher(pattern: str, key_format: str = "{}") -> Callable[[Path], str | None]:
    """Pairing key = ``key_format`` filled with the groups of a full-name regex match."""
    regex = re.compile(pattern)

    def key(path: Path) -> str | None:
        match = regex.fullmatch(path.name)
        return key_format.format(*match.groups()) if match else None
    return key


@register_layout("nnunet", "dataset.json, imagesTr/<case>_0000.nii.gz (one file per channel), labelsTr/<case>.nii.gz")
def nnunet(root: Path) -> CaseIndex | None:
    """nnU-Net raw: ``dataset.json``, ``imagesTr/{case}_{channel:04d}{ending}``,
    ``labelsTr/{case}{ending}``; channels and label values from ``dataset.json`` (v2 or v1)."""
    spec_path = root / "dataset.json"
    if not (spec_path.is_file() and (root / "imagesTr").is_dir()):
        return None
    try:
        spec = json.loads(spec_path.read_text())
        ending = spec.get("file_ending", ".nii.gz")
        channels = len(spec.get("channel_names") or spec.get("modality") or {"0": "image"})
        # v2: {"background": 0, "liver": 1} (regions: lists of values); v1: {"0": "background", ...}
        raw = spec["labels"]
        values = [int(k) for k in raw] if all(k.isdigit() for k in raw) else \
            [v for val in raw.values() for v in (val if isinstance(val, list) else [val])]
        labels = LabelSpec(tuple(sorted(set(int(v) for v in values))))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"invalid nnU-Net dataset.json ({type(err).__name__}: {err})", spec_path) from err
    channel_file = re.compile(rf"(.+)_(\d{{4}}){re.escape(ending)}")
    by_case: dict[str, dict[int, Path]] = {}
    for path in list_data_files(root / "imagesTr"):
        match = channel_file.fullmatch(path.name)
        if match:
            by_case.setdefault(match.group(1), {})[int(match.group(2))] = path
    images, problems = {}, []
    for case_id, files in by_case.items():
        missing = [c for c in range(channels) if c not in files]
        if missing:
            problems.append(DataError(f"missing channel file(s) {missing} of {channels}", files[min(files)], case_id))
        else:
            images[case_id] = tuple(files[c] for c in range(channels))
    label_dir = root / "labelsTr"
    label_files = list_data_files(label_dir) if label_dir.is_dir() else []
    masks, mask_problems = _group(label_files, _matcher(rf"(.+){re.escape(ending)}"), "label")
    cases, problems = _pair(images, masks, problems + mask_problems)
    kind = "volume" if ending in (".nii", ".nii.gz") else "image"
    return CaseIndex("nnunet", kind, root, cases, labels, problems)


@register_layout("isic2018", "*_Input/ISIC_<id>.jpg with *_GroundTruth/ISIC_<id>_segmentation.png")
def isic2018(root: Path) -> CaseIndex | None:
    """ISIC 2018 task 1: ``*_Input/ISIC_<id>.jpg`` with ``*_GroundTruth/ISIC_<id>_segmentation.png``
    (0/255), any number of Training/Validation/Test folder pairs side by side."""
    inputs = sorted(d for d in root.glob("*_Input") if d.is_dir())
    if not inputs:
        return None
    images = [p for d in inputs for p in list_data_files(d)]
    masks = [p for d in sorted(root.glob("*_GroundTruth")) if d.is_dir() for p in list_data_files(d)]
    return _pair_files("isic2018", root, images, masks, _matcher(r"(ISIC_\d+)\.jpg"),
                       _matcher(r"(ISIC_\d+)_segmentation\.png"), LabelSpec((0, 255)), "image")


BUSI_CLASSES = ("benign", "malignant", "normal")
_BUSI_MASK = re.compile(r"(.+)_mask(?:_\d+)?")


@register_layout("busi", "benign|malignant|normal/ holding '<name>.png' with '<name>_mask.png' (more masks: "
                 "'_mask_1.png' ...), side by side or in images/ and mask/ sub-folders")
def busi(root: Path) -> CaseIndex | None:
    """BUSI: ``benign|malignant|normal/<class> (n).png`` with one or more ``<name>_mask*.png``,
    merged (union). Masks are drawings, some saved RGB(A): binarised at > 127.

    The common repackaging with ``images/`` and ``mask/`` (or ``masks/``) inside each class folder
    is read the same way; there a mask may also carry its image's name unchanged."""
    folders = [f for f in (subfolder(root, [c]) for c in BUSI_CLASSES) if f is not None]
    if not folders:
        return None
    images, masks = [], []
    for folder in folders:
        image_dir, mask_dir = subfolder(folder, IMAGE_FOLDERS), subfolder(folder, MASK_FOLDERS)
        if image_dir is not None and mask_dir is not None:
            images += list_data_files(image_dir)
            masks += list_data_files(mask_dir)
        else:
            files = list_data_files(folder)
            images += [p for p in files if not _BUSI_MASK.fullmatch(file_stem(p))]
            masks += [p for p in files if _BUSI_MASK.fullmatch(file_stem(p))]

    def mask_key(path: Path) -> str:
        match = _BUSI_MASK.fullmatch(file_stem(path))
        return match.group(1) if match else file_stem(path)

    images_by_case, problems = _group(images, file_stem, "image")
    masks_by_case: dict[str, tuple[Path, ...]] = {}
    for path in masks:
        masks_by_case[mask_key(path)] = masks_by_case.get(mask_key(path), ()) + (path,)
    cases, problems = _pair(images_by_case, masks_by_case, problems)
    return CaseIndex("busi", "image", root, cases, LabelSpec(threshold=MASK_THRESHOLD), problems)


@register_layout("lits", "volume-<n>.nii[.gz] with segmentation-<n>.nii[.gz], in any sub-folder")
def lits(root: Path) -> CaseIndex | None:
    """LiTS: ``volume-N.nii`` with ``segmentation-N.nii`` (0 background, 1 liver, 2 tumour), in any
    sub-folders (the challenge ships two training batches); ``.nii.gz`` is accepted too."""
    files = list_data_files(root, recursive=True)
    image_key = _matcher(r"(volume-\d+)\.nii(?:\.gz)?")
    if not any(image_key(p) for p in files):
        return None
    return _pair_files("lits", root, files, files, image_key,
                       _matcher(r"segmentation-(\d+)\.nii(?:\.gz)?", "volume-{}"), LabelSpec(LITS_LABEL_VALUES), "volume")


@register_layout("mmwhs", "ct|mr_train_<n>_image.nii.gz with ct|mr_train_<n>_label.nii.gz, in any sub-folder")
def mmwhs(root: Path) -> CaseIndex | None:
    """MM-WHS: ``ct|mr_train_<n>_image.nii.gz`` with ``..._label.nii.gz``; label values
    0/205/420/500/550/600/820/850 become classes 0-7."""
    files = list_data_files(root, recursive=True)
    image_key = _matcher(r"((?:ct|mr)_.+)_image\.nii(?:\.gz)?")
    if not any(image_key(p) for p in files):
        return None
    return _pair_files("mmwhs", root, files, files, image_key, _matcher(r"((?:ct|mr)_.+)_label\.nii(?:\.gz)?"),
                       LabelSpec(MMWHS_LABEL_VALUES), "volume")


def _images_and_masks(root: Path, mask_folders: Sequence[str]) -> tuple[list[Path], list[Path]] | None:
    image_dir, mask_dir = subfolder(root, IMAGE_FOLDERS), subfolder(root, mask_folders)
    if image_dir is None or mask_dir is None:
        return None
    return list_data_files(image_dir), list_data_files(mask_dir)


@register_layout("kvasir-seg", "images/<id>.jpg with masks/<id>.jpg (JPEG masks)")
def kvasir_seg(root: Path) -> CaseIndex | None:
    """Kvasir-SEG: ``images/<id>.jpg`` with ``masks/<id>.jpg`` (JPEG masks, binarised at > 127)."""
    found = _images_and_masks(root, ["masks"])
    if found is None or not found[1] or not all(is_jpeg(p) for p in found[1]):
        return None
    return _pair_files("kvasir-seg", root, *found, file_stem, file_stem,
                       LabelSpec(threshold=MASK_THRESHOLD), "image")


def _in_folder(root: Path, name_key: Callable[[Path], str | None]) -> Callable[[Path], str | None]:
    """Pairing key = the file's folder relative to ``root`` / ``name_key`` of its name, so that
    only files of one folder pair up; a file directly in ``root`` keeps its bare key."""
    def key(path: Path) -> str | None:
        name = name_key(path)
        if name is None:
            return None
        folder = path.parent.relative_to(root).as_posix()
        return name if folder == "." else f"{folder}/{name}"
    return key


@register_layout("suffix-pairs", "<case>.<ext> or <case>_image.<ext> with <case>_mask.<ext> (or _label, _seg, "
                 "_segmentation, _gt) in the same folder, NIfTI or 2-D images")
def suffix_pairs(root: Path) -> CaseIndex | None:
    """Pairs named by suffix in one folder (or in several: each pairs its own files), e.g.
    ``liver_03_image.nii.gz`` + ``liver_03_label.nii.gz`` or ``scan 7.png`` + ``scan 7_mask.png``.
    The case id is the name without the suffix, prefixed by its sub-folder when not in ``root``.
    Label values are class indices, as in ``generic``."""
    files = list_data_files(root, recursive=True)
    masks = [p for p in files if label_key(p) is not None]
    if not masks:
        return None
    images = [p for p in files if label_key(p) is None]
    kind = "volume" if images and is_nifti(images[0]) else "image"
    return _pair_files("suffix-pairs", root, images, masks, _in_folder(root, image_key),
                       _in_folder(root, label_key), LabelSpec(), kind)


@register_layout("generic", "images/ with masks/ or labels/ (also image/, imgs/, mask/, label/), paired by "
                 "file name; a mask name may end in _mask, _label, _seg ...")
def generic(root: Path) -> CaseIndex | None:
    """Any ``images/`` with ``masks/`` or ``labels/``, paired by file stem (images or NIfTI); a mask
    named ``<stem>_mask`` (or another of :data:`LABEL_NAME_SUFFIXES`) pairs with ``<stem>``.
    Label values are class indices (binary training uses ``label > 0``); JPEG masks are binarised."""
    found = _images_and_masks(root, MASK_FOLDERS)
    if found is None:
        return None
    kind = "volume" if found[0] and is_nifti(found[0][0]) else "image"
    return _pair_files("generic", root, *found, file_stem, lambda p: label_key(p) or file_stem(p),
                       LabelSpec(), kind)


def _tried(names: Iterable[str]) -> str:
    return "".join(f"\n  {name}: {expectation(name)}" for name in names)


def _detect(root: Path, names: Sequence[str]) -> CaseIndex | None:
    """The index of the first layout in ``names`` that pairs a case in ``root``; failing that, of
    the first that recognises the folder (it explains why it pairs nothing); else ``None``."""
    recognised = None
    for name in names:
        index = LAYOUTS[name](root)
        if index is not None and index.cases:
            return index
        recognised = recognised or index
    return recognised


def _only_subfolder(root: Path) -> Path | None:
    """The one folder inside ``root`` when that is all it holds (an archive unpacked into a folder
    named after the dataset: ``Kvasir-SEG/``, ``Dataset_BUSI_with_GT/``), else ``None``."""
    entries = [p for p in root.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX"]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink() else None


def find_cases(root: str | Path, layout: str | None = None, *, skip_bad: bool = False,
               label_values: Sequence[int] | None = None) -> CaseIndex:
    """Detect the layout of ``root`` (or use ``layout``) and list its cases.

    Args:
        root: the dataset folder, as unpacked; a folder holding nothing but one folder (an
            archive unpacked into a folder named after the dataset) is read as that folder when
            a layout pairs cases there.
        layout: a key of :data:`LAYOUTS` to skip detection.
        skip_bad: keep going past unpaired/ambiguous files, listing them in ``skipped``;
            by default the first one raises.
        label_values: raw label values in class order, overriding the layout's (see
            :class:`~fastseg.data.cases.LabelSpec`).

    Raises:
        DataError: not a folder, empty, no layout matches, no cases, or (without ``skip_bad``)
            a problem with a case; the message names the file.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError("not a folder", root)
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    names = list(LAYOUTS) if layout is None else [layout]
    # A folder holding only one folder is first read as that folder, then as itself.
    inner = _only_subfolder(root)
    found = [i for i in (_detect(f, names) for f in ([root] if inner is None else [inner, root])) if i is not None]
    index = next((i for i in found if i.cases), found[0] if found else None)
    if index is None:
        if not list_data_files(root, recursive=True):
            raise DataError("no image or NIfTI files in this folder", root)
        raise DataError(f"folder matches no known layout; tried:{_tried(names)}" if layout is None
                        else f"folder is not in the {layout} layout: expected {expectation(layout)}", root)
    if label_values is not None:
        index.labels = LabelSpec(tuple(label_values))
    if index.skipped and not skip_bad:
        first = index.skipped[0]
        more = f" (and {len(index.skipped) - 1} more problems)" if len(index.skipped) > 1 else ""
        raise DataError(first.problem + more, first.path, first.case_id)
    if not index.cases:
        raise DataError(f"no usable cases in this {index.layout} folder: expected {expectation(index.layout)}",
                        index.root)
    return index
