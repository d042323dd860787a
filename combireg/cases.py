"""Cases and datasets: what a study registers, read from where the data lie.

Every layout below gives the same :class:`Case` rows; ``combireg evaluate`` and ``combireg
batch`` take any of them (:func:`read_cases`), and :func:`load_case` reads and checks one case's
images and landmarks before any registration work. Our convention throughout: the fixed image
is the **target**, the moving image the **source** (the forward field maps target points to
source points).

Manifest CSV (:func:`read_manifest`)
    A header row with at least ``id,source,target``. ``source`` and ``target`` are comma-joined
    channel files (CSV-quoted), the same number on both sides; all paths are relative to the
    manifest's folder (or absolute). Optional columns, in pairs (a row fills both or neither):
    ``target_landmarks,source_landmarks`` (any format :func:`combireg.landmarks.read_landmarks`
    reads; voxel-index landmarks refer to the first channel of their side) for the TRE,
    ``target_labels,source_labels`` (label maps on any grid; 0 is background) for Dice and HD95,
    ``target_mask,source_mask`` (binary masks on the grid of their image, as ``run
    --target-mask``: the similarity counts inside them only). An optional ``lesion`` column names
    a mask image in target space (any grid; non-zero = lesion, e.g. tumour or resection
    cavity). Case ids name folders (:data:`NAME_PATTERN`).
BraTS-Reg folder (:func:`read_brats_reg`)
    The challenge's training layout: ``DIR/BraTSReg_NNN/BraTSReg_NNN_00_*_{t1,t1ce,t2,flair}.nii.gz``
    (the pre-operative baseline) and ``..._01_*_...`` (the follow-up), each with an optional
    ``..._landmarks.csv``. As in the challenge, the follow-up is registered to the baseline:
    baseline = fixed = **target**, follow-up = moving = **source**; all four sequences are
    channels (t1, t1ce, t2, flair). The landmark files (``Landmark,X,Y,Z``) hold ITK physical
    (LPS) coordinates of their scan (see :mod:`combireg.landmarks`); with both files the TRE
    is measured, with one (validation data) there is none.
Learn2Reg dataset JSON (:func:`read_learn2reg`)
    ``NAME_dataset.json`` of the Learn2Reg 2021+ tasks: ``training`` (and ``test``) entries
    ``{"image", "label", "mask", "keypoints"...}`` and pair lists ``registration_val``,
    ``registration_test`` and ``training_paired_images`` of ``{"fixed", "moving"}`` (paths
    relative to the JSON). Fixed = **target**, moving = **source**. A pair list is chosen by
    ``pairs`` (``val``, the default; ``test``; ``training``) or given as a CSV file with
    ``fixed,moving`` columns. Labels and masks come from the entries or, as Learn2Reg's own
    evaluation finds them, from ``labelsTr``/``masksTr`` beside ``imagesTr``; keypoints from the
    entries or ``keypointsTr`` (``keypoints01Tr`` ... for pairs of other modalities) or
    ``landmarksTr``, as CSV rows ``x,y,z`` of voxel indices of their image (a ``.nii.gz`` name
    in the JSON stands for the ``.csv`` beside it). Dice where both images have labels, TRE
    where both have keypoints. Case ids are ``FIXED-MOVING`` (file stems without the task name).

:func:`read_training_manifest` reads a manifest for DRN training, which needs only
``id,source,target``.
"""
from __future__ import annotations

import csv
import io as _stdio
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import CombiregError, first_line

__all__ = ["MANIFEST_COLUMNS", "REQUIRED_COLUMNS", "PAIRED_COLUMNS", "NAME_PATTERN", "BRATS_SEQUENCES",
           "LEARN2REG_PAIRS", "Case", "read_cases", "read_manifest", "read_brats_reg", "read_learn2reg", "load_case",
           "read_training_manifest"]

log = logging.getLogger(__name__)

#: Columns every manifest has.
REQUIRED_COLUMNS = ("id", "source", "target")
#: Optional column pairs (target side, source side): a row fills both or neither.
PAIRED_COLUMNS = (("target_landmarks", "source_landmarks"), ("target_labels", "source_labels"),
                  ("target_mask", "source_mask"))
