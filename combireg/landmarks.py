"""Landmark files, landmark sets and target registration error (TRE), in world coordinates.

Internally every point is an LPS millimetre world point (ITK's physical space). Files are
read and written by suffix (:func:`read_landmarks`, :func:`write_landmarks`):

``.fcsv``
    Slicer markups fiducial file. ``# CoordinateSystem = 0|RAS|1|LPS`` is honoured; a file
    without that line is read as RAS (Slicer's historical default) with a warning, unless an
    explicit ``space`` says otherwise. The label column names a point (the id column when the
    label is empty).
``.mrk.json`` / ``.json``
    Slicer markups JSON: ``{"markups": [{"coordinateSystem": "LPS"|"RAS", "controlPoints":
    [{"label": ..., "position": [x, y, z]}, ...]}]}``. ``coordinateSystem`` defaults to LPS
    (the schema's default); control points whose ``positionStatus`` is not ``defined`` are
    skipped with a warning.
``.csv``
    A header row names the columns. The coordinates are ``X,Y,Z`` (any case, in ``space``,
    LPS when no space is given), or self-describing ``l,p,s`` (LPS), ``r,a,s`` (RAS) or
    ``i,j,k`` (voxel indices of a reference image), as in Slicer's control-point CSV tables.
    An optional ``label``/``landmark``/``name``/``id`` column labels the points. Without a
    header: ``x,y,z`` or ``label,x,y,z`` rows.

    The **BraTS-Reg** landmark files (header ``Landmark,X,Y,Z``) hold the ITK (LPS) physical
    coordinates of the image they belong to: the released images (SRI-24 space, 240 x 240 x
    155 voxels of 1 mm) have the ITK header origin ``(0, -239, 0)`` and identity direction,
    so voxel ``(i, j, k)`` lies at ``(i, j - 239, k)`` mm, and the files' Y values are the
    negative numbers in ``[-239, 0]`` this gives (scripts that treat them as voxel indices
    add 239 to Y to undo exactly this). They are therefore read as LPS with no warning.
``.txt`` / ``.pts``
    elastix/transformix point files: a first line ``point`` (LPS physical points) or
    ``index`` (voxel indices of a reference image), a line with the count, then one
    ``x y z`` point per line. transformix's ``outputpoints.txt`` is read too (its
    ``OutputPoint`` column, LPS). These files carry no labels.

``space`` (``"lps"``, ``"ras"`` or ``"index"``) only applies where the file does not declare
its own system; ``index`` needs a ``reference`` image (path, :class:`~combireg.image.Image`
or :class:`~combireg.geometry.Geometry`).

TRE: a target landmark ``x`` goes through the forward field (trilinear interpolation of the
displacement at the world point) to ``x + u(x)`` in source space, and
``TRE = |x + u(x) - s|`` mm for the corresponding source landmark ``s``
(:func:`compute_tre`).

Points outside the field's grid (beyond the hull of its voxel centres, :func:`outside_grid`)
are mapped with the field's edge values (the value at the nearest grid point on the border)
and reported with a warning and a count (``n_outside_grid`` in the TRE statistics); they never
stop a run. A landmark set read from a file remembers that file's coordinate system
(:attr:`Landmarks.space`), so that mapped points can be written back the way they came.
"""
from __future__ import annotations

import csv
import io as _stdio
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CombiregError

__all__ = [
    "Landmarks",
    "LANDMARK_SPACES",
    "parse_space",
    "RAS_TO_LPS",
    "TreResult",
    "landmark_format",
    "read_landmarks",
    "write_landmarks",
    "read_fcsv",
    "write_fcsv",
    "read_markups_json",
    "write_markups_json",
    "read_csv_landmarks",
    "write_csv_landmarks",
    "read_elastix_points",
    "write_elastix_points",
    "match_landmarks",
    "outside_grid",
    "warn_outside",
    "sample_displacement",
    "map_points",
    "tre_statistics",
    "compute_tre",
    "tre_from_files",
]

log = logging.getLogger(__name__)

# RAS <-> LPS: negate the first two axes (the matrix is its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

#: Values of ``space`` (``--landmark-space``).
LANDMARK_SPACES = ("lps", "ras", "index")

MARKUPS_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                  "Resources/Schema/markups-schema-v1.0.3.json#")


