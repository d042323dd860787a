"""Image grids in world coordinates.

A :class:`Geometry` is the ITK notion of an image grid: size, origin, spacing and direction.
World coordinates are ITK's physical space, LPS millimetres. Continuous indices are in ITK
order ``(i, j, k)`` = ``(x, y, z)``; arrays are stored the numpy/torch way, ``(Z, Y, X)``.

Three coordinate systems are used and converted here only:

* world (LPS mm): ``p = origin + direction @ (spacing * index)``;
* index (voxels, ITK order);
* normalised: PyTorch ``grid_sample`` coordinates with ``align_corners=True``,
  ``n = 2 * index / (size - 1) - 1`` per axis, ordered ``(x, y, z)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Geometry"]


def _as_tuple(values, length: int, name: str, dtype=float) -> tuple:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size != length:
        raise ValueError(f"{name} must have {length} values, got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    return tuple(dtype(v) for v in arr)


@dataclass(frozen=True)
class Geometry:
    """A 3-D image grid.

    Parameters
    ----------
    size : tuple of int, (3,)
        Number of voxels along x, y, z (ITK order).
    origin : tuple of float, (3,)
        World position (LPS mm) of the centre of voxel (0, 0, 0).
    spacing : tuple of float, (3,)
        Voxel size in mm along the grid axes.
    direction : tuple of float, (9,)
        Row-major 3x3 direction cosine matrix; column ``a`` is the world direction of grid
        axis ``a``.
    """

    size: tuple
    origin: tuple = (0.0, 0.0, 0.0)
    spacing: tuple = (1.0, 1.0, 1.0)
    direction: tuple = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self):
        size = _as_tuple(self.size, 3, "size", int)
        if min(size) < 1:
            raise ValueError(f"size must be positive, got {size}")
        spacing = _as_tuple(self.spacing, 3, "spacing")
        if min(spacing) <= 0:
            raise ValueError(f"spacing must be positive, got {spacing}")
        direction = _as_tuple(self.direction, 9, "direction")
        if abs(np.linalg.det(np.reshape(direction, (3, 3)))) < 1e-6:
            raise ValueError("direction matrix is singular")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "origin", _as_tuple(self.origin, 3, "origin"))
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "direction", direction)

    # ------------------------------------------------------------------ basic properties
    @property
    def shape(self) -> tuple:
        """Array shape ``(Z, Y, X)`` of an image on this grid."""
        return tuple(reversed(self.size))

    @property
    def num_voxels(self) -> int:
        return int(np.prod(self.size))

    @property
    def direction_matrix(self) -> np.ndarray:
        """Direction cosines as a (3, 3) array."""
        return np.reshape(np.asarray(self.direction, dtype=np.float64), (3, 3))

    @property
    def index_to_world_linear(self) -> np.ndarray:
        """The (3, 3) matrix ``direction @ diag(spacing)`` taking index steps to mm."""
        return self.direction_matrix * np.asarray(self.spacing)[None, :]

    @property
    def index_to_world_matrix(self) -> np.ndarray:
        """Homogeneous (4, 4) matrix from continuous index (i, j, k, 1) to world (LPS mm)."""
        m = np.eye(4)
        m[:3, :3] = self.index_to_world_linear
        m[:3, 3] = self.origin
        return m

    @property
    def world_to_index_matrix(self) -> np.ndarray:
        """Homogeneous (4, 4) matrix from world (LPS mm) to continuous index."""
        return np.linalg.inv(self.index_to_world_matrix)

    @property
    def index_to_normalised_matrix(self) -> np.ndarray:
        """Homogeneous (4, 4) matrix from continuous index to ``grid_sample`` coordinates."""
        size = np.asarray(self.size, dtype=np.float64)
        scale = np.where(size > 1, 2.0 / np.maximum(size - 1, 1), 1.0)
        m = np.eye(4)
        m[:3, :3] = np.diag(scale)
        m[:3, 3] = np.where(size > 1, -1.0, 0.0)
        return m

    @property
    def world_to_normalised_matrix(self) -> np.ndarray:
        return self.index_to_normalised_matrix @ self.world_to_index_matrix

    @property
    def extent_mm(self) -> np.ndarray:
        """Physical length (mm) along each grid axis, centre of first to centre of last voxel."""
        return (np.asarray(self.size) - 1) * np.asarray(self.spacing)

    # ------------------------------------------------------------------ point converters
    def index_to_world(self, index: np.ndarray) -> np.ndarray:
        """Map continuous indices ``(N, 3)`` (ITK order) to world points ``(N, 3)`` LPS mm."""
        index = np.asarray(index, dtype=np.float64)
        return index @ self.index_to_world_linear.T + np.asarray(self.origin)

    def world_to_index(self, points: np.ndarray) -> np.ndarray:
        """Map world points ``(N, 3)`` LPS mm to continuous indices ``(N, 3)``."""
        points = np.asarray(points, dtype=np.float64)
        inv = np.linalg.inv(self.index_to_world_linear)
        return (points - np.asarray(self.origin)) @ inv.T

    def contains_index(self, index: np.ndarray, tol: float = 1e-3) -> np.ndarray:
        """Boolean ``(N,)``: which continuous indices lie inside the grid (voxel centres' hull)."""
        index = np.asarray(index, dtype=np.float64)
        upper = np.asarray(self.size, dtype=np.float64) - 1
        return np.all((index >= -tol) & (index <= upper + tol), axis=-1)

    def world_grid(self) -> np.ndarray:
        """World coordinates of every voxel centre, shape ``(Z, Y, X, 3)`` (LPS mm)."""
        k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in self.shape), indexing="ij")
        index = np.stack([i, j, k], axis=-1)
        return index @ self.index_to_world_linear.T + np.asarray(self.origin)

    # ------------------------------------------------------------------ derived grids
    def same_grid(self, other: "Geometry", tol: float = 1e-4) -> bool:
        """True when both grids have the same size and (within ``tol``) origin, spacing, direction."""
        return (
            self.size == other.size
            and np.allclose(self.origin, other.origin, atol=tol * max(1.0, max(self.spacing)))
            and np.allclose(self.spacing, other.spacing, rtol=tol, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def shrink(self, factors) -> "Geometry":
        """A coarser grid covering the same physical extent, for a pyramid level.

        The new size is ``ceil(size / factor)``; the spacing is stretched so that the first and
        last voxel centres stay where they were (so normalised coordinates mean the same point
        on every level).
        """
        factors = np.asarray(_as_tuple(factors, 3, "factors"))
        size = np.asarray(self.size)
        new_size = np.maximum(np.ceil(size / factors).astype(int), 2)
        new_size = np.where(size < 2, size, new_size)
        new_spacing = np.where(new_size > 1, self.extent_mm / np.maximum(new_size - 1, 1), self.spacing)
        return Geometry(tuple(int(v) for v in new_size), self.origin, tuple(new_spacing), self.direction)

    def to_dict(self) -> dict:
        return {
            "size": list(self.size),
            "origin": list(self.origin),
            "spacing": list(self.spacing),
            "direction": list(self.direction),
        }
