"""Label overlap of two label maps on one grid: Dice per label and HD95 in millimetres.

``combireg evaluate`` scores a registration by the overlap of the target's label map with the
source's label map carried into target space (nearest neighbour). As in Learn2Reg's
evaluation, the labels scored are the non-zero labels present in *both* the target's and the
source's label map (:func:`labels_in_both`); a label the warp loses scores Dice 0.

Dice
    ``2 |A ∩ B| / (|A| + |B|)`` over the voxels of label ``l`` in the target (A) and in the
    warped source (B).
HD95 (mm)
    The robust Hausdorff distance of the two label surfaces: the surface voxels of a mask are
    its voxels with a 6-neighbour outside it (or on the image border); for each surface voxel
    of A the distance to the nearest surface voxel of B, and the other way round; HD95 is the
    larger of the two 95th percentiles (``compute_robust_hausdorff(..., 95)`` of the
    surface-distance package Learn2Reg uses, on voxels instead of surfels). Distances are
    Euclidean in world millimetres: a distance transform with the grid's spacing, exact for
    orthonormal direction cosines (every scanner grid, oblique ones included). NaN when the
    warped label is empty.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .geometry import Geometry

__all__ = ["labels_in_both", "dice", "surface", "surface_distances_mm", "hd95_mm", "label_overlap",
           "overlap_summary"]


def labels_in_both(a: np.ndarray, b: np.ndarray) -> list:
    """The non-zero label values present in both label maps (any grids), sorted."""
    common = np.intersect1d(np.unique(a), np.unique(b))
    return [v.item() for v in common if v != 0]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks of one shape (NaN when both are empty)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else math.nan


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of a boolean (Z, Y, X) mask with a 6-neighbour outside it (or on the array border)."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    inner = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)
    return mask & ~inner


def surface_distances_mm(a: np.ndarray, b: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``a`` to the nearest of ``b``, and back.

    Parameters
    ----------
    a, b : ndarray of bool, (Z, Y, X)
        Two non-empty masks on ``geometry``.

    Returns
    -------
    a_to_b : ndarray, (surface voxels of a,)
    b_to_a : ndarray, (surface voxels of b,)
    """
    from scipy import ndimage

    sampling = tuple(reversed(geometry.spacing))  # (z, y, x) array order
    sa, sb = surface(a), surface(b)
    to_b = ndimage.distance_transform_edt(~sb, sampling=sampling)
    to_a = ndimage.distance_transform_edt(~sa, sampling=sampling)
    return to_b[sa], to_a[sb]


def hd95_mm(a: np.ndarray, b: np.ndarray, geometry: Geometry) -> float:
    """95th-percentile Hausdorff distance (mm) of two masks; NaN when either is empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if not a.any() or not b.any():
        return math.nan
    a_to_b, b_to_a = surface_distances_mm(a, b, geometry)
    return float(max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95)))


def label_overlap(target: np.ndarray, warped: np.ndarray, geometry: Geometry, labels: Sequence,
                  *, initial: np.ndarray | None = None) -> list[dict]:
    """One row per label: Dice and HD95 of the target's label map against the warped source's.

    Parameters
    ----------
    target, warped : ndarray, (Z, Y, X)
        Label maps on ``geometry``.
    labels : sequence
        The label values to score (usually :func:`labels_in_both` of the two original maps).
    initial : ndarray, (Z, Y, X), optional
        The source's label map resampled onto ``geometry`` without the registration (the
        identity): adds ``initial_dice`` and ``initial_hd95_mm``.

    Returns
    -------
    list of dict
        ``label``, ``dice``, ``hd95_mm``, ``target_voxels``, ``warped_voxels`` (and the
        ``initial_`` columns).
    """
    rows = []
    for label in labels:
        a, b = target == label, warped == label
        row = {"label": label, "dice": dice(a, b), "hd95_mm": hd95_mm(a, b, geometry),
               "target_voxels": int(a.sum()), "warped_voxels": int(b.sum())}
        if initial is not None:
            c = initial == label
            row.update(initial_dice=dice(a, c), initial_hd95_mm=hd95_mm(a, c, geometry))
        rows.append(row)
    return rows


def _finite_mean(values) -> float:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def overlap_summary(rows: Sequence[dict]) -> dict:
    """``n_labels``, ``dice_mean`` and ``hd95_mean`` (mean over labels; HD95 over the finite
    ones) of :func:`label_overlap` rows, with the ``initial_`` means where the rows have them."""
    summary = {"n_labels": len(rows), "dice_mean": _finite_mean(r["dice"] for r in rows),
               "hd95_mean": _finite_mean(r["hd95_mm"] for r in rows)}
    if rows and "initial_dice" in rows[0]:
        summary["initial_dice_mean"] = _finite_mean(r["initial_dice"] for r in rows)
        summary["initial_hd95_mean"] = _finite_mean(r["initial_hd95_mm"] for r in rows)
    return summary