@dataclass
class Landmarks:
    """Labelled points in world coordinates.

    Parameters
    ----------
    points_lps_mm : ndarray, (N, 3)
        Points, LPS millimetres.
    labels : list of str, (N,)
        One label per point (unique within a set). Generated as ``"1".."N"`` when empty.
    labelled : bool, optional
        Whether the labels are meaningful names (used to match two sets by label); default:
        whether ``labels`` was given.
    space : {"lps", "ras", "index"} or None
        The coordinate system of the file the points were read from (None: not read from a
        file); :func:`write_landmarks` writes that system back when given it.
    """

    points_lps_mm: np.ndarray
    labels: list = field(default_factory=list)
    labelled: bool | None = None
    space: str | None = None

    def __post_init__(self):
        self.points_lps_mm = np.asarray(self.points_lps_mm, dtype=np.float64).reshape(-1, 3)
        given = bool(self.labels)
        if not given:
            self.labels = [str(i + 1) for i in range(len(self.points_lps_mm))]
        self.labels = [str(v) for v in self.labels]
        if len(self.labels) != len(self.points_lps_mm):
            raise ValueError("one label per point is required")
        if self.labelled is None:
            self.labelled = given

    def __len__(self) -> int:
        return len(self.points_lps_mm)


# ====================================================================================== spaces
def parse_space(space: str | None) -> str | None:
    """``space`` lower-cased and checked against :data:`LANDMARK_SPACES` (None stays None)."""
    if space is None:
        return None
    value = str(space).strip().lower()
    if value not in LANDMARK_SPACES:
        raise CombiregError(f"unknown landmark space {space!r} (use one of {', '.join(LANDMARK_SPACES)})")
    return value


def _reference_geometry(reference, path: Path):
    """The Geometry of ``reference`` (Geometry, Image or image path)."""
    from .geometry import Geometry
    from .image import Image

    if reference is None:
        raise CombiregError(f"{path}: voxel-index landmarks need a reference image (the image they were "
                            f"placed on)")
    if isinstance(reference, Geometry):
        return reference
    if isinstance(reference, Image):
        return reference.geometry
    from . import io

    return io.read_image(reference).geometry


def _to_lps(points: np.ndarray, space: str, reference, path: Path) -> np.ndarray:
    if space == "lps":
        return points
    if space == "ras":
        return points @ RAS_TO_LPS.T
    return _reference_geometry(reference, path).index_to_world(points)


def _from_lps(points: np.ndarray, space: str, reference, path: Path) -> np.ndarray:
    if space == "lps":
        return points
    if space == "ras":
        return points @ RAS_TO_LPS.T
    return _reference_geometry(reference, path).world_to_index(points)


def _finish(path: Path, points: list, labels: list, labelled: bool, space: str, reference) -> Landmarks:
    if not points:
        raise CombiregError(f"{path}: no landmarks in file")
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if not np.all(np.isfinite(pts)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(pts), axis=1))[0])
        name = labels[bad] if bad < len(labels) and labels[bad] else str(bad + 1)
        raise CombiregError(f"{path}: landmark {name!r} has non-finite coordinates")
    labelled = bool(labels) and labelled and all(labels)
    # Unlabelled points are named by their position in the file ("1".."N").
    lm = Landmarks(_to_lps(pts, space, reference, path), labels if labelled else [], labelled=labelled, space=space)
    _warn_outside_reference(lm, space, reference, path)
    return lm


def _warn_outside_reference(lm: Landmarks, space: str, reference, path: Path) -> None:
    """A cheap sanity check: world points far outside an already-loaded reference grid."""
    from .geometry import Geometry
    from .image import Image

    if space == "index" or not isinstance(reference, (Geometry, Image)):
        return
    geometry = reference if isinstance(reference, Geometry) else reference.geometry
    outside = ~geometry.contains_index(geometry.world_to_index(lm.points_lps_mm))
    if outside.any():
        log.warning("%s: %d of %d landmarks lie outside the reference image grid; is the coordinate "
                    "space right (lps/ras/index)?", path, int(outside.sum()), len(lm))


