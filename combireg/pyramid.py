"""The resolution pyramid in world units: the grid and the NCC window of every level.

A level is stated either in millimetres (``PyramidSpacing``, ``NCCWindowWidth``: the default)
or, elastix's way, in voxels (``ImagePyramidSchedule``, ``NCCWindowSize``). Millimetres are
turned into per-axis shrink factors of the grid the field is optimised on, never below 1: a
level is never finer than the image along an axis, so a 4 mm slice axis is not shrunk further
while the in-plane axes are, and a 2 mm image gets the same physical field spacing as a 1 mm
one instead of one twice as coarse.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .filters import smooth_and_resize
from .geometry import Geometry
from .image import Image
from .warp import resample_image

__all__ = ["Level", "pyramid_levels", "shrink_factors", "odd_window", "coarse_copy"]


@dataclass(frozen=True)
class Level:
    """One pyramid level.

    Attributes
    ----------
    index : int
        0 = coarsest.
    factors : tuple of float, (3,)
        Shrink factor along the grid axes x, y, z (>= 1; 1 = the image's own spacing).
    geometry : Geometry
        The level's grid (same field of view as the full grid).
    ncc_window : tuple of int, (3,)
        Local NCC window along z, y, x, odd numbers of this level's voxels.
    """

    index: int
    factors: tuple
    geometry: Geometry
    ncc_window: tuple

    def to_dict(self) -> dict:
        return {"shrink_factors_xyz": [round(f, 4) for f in self.factors],
                "spacing_mm": [round(s, 4) for s in self.geometry.spacing],
                "ncc_window_zyx": list(self.ncc_window)}


def shrink_factors(spacing_mm: float, geometry: Geometry) -> tuple[float, float, float]:
    """Per-axis shrink factors that give a level ``spacing_mm`` apart, never finer than ``geometry``.

    Parameters
    ----------
    spacing_mm : float
        The level's spacing in mm (> 0).
    geometry : Geometry
        The full-resolution grid.

    Returns
    -------
    tuple of float
        ``max(1, spacing_mm / spacing_a)`` along x, y, z.
    """
    if not spacing_mm > 0:
        raise ValueError(f"a level spacing must be positive, got {spacing_mm}")
    return tuple(float(max(1.0, spacing_mm / s)) for s in geometry.spacing)


def coarse_copy(image: Image, mask: Image | None, spacing_mm: float) -> tuple[Image, Image | None]:
    """``image``'s first channel as a pyramid level at least ``spacing_mm`` apart per axis
    (:func:`shrink_factors`; same field of view, Gaussian of half a factor as every level), and
    ``mask`` by nearest neighbour on the same grid. For the linear pre-alignments, which need
    only coarse copies of one channel."""
    factors = shrink_factors(spacing_mm, image.geometry)
    geometry = image.geometry.shrink(factors)
    sigma_zyx = [0.5 * f if f > 1 else 0.0 for f in reversed(factors)]
    data = smooth_and_resize(image.data[:1].detach().to(torch.float32)[None], sigma_zyx, geometry.shape)[0]
    coarse_mask = None if mask is None else resample_image(mask, geometry, mode="nearest")
    return Image(data, geometry), coarse_mask


def odd_window(width_mm: float, spacing_mm: float) -> int:
    """The odd number of voxels (>= 3) of ``spacing_mm`` closest to spanning ``width_mm``."""
    return int(max(3, 2 * round((width_mm / spacing_mm - 1.0) / 2.0) + 1))


def pyramid_levels(settings, geometry: Geometry) -> list[Level]:
    """The levels a registration with ``settings`` runs on ``geometry`` (the working grid).

    Parameters
    ----------
    settings : Settings
        ``pyramid_spacing`` (mm per level) or else ``pyramid_schedule`` (voxel factors per level);
        ``ncc_window_mm`` (mm per level) or else ``ncc_window`` (voxels per level).
    geometry : Geometry
        The full-resolution grid the field is optimised on.

    Returns
    -------
    list of Level
        Coarsest first.
    """
    levels = []
    for index in range(settings.num_levels):
        if settings.pyramid_spacing:
            factors = shrink_factors(settings.pyramid_spacing[index], geometry)
        else:
            factors = tuple(float(f) for f in settings.pyramid_schedule[index])
        level_geometry = geometry.shrink(factors)
        if settings.ncc_window_mm:
            width = settings.ncc_window_mm[index]
            window = tuple(odd_window(width, s) for s in reversed(level_geometry.spacing))
        else:
            window = (int(settings.ncc_window[index]),) * 3
        levels.append(Level(index, factors, level_geometry, window))
    return levels


def voxel_count(levels: list[Level]) -> int:
    """The largest level's number of voxels (for memory estimates)."""
    return int(max(np.prod(level.geometry.shape) for level in levels))
