"""Landmark files and landmark sets, always handled internally as LPS mm world points."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CombiregError

__all__ = ["Landmarks", "read_fcsv", "write_fcsv", "RAS_TO_LPS"]

log = logging.getLogger(__name__)

# RAS <-> LPS: negate the first two axes (the matrix is its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Landmarks:
    """Labelled points in world coordinates.

    Parameters
    ----------
    points_lps_mm : ndarray, (N, 3)
        Points, LPS millimetres.
    labels : list of str, (N,)
        One label per point (unique within a set).
    """

    points_lps_mm: np.ndarray
    labels: list = field(default_factory=list)

    def __post_init__(self):
        self.points_lps_mm = np.asarray(self.points_lps_mm, dtype=np.float64).reshape(-1, 3)
        if not self.labels:
            self.labels = [str(i + 1) for i in range(len(self.points_lps_mm))]
        self.labels = [str(v) for v in self.labels]
        if len(self.labels) != len(self.points_lps_mm):
            raise ValueError("one label per point is required")

    def __len__(self) -> int:
        return len(self.points_lps_mm)


def write_fcsv(path: str | os.PathLike, landmarks: Landmarks, *, coordinate_system: str = "LPS") -> None:
    """Write a Slicer markups fiducial file (.fcsv, version 4.6)."""
    cs = coordinate_system.upper()
    if cs not in ("LPS", "RAS"):
        raise ValueError("coordinate_system must be 'LPS' or 'RAS'")
    pts = landmarks.points_lps_mm @ RAS_TO_LPS.T if cs == "RAS" else landmarks.points_lps_mm
    lines = [
        "# Markups fiducial file version = 4.6",
        f"# CoordinateSystem = {cs}",
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID",
    ]
    for i, (p, label) in enumerate(zip(pts, landmarks.labels)):
        label = label.replace(",", " ")
        lines.append(f"vtkMRMLMarkupsFiducialNode_{i + 1},{p[0]:.6f},{p[1]:.6f},{p[2]:.6f},0,0,0,1,1,1,0,{label},,")
    Path(path).write_text("\n".join(lines) + "\n")


def read_fcsv(path: str | os.PathLike) -> Landmarks:
    """Read a Slicer markups fiducial file (.fcsv) into LPS mm.

    ``# CoordinateSystem`` may be ``0``/``RAS`` or ``1``/``LPS``; a file without it is read as
    RAS (Slicer's historical default) with a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise CombiregError(f"{path}: no such file")
    system = None
    points, labels = [], []
    for lineno, raw in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            if key.strip().lower() == "coordinatesystem":
                value = value.strip().upper()
                mapping = {"0": "RAS", "RAS": "RAS", "1": "LPS", "LPS": "LPS"}
                if value not in mapping:
                    raise CombiregError(f"{path}:{lineno}: unknown coordinate system {value!r} (use RAS/0 or LPS/1)")
                system = mapping[value]
            continue
        cols = line.split(",")
        if len(cols) < 4:
            raise CombiregError(f"{path}:{lineno}: expected id,x,y,z,... got {line[:60]!r}")
        try:
            xyz = [float(c) for c in cols[1:4]]
        except ValueError:
            raise CombiregError(f"{path}:{lineno}: coordinates are not numbers: {line[:60]!r}") from None
        points.append(xyz)
        label = cols[11].strip() if len(cols) > 11 and cols[11].strip() else cols[0].strip()
        labels.append(label or str(len(points)))
    if not points:
        raise CombiregError(f"{path}: no landmarks in file")
    if system is None:
        log.warning("%s: no '# CoordinateSystem' line; reading points as RAS", path)
        system = "RAS"
    pts = np.asarray(points, dtype=np.float64)
    if system == "RAS":
        pts = pts @ RAS_TO_LPS.T
    return Landmarks(pts, labels)


def sample_displacement(displacement_lps_mm: np.ndarray, geometry, points_lps_mm: np.ndarray,
                        labels=None) -> np.ndarray:
    """Trilinear interpolation of a (Z, Y, X, 3) LPS-mm field at world points (N, 3).

    Raises
    ------
    CombiregError
        If a point lies outside the field's grid (named by its label).
    """
    from scipy.ndimage import map_coordinates

    points = np.asarray(points_lps_mm, dtype=np.float64).reshape(-1, 3)
    index = geometry.world_to_index(points)
    inside = geometry.contains_index(index)
    if not np.all(inside):
        bad = int(np.flatnonzero(~inside)[0])
        name = labels[bad] if labels is not None else str(bad + 1)
        raise CombiregError(f"landmark {name!r} at LPS {np.round(points[bad], 2).tolist()} mm lies outside "
                            f"the field's grid")
    coords = index[:, ::-1].T  # (z, y, x) array order
    field = np.asarray(displacement_lps_mm)
    return np.stack([map_coordinates(field[..., c], coords, order=1, mode="nearest") for c in range(3)], axis=-1)


def map_points(displacement_lps_mm: np.ndarray, geometry, points_lps_mm: np.ndarray, labels=None) -> np.ndarray:
    """Map target points x to source points x + u(x) through a forward field."""
    points = np.asarray(points_lps_mm, dtype=np.float64).reshape(-1, 3)
    return points + sample_displacement(displacement_lps_mm, geometry, points, labels)


def tre_statistics(errors_mm: np.ndarray, initial_errors_mm: np.ndarray | None = None) -> dict:
    """Summary of target registration errors (mm): mean, std, median, p95, max (+ initial, robustness).

    Robustness is the BraTS-Reg definition: the fraction of landmarks whose error went down.
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
        stats["initial_median"] = float(np.median(e0))
        stats["robustness"] = float(np.mean(e < e0))
    return stats
