"""Cases and datasets: what a study registers, read from where the data lie.

Manifest
    A CSV file with the header ``id,source,target,target_landmarks,source_landmarks``
    (:data:`MANIFEST_COLUMNS`). ``source`` and ``target`` are comma-joined channel files
    (CSV-quoted), the same number on both sides; all paths are relative to the manifest's folder
    (or absolute). Landmark files are any format :func:`combireg.landmarks.read_landmarks` reads;
    voxel-index landmarks refer to the first channel of their side. An optional ``lesion``
    column names a mask image in target space (any grid; non-zero = lesion, e.g. tumour or
    resection cavity). Case ids name folders (:data:`NAME_PATTERN`).

:func:`read_manifest` gives the :class:`Case` rows that ``combireg evaluate`` and ``combireg
batch`` run, and :func:`load_case` reads and checks one case's images and landmarks before any
registration work. :func:`read_training_manifest` reads the same file for DRN training, which
needs only ``id,source,target``. Other dataset layouts (such as BraTS-Reg folders or Learn2Reg
JSON) belong here too, as readers giving the same cases.
"""
from __future__ import annotations

import csv
import io as _stdio
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import CombiregError, first_line

__all__ = ["MANIFEST_COLUMNS", "NAME_PATTERN", "Case", "read_manifest", "load_case", "read_training_manifest"]

log = logging.getLogger(__name__)

#: Columns a manifest must have, in the order ``combireg synth`` writes them.
MANIFEST_COLUMNS = ("id", "source", "target", "target_landmarks", "source_landmarks")
#: Case ids (and ``combireg evaluate``'s method names) name folders: letters, digits and ``_.+-``.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class Case:
    """One row of a manifest, paths resolved against the manifest's folder."""

    id: str
    source: tuple
    target: tuple
    target_landmarks: Path
    source_landmarks: Path
    lesion: Path | None = None  # mask in target space (optional ``lesion`` column)

    def files(self) -> list[Path]:
        lesion = [] if self.lesion is None else [self.lesion]
        return [*self.source, *self.target, self.target_landmarks, self.source_landmarks, *lesion]

    def missing_files(self) -> list[Path]:
        return [p for p in self.files() if not p.is_file()]


def _paths(value: str, root: Path) -> tuple:
    return tuple(root / p.strip() for p in value.split(",") if p.strip())


def read_manifest(path: str | os.PathLike) -> list[Case]:
    """The cases of a manifest CSV (see the module docstring).

    Missing image or landmark files are not checked here: such a case fails on its own when
    it runs.

    Raises
    ------
    CombiregError
        Missing or unreadable manifest, missing columns, empty fields, bad or duplicate ids,
        no cases.
    """
    path = Path(path)
    if not path.is_file():
        raise CombiregError(f"{path}: no such manifest file")
    text = path.read_text(errors="replace")
    reader = csv.DictReader(_stdio.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in MANIFEST_COLUMNS if c not in header]
    if missing:
        raise CombiregError(f"{path}: manifest lacks column(s) {', '.join(missing)} (header must contain "
                            f"{','.join(MANIFEST_COLUMNS)})")
    root = path.parent.absolute()
    cases, seen = [], set()
    for lineno, raw in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        if not any(row.values()):
            continue
        empty = [c for c in MANIFEST_COLUMNS if not row.get(c)]
        if empty:
            raise CombiregError(f"{path}:{lineno}: empty field(s) {', '.join(empty)}")
        case_id = row["id"]
        if not NAME_PATTERN.match(case_id):
            raise CombiregError(f"{path}:{lineno}: case id {case_id!r} must be letters, digits and _.+- "
                                f"(it names a folder)")
        if case_id in seen:
            raise CombiregError(f"{path}:{lineno}: duplicate case id {case_id!r}")
        seen.add(case_id)
        cases.append(Case(case_id, _paths(row["source"], root), _paths(row["target"], root),
                          root / row["target_landmarks"], root / row["source_landmarks"],
                          root / row["lesion"] if row.get("lesion") else None))
    if not cases:
        raise CombiregError(f"{path}: manifest lists no cases")
    return cases


def load_case(case: Case, landmark_space: str | None = None) -> tuple:
    """Read a case's images and landmarks and check them before any registration work.

    Returns
    -------
    source, target : Image
    target_landmarks, source_landmarks : Landmarks
        Matched (by label or order), target landmarks inside the target grid.

    Raises
    ------
    CombiregError
        A missing file, unreadable images or landmarks, landmarks that do not match.
    """
    from . import io
    from .landmarks import compute_tre, read_landmarks

    missing = case.missing_files()
    if missing:
        raise CombiregError(f"missing file {missing[0]}")
    target_lm = read_landmarks(case.target_landmarks, space=landmark_space, reference=case.target[0])
    source_lm = read_landmarks(case.source_landmarks, space=landmark_space, reference=case.source[0])
    target = io.read_channels([str(p) for p in case.target], role="target")
    source = io.read_channels([str(p) for p in case.source], role="source")
    compute_tre(None, target.geometry, target_lm, source_lm)  # matching + grid check before the work
    outside = ~source.geometry.contains_index(source.geometry.world_to_index(source_lm.points_lps_mm))
    if outside.any():
        log.warning("%s: %d source landmark(s) lie outside the source image grid", case.id, int(outside.sum()))
    return source, target, target_lm, source_lm


def read_training_manifest(path: str | os.PathLike) -> list[tuple[str, list[Path], list[Path]]]:
    """``(id, source files, target files)`` of each row of a manifest CSV.

    The format of ``combireg evaluate`` (header with ``id,source,target``; channel files
    comma-joined and CSV-quoted, relative to the manifest's folder); other columns are ignored.

    Raises
    ------
    CombiregError
        Missing file, missing columns, empty fields, duplicate ids, no rows (``FILE:LINE:``).
    """
    path = Path(path)
    if not path.is_file():
        raise CombiregError(f"{path}: no such manifest file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CombiregError(f"{path}: cannot read manifest ({first_line(exc)})") from None
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in ("id", "source", "target") if c not in header]
    if missing:
        raise CombiregError(f"{path}: manifest lacks column(s) {', '.join(missing)} (header must contain id,source,target)")
    root = path.parent.absolute()
    rows, seen = [], set()
    for lineno, raw in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in raw.items()}
        if not any(row.values()):
            continue
        empty = [c for c in ("id", "source", "target") if not row.get(c)]
        if empty:
            raise CombiregError(f"{path}:{lineno}: empty field(s) {', '.join(empty)}")
        if row["id"] in seen:
            raise CombiregError(f"{path}:{lineno}: duplicate case id {row['id']!r}")
        seen.add(row["id"])
        files = [[root / p.strip() for p in row[side].split(",") if p.strip()] for side in ("source", "target")]
        rows.append((row["id"], files[0], files[1]))
    if not rows:
        raise CombiregError(f"{path}: manifest lists no cases")
    return rows