#: The columns ``combireg synth`` writes, in its order.
MANIFEST_COLUMNS = ("id", "source", "target", "target_landmarks", "source_landmarks")
#: Case ids (and ``combireg evaluate``'s method names) name folders: letters, digits and ``_.+-``.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
#: BraTS-Reg's sequences, in channel order.
BRATS_SEQUENCES = ("t1", "t1ce", "t2", "flair")
#: Learn2Reg pair lists by name (``pairs``).
LEARN2REG_PAIRS = {"val": "registration_val", "test": "registration_test", "training": "training_paired_images"}


@dataclass(frozen=True)
class Case:
    """One registration of a study (a manifest row, a BraTS-Reg case, a Learn2Reg pair).

    Attributes
    ----------
    id : str
    source, target : tuple of Path
        Channel files of each side.
    target_landmarks, source_landmarks : Path or None
        Corresponding landmark files (both or neither).
    lesion : Path or None
        A lesion mask in target space (any grid).
    target_labels, source_labels : Path or None
        Label maps of each side (both or neither), for Dice and HD95.
    target_mask, source_mask : Path or None
        Masks on the grid of their image's first channel: the similarity counts inside them.
    landmark_space : {"lps", "ras", "index"} or None
        The layout's own landmark coordinate system (Learn2Reg keypoints: ``index``); None:
        as the files declare, else the caller's ``landmark_space``.
    landmarks_by_order : bool
        The layout pairs the landmark files row by row (Learn2Reg keypoints): they are
        matched by order without the warning unlabelled files get.
    """

    id: str
    source: tuple
    target: tuple
    target_landmarks: Path | None = None
    source_landmarks: Path | None = None
    lesion: Path | None = None
    target_labels: Path | None = None
    source_labels: Path | None = None
    target_mask: Path | None = None
    source_mask: Path | None = None
    landmark_space: str | None = None
    landmarks_by_order: bool = False

    @property
    def has_landmarks(self) -> bool:
        return self.target_landmarks is not None and self.source_landmarks is not None

    @property
    def has_labels(self) -> bool:
        return self.target_labels is not None and self.source_labels is not None

    def files(self) -> list[Path]:
        optional = (self.target_landmarks, self.source_landmarks, self.lesion, self.target_labels,
                    self.source_labels, self.target_mask, self.source_mask)
        return [*self.source, *self.target, *(p for p in optional if p is not None)]

    def missing_files(self) -> list[Path]:
        return [p for p in self.files() if not p.is_file()]


# ====================================================================================== any layout
def read_cases(path: str | os.PathLike, *, pairs: str | None = None) -> list[Case]:
    """The cases of a dataset in any layout: a BraTS-Reg folder, a Learn2Reg ``*.json``, else a
    manifest CSV (module docstring).

    Parameters
    ----------
    path : path
    pairs : str, optional
        Learn2Reg only: ``val`` (default), ``test``, ``training`` or a CSV file of pairs.

    Raises
    ------
    CombiregError
        A missing dataset, a malformed one (its reader's errors), ``pairs`` for another layout.
    """
    path = Path(path)
    if path.is_dir():
        layout = read_brats_reg
    elif path.suffix.lower() == ".json":
        return read_learn2reg(path, pairs=pairs)
    else:
        layout = read_manifest
    if pairs is not None:
        raise CombiregError(f"--pairs chooses Learn2Reg pairs; {path} is not a Learn2Reg dataset JSON")
    return layout(path)


def _check_ids(cases: list[Case], where: Path) -> list[Case]:
    seen = set()
    for case in cases:
        if not NAME_PATTERN.match(case.id):
            raise CombiregError(f"{where}: case id {case.id!r} must be letters, digits and _.+- (it names a folder)")
        if case.id in seen:
            raise CombiregError(f"{where}: duplicate case id {case.id!r}")
        seen.add(case.id)
    if not cases:
        raise CombiregError(f"{where}: no cases")
    return cases


# ====================================================================================== manifest CSV
def _paths(value: str, root: Path) -> tuple:
    return tuple(root / p.strip() for p in value.split(",") if p.strip())