def _number(text: str, path: Path, lineno: int, what: str = "coordinate") -> float:
    try:
        return float(text)
    except ValueError:
        raise CombiregError(f"{path}:{lineno}: {what} is not a number: {text.strip()[:40]!r}") from None


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise CombiregError(f"{path}: no such file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CombiregError(f"{path}: cannot read ({exc.strerror})") from None
    if b"\x00" in data:
        raise CombiregError(f"{path}: not a text landmark file")
    return data.decode("utf-8-sig", errors="replace")


# ====================================================================================== dispatch
def landmark_format(path: str | os.PathLike) -> str:
    """The format of a landmark file from its suffix: ``fcsv``, ``json``, ``csv`` or ``elastix``."""
    name = Path(path).name.lower()
    for suffix, fmt in ((".fcsv", "fcsv"), (".mrk.json", "json"), (".json", "json"), (".csv", "csv"),
                        (".txt", "elastix"), (".pts", "elastix")):
        if name.endswith(suffix):
            return fmt
    raise CombiregError(f"{path}: unknown landmark file type (use .fcsv, .mrk.json, .csv, or an elastix "
                        f"point file .txt/.pts)")


def read_landmarks(path: str | os.PathLike, *, space: str | None = None, reference=None) -> Landmarks:
    """Read a landmark file (format by suffix) into LPS mm.

    Parameters
    ----------
    path : path
        ``.fcsv``, ``.mrk.json``, ``.csv`` or elastix point file (``.txt``/``.pts``).
    space : {"lps", "ras", "index"}, optional
        Coordinate space of files that do not declare theirs (generic CSV, .fcsv without a
        ``CoordinateSystem`` line).
    reference : path, Image or Geometry, optional
        The image voxel-index points refer to (read only when needed).

    Raises
    ------
    CombiregError
        Missing, empty or malformed file, unknown coordinate system, index points without a
        reference.
    """
    path = Path(path)
    fmt = landmark_format(path)
    space = parse_space(space)
    reader = {"fcsv": read_fcsv, "json": read_markups_json, "csv": read_csv_landmarks,
              "elastix": read_elastix_points}[fmt]
    return reader(path, space=space, reference=reference)


def write_landmarks(path: str | os.PathLike, landmarks: Landmarks, *, space: str | None = None,
                    reference=None) -> None:
    """Write landmarks in the format given by the suffix of ``path``.

    ``space`` is the coordinate system written (default LPS): ``ras`` for .fcsv, .mrk.json and
    .csv; ``index`` (with ``reference``) for .csv and elastix point files.
    """
    path = Path(path)
    fmt = landmark_format(path)
    space = parse_space(space) or "lps"
    if fmt == "fcsv":
        if space == "index":
            raise CombiregError(f"{path}: .fcsv files hold world points (lps or ras), not indices")
        write_fcsv(path, landmarks, coordinate_system=space.upper())
    elif fmt == "json":
        write_markups_json(path, landmarks, coordinate_system=space.upper())
    elif fmt == "csv":
        write_csv_landmarks(path, landmarks, space=space, reference=reference)
    else:
        write_elastix_points(path, landmarks, space=space, reference=reference)


# ====================================================================================== .fcsv
_FCSV_SYSTEMS = {"0": "ras", "RAS": "ras", "1": "lps", "LPS": "lps"}


def write_fcsv(path: str | os.PathLike, landmarks: Landmarks, *, coordinate_system: str = "LPS") -> None:
    """Write a Slicer markups fiducial file (.fcsv, version 4.6) in LPS or RAS."""
    cs = coordinate_system.upper()
    if cs not in ("LPS", "RAS"):
        raise CombiregError(f"{path}: .fcsv coordinate system must be LPS or RAS, got {coordinate_system!r}")
    pts = landmarks.points_lps_mm @ RAS_TO_LPS.T if cs == "RAS" else landmarks.points_lps_mm
    lines = [
        "# Markups fiducial file version = 4.6",
        f"# CoordinateSystem = {cs}",
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID",
    ]
    for i, (p, label) in enumerate(zip(pts, landmarks.labels)):
        label = label.replace(",", " ") if landmarks.labelled else ""
        lines.append(f"vtkMRMLMarkupsFiducialNode_{i + 1},{p[0]:.6f},{p[1]:.6f},{p[2]:.6f},0,0,0,1,1,1,0,{label},,")
    Path(path).write_text("\n".join(lines) + "\n")


def read_fcsv(path: str | os.PathLike, *, space: str | None = None, reference=None) -> Landmarks:
    """Read a Slicer markups fiducial file (.fcsv) into LPS mm.

    ``# CoordinateSystem`` may be ``0``/``RAS`` or ``1``/``LPS``; a file without it is read in
    ``space`` if given, else as RAS (Slicer's historical default) with a warning.
    """
    path = Path(path)
    space = parse_space(space)
    system = None
    points, labels, named = [], [], True
    for lineno, raw in enumerate(_read_text(path).splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            if key.strip().lower() == "coordinatesystem":
                value = value.strip().upper()
                if value not in _FCSV_SYSTEMS:
                    raise CombiregError(f"{path}:{lineno}: unknown coordinate system {value!r} (use RAS/0 or LPS/1)")
                system = _FCSV_SYSTEMS[value]
            continue
        cols = next(csv.reader([line]))
        if len(cols) < 4:
            raise CombiregError(f"{path}:{lineno}: expected id,x,y,z,... got {line[:60]!r}")
        points.append([_number(c, path, lineno) for c in cols[1:4]])
        label = cols[11].strip() if len(cols) > 11 else ""
        named &= bool(label)
        labels.append(label)
    if system is None:
        if space is None:
            log.warning("%s: no '# CoordinateSystem' line; reading points as RAS", path)
        system = space or "ras"
    return _finish(path, points, labels, named, system, reference)


# ====================================================================================== .mrk.json
def write_markups_json(path: str | os.PathLike, landmarks: Landmarks, *, coordinate_system: str = "LPS") -> None:
    """Write a Slicer markups JSON point list (.mrk.json) in LPS or RAS."""
    cs = coordinate_system.upper()
    if cs not in ("LPS", "RAS"):
        raise CombiregError(f"{path}: .mrk.json coordinate system must be LPS or RAS, got {coordinate_system!r}")
    pts = landmarks.points_lps_mm @ RAS_TO_LPS.T if cs == "RAS" else landmarks.points_lps_mm
    points = [{"id": str(i + 1), "label": label if landmarks.labelled else "", "position": [float(v) for v in p],
               "positionStatus": "defined"}
              for i, (p, label) in enumerate(zip(pts, landmarks.labels))]
    doc = {"@schema": MARKUPS_SCHEMA,
           "markups": [{"type": "Fiducial", "coordinateSystem": cs, "coordinateUnits": "mm",
                        "controlPoints": points}]}
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def read_markups_json(path: str | os.PathLike, *, space: str | None = None, reference=None) -> Landmarks:
    """Read the control points of a Slicer markups JSON file into LPS mm.

    ``coordinateSystem`` (``LPS`` or ``RAS``) defaults to LPS; ``space`` is not used (the
    schema defines the default).
    """
    path = Path(path)
    try:
        doc = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise CombiregError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    markups = doc.get("markups") if isinstance(doc, dict) else None
    if not isinstance(markups, list):
        raise CombiregError(f"{path}: not a Slicer markups file (no 'markups' list)")
    points, labels, named, systems = [], [], True, []
    for m, markup in enumerate(markups):
        if not isinstance(markup, dict):
            raise CombiregError(f"{path}: markups[{m}] is not an object")
        system = str(markup.get("coordinateSystem", "LPS")).upper()
        if system not in ("LPS", "RAS"):
            raise CombiregError(f"{path}: markups[{m}]: unknown coordinateSystem {system!r} (use LPS or RAS)")
        systems.append(system.lower())
        units = str(markup.get("coordinateUnits", "mm"))
        if units != "mm":
            raise CombiregError(f"{path}: markups[{m}]: coordinateUnits {units!r} is not supported (use mm)")
        for c, cp in enumerate(markup.get("controlPoints") or []):
            where = f"markups[{m}].controlPoints[{c}]"
            if not isinstance(cp, dict):
                raise CombiregError(f"{path}: {where} is not an object")
            status = cp.get("positionStatus", "defined")
            if status != "defined":
                log.warning("%s: %s has positionStatus %r; skipped", path, where, status)
                continue
            pos = cp.get("position")
            if not isinstance(pos, list) or len(pos) != 3:
                raise CombiregError(f"{path}: {where}: 'position' must be a list of 3 numbers")
            try:
                xyz = np.array([float(v) for v in pos])
            except (TypeError, ValueError):
                raise CombiregError(f"{path}: {where}: 'position' must be a list of 3 numbers") from None
            points.append(xyz @ RAS_TO_LPS.T if system == "RAS" else xyz)
            label = str(cp.get("label") or "").strip()
            named &= bool(label)
            labels.append(label)
    landmarks = _finish(path, points, labels, named, "lps", reference)
    landmarks.space = systems[0] if systems else "lps"  # the points were converted to LPS above
    return landmarks


# ====================================================================================== .csv
_LABEL_COLUMNS = ("label", "landmark", "name", "id")
_COORD_COLUMNS = ((("x", "y", "z"), None), (("l", "p", "s"), "lps"), (("r", "a", "s"), "ras"),
                  (("i", "j", "k"), "index"))
_CSV_HEADERS = {"lps": ("Landmark", "X", "Y", "Z"), "ras": ("label", "r", "a", "s"), "index": ("label", "i", "j", "k")}


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _csv_layout(header: list[str], path: Path) -> tuple[int | None, list[int], str | None, int | None]:
    """(label column, x/y/z columns, declared space, 'defined' column) of a CSV header row."""
    names = [h.strip().lower() for h in header]
    label_col = next((names.index(n) for n in _LABEL_COLUMNS if n in names), None)
    for cols, declared in _COORD_COLUMNS:
        if all(c in names for c in cols):
            defined = names.index("defined") if "defined" in names else None
            return label_col, [names.index(c) for c in cols], declared, defined
    raise CombiregError(f"{path}:1: no coordinate columns in the header {header!r} "
                        f"(expected X,Y,Z or l,p,s or r,a,s or i,j,k)")


def read_csv_landmarks(path: str | os.PathLike, *, space: str | None = None, reference=None) -> Landmarks:
    """Read a landmark CSV (BraTS-Reg ``Landmark,X,Y,Z``, Slicer tables or generic) into LPS mm.

    Self-describing columns (``l,p,s``, ``r,a,s``, ``i,j,k``) set the space; ``X,Y,Z`` columns
    are in ``space``, LPS by default (a warning unless the header is BraTS-Reg's).
    """
    path = Path(path)
    space = parse_space(space)
    rows = [(n, r) for n, r in enumerate(csv.reader(_stdio.StringIO(_read_text(path))), start=1)
            if r and any(c.strip() for c in r) and not r[0].lstrip().startswith("#")]
    if not rows:
        raise CombiregError(f"{path}: no landmarks in file")
    first = rows[0][1]
    if all(_is_number(c) for c in first):
        if len(first) not in (3, 4):
            raise CombiregError(f"{path}:{rows[0][0]}: expected x,y,z or label,x,y,z columns, got {len(first)}")
        label_col, xyz, declared, defined = (0 if len(first) == 4 else None), [len(first) - 3 + a for a in range(3)], None, None
        header = None
    else:
        header = [c.strip() for c in first]
        label_col, xyz, declared, defined = _csv_layout(header, path)
        rows = rows[1:]
    if declared is not None:
        system = declared
    elif space is not None:
        system = space
    else:
        if header is None or header[:4] != list(_CSV_HEADERS["lps"]):
            log.warning("%s: no landmark space given; reading X,Y,Z as LPS (ITK physical) coordinates", path)
        system = "lps"
    points, labels, named = [], [], label_col is not None
    for lineno, row in rows:
        if len(row) <= max(xyz):
            raise CombiregError(f"{path}:{lineno}: expected {max(xyz) + 1} columns, got {len(row)}")
        if defined is not None and len(row) > defined and row[defined].strip().lower() in ("false", "0"):
            log.warning("%s:%d: point not defined; skipped", path, lineno)
            continue
        points.append([_number(row[c], path, lineno) for c in xyz])
        label = row[label_col].strip() if label_col is not None and len(row) > label_col else ""
        named &= bool(label)
        labels.append(label)
    return _finish(path, points, labels, named, system, reference)


def write_csv_landmarks(path: str | os.PathLike, landmarks: Landmarks, *, space: str = "lps",
                        reference=None) -> None:
    """Write a landmark CSV: ``Landmark,X,Y,Z`` (LPS, BraTS-Reg style), ``label,r,a,s`` (RAS) or
    ``label,i,j,k`` (voxel indices of ``reference``)."""
    path = Path(path)
    space = parse_space(space) or "lps"
    pts = _from_lps(landmarks.points_lps_mm, space, reference, path)
    buf = _stdio.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(_CSV_HEADERS[space])
    for label, p in zip(landmarks.labels, pts):
        writer.writerow([label] + [f"{v:.6f}" for v in p])
    path.write_text(buf.getvalue())


# ====================================================================================== elastix
_TRANSFORMIX_OUTPUT = re.compile(r"OutputPoint\s*=\s*\[([^\]]*)\]")


def read_elastix_points(path: str | os.PathLike, *, space: str | None = None, reference=None) -> Landmarks:
    """Read an elastix point file (``point``/``index`` header, count, one point a line) or a
    transformix ``outputpoints.txt`` into LPS mm. ``index`` points need ``reference``."""
    path = Path(path)
    lines = [(n, ln.strip()) for n, ln in enumerate(_read_text(path).splitlines(), start=1) if ln.strip()]
    if not lines:
        raise CombiregError(f"{path}: no landmarks in file")
    if lines[0][1].startswith("Point") and "OutputPoint" in lines[0][1]:
        return _read_transformix_output(path, lines, reference)
    kind = lines[0][1].lower()
    if kind not in ("point", "index"):
        raise CombiregError(f"{path}:{lines[0][0]}: expected 'point' or 'index' on the first line of an elastix "
                            f"point file, got {lines[0][1][:40]!r}")
    if len(lines) < 2:
        raise CombiregError(f"{path}: missing the line with the number of points")
    count_text = lines[1][1]
    if not count_text.isdigit():
        raise CombiregError(f"{path}:{lines[1][0]}: expected the number of points, got {count_text[:40]!r}")
    count = int(count_text)
    points = []
    for lineno, text in lines[2:]:
        values = text.split()
        if len(values) != 3:
            raise CombiregError(f"{path}:{lineno}: expected 3 coordinates, got {len(values)}")
        points.append([_number(v, path, lineno) for v in values])
    if len(points) != count:
        raise CombiregError(f"{path}: the header says {count} points but the file has {len(points)}")
    return _finish(path, points, [], False, "lps" if kind == "point" else "index", reference)


def _read_transformix_output(path: Path, lines: list, reference) -> Landmarks:
    points = []
    for lineno, text in lines:
        match = _TRANSFORMIX_OUTPUT.search(text)
        values = match.group(1).split() if match else []
        if len(values) != 3:
            raise CombiregError(f"{path}:{lineno}: no 3-D 'OutputPoint = [ x y z ]' in this transformix line")
        points.append([_number(v, path, lineno) for v in values])
    return _finish(path, points, [], False, "lps", reference)


def write_elastix_points(path: str | os.PathLike, landmarks: Landmarks, *, space: str = "lps",
                         reference=None) -> None:
    """Write an elastix point file: ``point`` (LPS physical) or ``index`` (voxel indices of
    ``reference``). Labels are not stored (the order is)."""
    path = Path(path)
    space = parse_space(space) or "lps"
    if space == "ras":
        raise CombiregError(f"{path}: elastix point files hold LPS points or indices, not RAS")
    pts = _from_lps(landmarks.points_lps_mm, space, reference, path)
    lines = ["point" if space == "lps" else "index", str(len(pts))]
    lines += [" ".join(f"{v:.6f}" for v in p) for p in pts]
    path.write_text("\n".join(lines) + "\n")


# ====================================================================================== matching
def _duplicates(labels: list[str]) -> list[str]:
    seen, dup = set(), []
    for label in labels:
        if label in seen and label not in dup:
            dup.append(label)
        seen.add(label)
    return dup


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(v) for v in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def match_landmarks(target: Landmarks, source: Landmarks) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Corresponding target and source points.

    By label when both sets are labelled (in the target's order), else by order with a
    warning.

    Returns
    -------
    target_pts, source_pts : ndarray, (N, 3)
    labels : list of str

    Raises
    ------
    CombiregError
        Duplicate labels, label sets that differ, or different counts when matching by order.
    """
    if target.labelled and source.labelled:
        for name, lm in (("target", target), ("source", source)):
            dup = _duplicates(lm.labels)
            if dup:
                raise CombiregError(f"{name} landmarks: duplicate label(s) {_few(dup)}")
        only_t = [v for v in target.labels if v not in set(source.labels)]
        only_s = [v for v in source.labels if v not in set(target.labels)]
        if only_t or only_s:
            parts = ([f"only in target: {_few(only_t)}"] if only_t else []) + \
                    ([f"only in source: {_few(only_s)}"] if only_s else [])
            raise CombiregError(f"target and source landmark labels do not match ({'; '.join(parts)})")
        index = {label: i for i, label in enumerate(source.labels)}
        order = [index[label] for label in target.labels]
        return target.points_lps_mm.copy(), source.points_lps_mm[order].copy(), list(target.labels)
    if len(target) != len(source):
        raise CombiregError(f"target has {len(target)} landmarks but source has {len(source)}")
    log.warning("landmarks matched by order (labels are missing on the %s side)",
                "target" if not target.labelled else "source")
    labels = target.labels if target.labelled else source.labels
    return target.points_lps_mm.copy(), source.points_lps_mm.copy(), list(labels)


# ====================================================================================== mapping
def outside_grid(geometry, points_lps_mm: np.ndarray) -> np.ndarray:
    """Boolean ``(N,)``: which world points lie outside ``geometry`` (its voxel centres' hull)."""
    points = np.asarray(points_lps_mm, dtype=np.float64).reshape(-1, 3)
    return ~geometry.contains_index(geometry.world_to_index(points))


def warn_outside(geometry, points_lps_mm: np.ndarray, labels=None, *, what: str = "landmark(s)",
                 where: str = "the field's grid") -> np.ndarray:
    """Log one warning naming how many points lie outside ``geometry`` (and the first few labels).

    Returns
    -------
    ndarray of bool, (N,)
        :func:`outside_grid`.
    """
    outside = outside_grid(geometry, points_lps_mm)
    count = int(outside.sum())
    if count:
        names = [labels[i] if labels is not None else str(i + 1) for i in np.flatnonzero(outside)]
        hint = "; is the coordinate space right (lps/ras/index)?" if count == len(outside) else ""
        log.warning("%d of %d %s lie outside %s (%s): mapped with the field's edge values%s", count, len(outside),
                    what, where, _few(names, 3), hint)
    return outside


def sample_displacement(displacement_lps_mm: np.ndarray, geometry, points_lps_mm: np.ndarray,
                        labels=None) -> np.ndarray:
    """Trilinear interpolation of a (Z, Y, X, 3) LPS-mm field at world points (N, 3).

    A point outside the field's grid gets the field's edge values (the value at the nearest
    grid point on the border: constant extrapolation); :func:`outside_grid` tells which.
    ``labels`` is accepted for compatibility and not used.
    """
    # Why not scipy's map_coordinates (order 1, mode "nearest", what this computes): importing
    # scipy.ndimage and copying each component of a 1 mm field cost ~0.5 s per call; the eight
    # corners of a few hundred points are a small gather (float64 weights, as scipy's).
    points = np.asarray(points_lps_mm, dtype=np.float64).reshape(-1, 3)
    field = np.asarray(displacement_lps_mm)
    shape = np.asarray(field.shape[:3])
    coords = np.clip(geometry.world_to_index(points)[:, ::-1], 0, shape - 1)  # (z, y, x); outside: the edge
    low = np.minimum(np.floor(coords).astype(np.int64), np.maximum(shape - 2, 0))
    frac = coords - low
    out = np.zeros((len(points), field.shape[3]), dtype=np.float64)
    for corner in np.ndindex(2, 2, 2):
        index = np.minimum(low + corner, shape - 1)
        weight = np.prod(np.where(corner, frac, 1.0 - frac), axis=1)
        out += weight[:, None] * field[index[:, 0], index[:, 1], index[:, 2]]
    return out.astype(field.dtype if np.issubdtype(field.dtype, np.floating) else np.float64)


def map_points(displacement_lps_mm: np.ndarray, geometry, points_lps_mm: np.ndarray, labels=None) -> np.ndarray:
    """Map points x to x + u(x) through a field on ``geometry`` (a forward field: target -> source).

    Points outside the field's grid are mapped with its edge values and counted in a warning
    (:func:`warn_outside`).
    """
    points = np.asarray(points_lps_mm, dtype=np.float64).reshape(-1, 3)
    warn_outside(geometry, points, labels)
    return points + sample_displacement(displacement_lps_mm, geometry, points)


# ====================================================================================== TRE
def tre_statistics(errors_mm: np.ndarray, initial_errors_mm: np.ndarray | None = None) -> dict:
    """Summary of target registration errors (mm): mean, std, median, p95, max (+ initial, robustness).

    ``std`` is the population standard deviation over landmarks. Robustness is the BraTS-Reg
    definition: the fraction of landmarks whose error went down.
    """
    e = np.asarray(errors_mm, dtype=np.float64)
    stats = {
        "n": int(e.size),
        "mean": float(e.mean()),
        "std": float(e.std()),
        "median": float(np.median(e)),
        "p95": float(np.percentile(e, 95)),
        "max": float(e.max()),
    }
    if initial_errors_mm is not None:
        e0 = np.asarray(initial_errors_mm, dtype=np.float64)
        stats["initial_mean"] = float(e0.mean())
        stats["initial_std"] = float(e0.std())
        stats["initial_median"] = float(np.median(e0))
        stats["initial_p95"] = float(np.percentile(e0, 95))
        stats["initial_max"] = float(e0.max())
        stats["robustness"] = float(np.mean(e < e0))
    return stats


@dataclass
class TreResult:
    """Per-landmark TRE and its statistics.

    Attributes
    ----------
    labels : list of str
    target_points, source_points, mapped_points : ndarray, (N, 3)
        Target landmarks x, source landmarks s and x + u(x), LPS mm.
    errors_mm : ndarray, (N,)
        ``|x + u(x) - s|``.
    initial_errors_mm : ndarray, (N,)
        ``|x - s|`` (the identity transform).
    outside : ndarray of bool, (N,)
        Target landmarks outside the field's grid (mapped with its edge values); all False
        when no grid was given.
    """

    labels: list
    target_points: np.ndarray
    source_points: np.ndarray
    mapped_points: np.ndarray
    errors_mm: np.ndarray
    initial_errors_mm: np.ndarray
    outside: np.ndarray | None = None

    def __post_init__(self):
        if self.outside is None:
            self.outside = np.zeros(len(self.labels), dtype=bool)

    @property
    def statistics(self) -> dict:
        """:func:`tre_statistics` and ``n_outside_grid`` (target landmarks outside the field's grid)."""
        return {**tre_statistics(self.errors_mm, self.initial_errors_mm), "n_outside_grid": int(self.outside.sum())}

    def rows(self) -> list[dict]:
        """One dict per landmark (label, points, initial error, error, improved)."""
        out = []
        for i, label in enumerate(self.labels):
            row = {"label": label}
            for name, pts in (("target", self.target_points), ("source", self.source_points),
                              ("mapped", self.mapped_points)):
                row.update({f"{name}_{a}": float(v) for a, v in zip("xyz", pts[i])})
            row["initial_error_mm"] = float(self.initial_errors_mm[i])
            row["error_mm"] = float(self.errors_mm[i])
            row["improved"] = bool(self.errors_mm[i] < self.initial_errors_mm[i])
            row["outside_grid"] = bool(self.outside[i])
            out.append(row)
        return out

    def to_dict(self, *, per_landmark: bool = True) -> dict:
        """Statistics (and per-landmark rows) as plain JSON-ready data; points are LPS mm."""
        doc = {"units": "mm", "space": "LPS", "statistics": self.statistics}
        if per_landmark:
            doc["landmarks"] = self.rows()
        return doc

    def write_csv(self, path: str | os.PathLike) -> None:
        rows = self.rows()
        buf = _stdio.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
        Path(path).write_text(buf.getvalue())

    def write_json(self, path: str | os.PathLike, **extra) -> None:
        Path(path).write_text(json.dumps({**extra, **self.to_dict()}, indent=2) + "\n")


def compute_tre(field, geometry, target: Landmarks, source: Landmarks) -> TreResult:
    """Target registration error of a forward field on matched landmarks.

    Parameters
    ----------
    field : ndarray (Z, Y, X, 3) or None
        Forward displacement (LPS mm) on ``geometry``; None is the identity.
    geometry : Geometry or None
        The field's grid. With ``field=None`` and a geometry (a check before a registration),
        target landmarks outside it are counted and warned about.
    target, source : Landmarks

    Target landmarks outside the grid are mapped with the field's edge values, counted
    (``outside``, ``n_outside_grid``) and named in a warning; they never raise.

    Raises
    ------
    CombiregError
        Landmarks that do not match.
    """
    t, s, labels = match_landmarks(target, source)
    if field is not None and geometry is None:
        raise ValueError("a field needs its geometry")
    outside = None
    if geometry is not None:
        where = "the target image grid" if field is None else "the field's grid"
        outside = warn_outside(geometry, t, labels, what="target landmark(s)", where=where)
    mapped = t.copy() if field is None else t + sample_displacement(field, geometry, t)
    return TreResult(labels, t, s, mapped, np.linalg.norm(mapped - s, axis=1), np.linalg.norm(t - s, axis=1),
                     outside)


def tre_from_files(field: str | os.PathLike | None, target: str | os.PathLike, source: str | os.PathLike, *,
                   space: str | None = None, target_reference=None, source_reference=None) -> TreResult:
    """:func:`compute_tre` from files: a field path (or None / ``"identity"``) and two landmark files.

    Voxel-index target landmarks default to the field's grid as reference (it is the target
    grid).
    """
    displacement = geometry = None
    if field is not None and str(field) != "identity":
        from . import io

        displacement, geometry = io.read_displacement(field)
    t = read_landmarks(target, space=space, reference=target_reference if target_reference is not None else geometry)
    s = read_landmarks(source, space=space, reference=source_reference)
    return compute_tre(displacement, geometry, t, s)