def read_manifest(path: str | os.PathLike) -> list[Case]:
    """The cases of a manifest CSV (module docstring).

    Missing image, landmark or label files are not checked here: such a case fails on its
    own when it runs.

    Raises
    ------
    CombiregError
        Missing or unreadable manifest, missing columns, a column pair with one side only,
        empty fields, bad or duplicate ids, no cases (``FILE:LINE:``).
    """
    path = Path(path)
    if not path.is_file():
        raise CombiregError(f"{path}: no such manifest file")
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise CombiregError(f"{path}: cannot read manifest ({first_line(exc)})") from None
    reader = csv.DictReader(_stdio.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise CombiregError(f"{path}: manifest lacks column(s) {', '.join(missing)} (header must contain "
                            f"{','.join(REQUIRED_COLUMNS)}, optionally {','.join(sum(PAIRED_COLUMNS, ()))},lesion)")
    for pair in PAIRED_COLUMNS:
        if (pair[0] in header) != (pair[1] in header):
            have, lack = pair if pair[0] in header else pair[::-1]
            raise CombiregError(f"{path}: manifest has column {have} but not {lack} (give both or neither)")
    root = path.parent.absolute()
    cases, seen = [], set()
    for lineno, raw in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in raw.items()}
        if not any(row.values()):
            continue
        empty = [c for c in REQUIRED_COLUMNS if not row.get(c)]
        if empty:
            raise CombiregError(f"{path}:{lineno}: empty field(s) {', '.join(empty)}")
        for pair in PAIRED_COLUMNS:
            if bool(row.get(pair[0])) != bool(row.get(pair[1])):
                raise CombiregError(f"{path}:{lineno}: give both {pair[0]} and {pair[1]} or neither")
        case_id = row["id"]
        if not NAME_PATTERN.match(case_id):
            raise CombiregError(f"{path}:{lineno}: case id {case_id!r} must be letters, digits and _.+- "
                                f"(it names a folder)")
        if case_id in seen:
            raise CombiregError(f"{path}:{lineno}: duplicate case id {case_id!r}")
        seen.add(case_id)
        optional = {column: root / row[column] for column in (*sum(PAIRED_COLUMNS, ()), "lesion") if row.get(column)}
        cases.append(Case(case_id, _paths(row["source"], root), _paths(row["target"], root), **optional))
    if not cases:
        raise CombiregError(f"{path}: manifest lists no cases")
    return cases


def read_training_manifest(path: str | os.PathLike) -> list[tuple[str, list[Path], list[Path]]]:
    """``(id, source files, target files)`` of each row of a manifest CSV (:func:`read_manifest`;
    DRN training uses the images only)."""
    return [(case.id, list(case.source), list(case.target)) for case in read_manifest(path)]


# ====================================================================================== BraTS-Reg
def _one(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern))
    if len(found) > 1:
        log.warning("%s: %d files match %s; using %s", folder, len(found), pattern, found[0].name)
    return found[0] if found else None


def read_brats_reg(folder: str | os.PathLike) -> list[Case]:
    """The cases of a BraTS-Reg training (or validation) folder (module docstring).

    A sequence file that is missing makes its case fail alone when it runs (the missing file
    is named by its pattern).

    Raises
    ------
    CombiregError
        Not a folder, or no ``BraTSReg_*`` case folders in it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CombiregError(f"{folder}: no such folder")
    case_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("BraTSReg_"))
    if not case_dirs and folder.name.startswith("BraTSReg_"):
        case_dirs = [folder]  # one case folder given directly
    if not case_dirs:
        raise CombiregError(f"{folder}: no BraTSReg_* case folders (a BraTS-Reg folder holds "
                            f"BraTSReg_NNN/BraTSReg_NNN_00_*_t1.nii.gz ... and _01_ for the follow-up)")
    cases = []
    for case_dir in case_dirs:
        name = case_dir.name
        sides = {}
        for timepoint in ("00", "01"):
            channels = tuple(_one(case_dir, f"{name}_{timepoint}_*_{seq}.nii.gz")
                             or case_dir / f"{name}_{timepoint}_*_{seq}.nii.gz" for seq in BRATS_SEQUENCES)
            sides[timepoint] = (channels, _one(case_dir, f"{name}_{timepoint}_*_landmarks.csv"))
        (target, target_lm), (source, source_lm) = sides["00"], sides["01"]
        both = target_lm is not None and source_lm is not None
        cases.append(Case(name, source, target, target_lm if both else None, source_lm if both else None,
                          landmark_space="lps"))
    return _check_ids(cases, folder)


# ====================================================================================== Learn2Reg
def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def _relative(value: str) -> str:
    return os.path.normpath(str(value).strip())


def _existing(root: Path, value: str | None) -> Path | None:
    """``root/value`` if it exists; a ``.nii.gz`` keypoint name also as the ``.csv`` beside it."""
    if not value:
        return None
    path = root / _relative(value)
    if path.is_file():
        return path
    if path.name.lower().endswith(".nii.gz"):
        csv_path = path.with_name(path.name[:-7] + ".csv")
        if csv_path.is_file():
            return csv_path
    return None


def _beside(root: Path, image: str, folder: str, suffix: str) -> Path | None:
    """The file of ``image`` in a sibling folder (``imagesTr/X.nii.gz`` -> ``labelsTr/X.nii.gz``)."""
    parts = Path(_relative(image)).parts
    if len(parts) < 2 or not parts[-2].startswith("images"):
        return None
    path = root.joinpath(*parts[:-2], folder + parts[-2][len("images"):], _stem(image) + suffix)
    return path if path.is_file() else None


def _modality_suffix(fixed: str, moving: str) -> str:
    """Learn2Reg's keypoint folder suffix of a pair: '' for one modality (or 0000 -> 0001), else
    the two modality numbers sorted (``keypoints01Tr`` for 0001 and 0000)."""
    a, b = _stem(fixed)[-4:], _stem(moving)[-4:]
    if not (a.isdigit() and b.isdigit()) or a == b or (a, b) == ("0000", "0001"):
        return ""
    low, high = sorted((int(a), int(b)))
    return f"{low}{high}"


def _learn2reg_pairs(doc: dict, path: Path, pairs: str | None) -> list[tuple[str, str]]:
    choice = "val" if pairs is None else str(pairs)
    if choice in LEARN2REG_PAIRS:
        key = LEARN2REG_PAIRS[choice]
        if not isinstance(doc.get(key), list) or not doc[key]:
            available = [name for name, k in LEARN2REG_PAIRS.items() if isinstance(doc.get(k), list) and doc[k]]
            raise CombiregError(f"{path}: no {key!r} pairs (available: {', '.join(available) or 'none'}; or give "
                                f"--pairs PAIRS.csv with fixed,moving columns)")
        items = doc[key]
        for n, item in enumerate(items):
            if not isinstance(item, dict) or not item.get("fixed") or not item.get("moving"):
                raise CombiregError(f"{path}: {key}[{n}] needs 'fixed' and 'moving'")
        return [(str(item["fixed"]), str(item["moving"])) for item in items]
    pair_file = Path(choice)
    if not pair_file.is_file():
        raise CombiregError(f"--pairs {choice!r}: give val, test, training or a CSV file of fixed,moving pairs")
    rows = list(csv.DictReader(_stdio.StringIO(pair_file.read_text(errors="replace"))))
    if not rows or not {"fixed", "moving"} <= {(k or "").strip() for k in rows[0]}:
        raise CombiregError(f"{pair_file}: a pairs file has a header with fixed,moving and one pair a row")
    return [(row["fixed"].strip(), row["moving"].strip()) for row in rows if (row.get("fixed") or "").strip()]


def read_learn2reg(path: str | os.PathLike, *, pairs: str | None = None) -> list[Case]:
    """The pairs of a Learn2Reg dataset JSON as cases (module docstring).

    Raises
    ------
    CombiregError
        Missing or malformed JSON, no such pair list, bad pairs file, duplicate pairs.
    """
    path = Path(path)
    if not path.is_file():
        raise CombiregError(f"{path}: no such file")
    try:
        doc = json.loads(path.read_text(errors="replace"))
    except json.JSONDecodeError as exc:
        raise CombiregError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(doc, dict) or not any(k in doc for k in ("training", *LEARN2REG_PAIRS.values())):
        raise CombiregError(f"{path}: not a Learn2Reg dataset JSON (no 'training' or 'registration_val' lists)")
    root = path.parent.absolute()
    entries = {}
    for key in ("training", "test"):
        for entry in doc.get(key) or []:
            if isinstance(entry, dict) and entry.get("image"):
                entries[_relative(entry["image"])] = entry
    prefix = f"{doc.get('name')}_" if doc.get("name") else ""
    cases = []
    for fixed, moving in _learn2reg_pairs(doc, path, pairs):
        suffix = _modality_suffix(fixed, moving)
        sides = {}
        for role, image in (("fixed", fixed), ("moving", moving)):
            entry = entries.get(_relative(image), {})
            label = _existing(root, entry.get("label")) or _beside(root, image, "labels", ".nii.gz")
            mask = _existing(root, entry.get("mask")) or _beside(root, image, "masks", ".nii.gz")
            keypoints = (_existing(root, entry.get(f"keypoints{suffix}")) or _existing(root, entry.get("keypoints"))
                         or _existing(root, entry.get("landmarks"))
                         or _beside(root, image, f"keypoints{suffix}", ".csv")
                         or _beside(root, image, "landmarks", ".csv"))
            sides[role] = (root / _relative(image), label, mask, keypoints)
        (t_img, t_lab, t_mask, t_kp), (s_img, s_lab, s_mask, s_kp) = sides["fixed"], sides["moving"]
        labels = t_lab is not None and s_lab is not None
        keypoints = t_kp is not None and s_kp is not None
        case_id = "-".join(_stem(p).removeprefix(prefix) for p in (fixed, moving))
        cases.append(Case(case_id, (s_img,), (t_img,), t_kp if keypoints else None, s_kp if keypoints else None,
                          target_labels=t_lab if labels else None, source_labels=s_lab if labels else None,
                          target_mask=t_mask, source_mask=s_mask, landmark_space="index", landmarks_by_order=True))
    return _check_ids(cases, path)


# ====================================================================================== one case
def load_case(case: Case, landmark_space: str | None = None) -> tuple:
    """Read a case's images and landmarks and check them before any registration work.

    Returns
    -------
    source, target : Image
    target_landmarks, source_landmarks : Landmarks or None
        Matched (by label or order); None for a case without landmarks. Target landmarks
        outside the target grid are counted in a warning (they are mapped with the field's
        edge values).

    Raises
    ------
    CombiregError
        A missing file, unreadable images or landmarks, landmarks that do not match.
    """
    from . import io
    from .landmarks import compute_tre, outside_grid, read_landmarks

    missing = case.missing_files()
    if missing:
        raise CombiregError(f"missing file {missing[0]}")
    space = case.landmark_space or landmark_space
    target_lm = source_lm = None
    if case.has_landmarks:
        target_lm = read_landmarks(case.target_landmarks, space=space, reference=case.target[0])
        source_lm = read_landmarks(case.source_landmarks, space=space, reference=case.source[0])
        if case.landmarks_by_order and not (target_lm.labelled or source_lm.labelled):
            if len(target_lm) != len(source_lm):
                raise CombiregError(f"{case.target_landmarks.name} has {len(target_lm)} points but "
                                    f"{case.source_landmarks.name} has {len(source_lm)}; they correspond row by row")
            target_lm.labelled = source_lm.labelled = True  # row numbers "1".."N" are the labels
    target = io.read_channels([str(p) for p in case.target], role="target")
    source = io.read_channels([str(p) for p in case.source], role="source")
    if target_lm is not None:
        compute_tre(None, target.geometry, target_lm, source_lm)  # matching (and a warning for points outside)
        outside = outside_grid(source.geometry, source_lm.points_lps_mm)
        if outside.any():
            log.warning("%s: %d source landmark(s) lie outside the source image grid", case.id, int(outside.sum()))
    return source, target, target_lm, source_lm
