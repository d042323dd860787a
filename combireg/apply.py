"""Carry images and landmarks through a registration's field (``combireg apply``).

A field in our convention (an ITK vector image on its grid, LPS mm) maps a point ``x`` of its
grid to ``x + u(x)``. ``field.nii.gz`` lies on the target grid and maps target points to
source points; ``field_inverse.nii.gz`` lies on the source grid and maps source points to
target points. So one field moves things two ways:

Images (pulled back)
    ``OUTPUT(x) = INPUT(x + u(x))`` for every voxel centre ``x`` of the field's grid, in world
    coordinates: the input may lie on any grid (size, spacing, direction) as long as it
    overlaps the points ``x + u(x)``; 0 where ``x + u(x)`` falls outside it. With
    ``field.nii.gz`` a source-space image (another sequence, a tumour mask, a label atlas)
    lands on the target grid, with ``field_inverse.nii.gz`` a target-space image on the source
    grid. Interpolation: ``linear`` (trilinear; what ``warped_<k>.nii.gz`` is), ``nearest``
    (the voxel whose centre is nearest, ties rounding up as in ITK) or ``bspline`` (cubic
    B-spline, mirror boundary as ITK's ``BSplineInterpolateImageFunction``). ``labels`` is
    nearest neighbour that keeps the file's pixel type, so label values pass unchanged.
Landmarks (pushed forward)
    Each point ``p`` goes to ``p + u(p)`` (trilinear interpolation of the field at the world
    point): with ``field.nii.gz`` target landmarks land in source space, with
    ``field_inverse.nii.gz`` source landmarks in target space. Points outside the field's grid
    are mapped with its edge values and counted in a warning. The output is written in the
    input's format and coordinate system (voxel-index files: indices of a ``reference`` image,
    the image the mapped points lie on; the input's indices refer to the field's grid).

:func:`apply_field` does either, from files or from objects; :func:`warp_array` and
:func:`map_landmarks` are the two operations on arrays.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import CombiregError
from .geometry import Geometry
from .image import Image
from .landmarks import Landmarks, landmark_format, sample_displacement, warn_outside

__all__ = ["INTERPOLATIONS", "AppliedImage", "AppliedLandmarks", "input_kind", "read_field", "warp_array",
           "map_landmarks", "apply_field"]

log = logging.getLogger(__name__)

#: Interpolation methods for images.
INTERPOLATIONS = ("linear", "nearest", "bspline")
_LANDMARK_SUFFIXES = (".fcsv", ".mrk.json", ".json", ".csv", ".txt", ".pts")


@dataclass
class AppliedImage:
    """An image carried onto a field's grid.

    Attributes
    ----------
    array : ndarray, (Z, Y, X)
        float32, or the input's own type for label maps (``labels=True``).
    geometry : Geometry
        The output grid (the field's, unless another was asked for).
    interpolation : str
    inside_fraction : float
        Share of output voxels whose ``x + u(x)`` lies inside the input's extent.
    """

    array: np.ndarray
    geometry: Geometry
    interpolation: str
    inside_fraction: float

    def to_image(self) -> Image:
        """The result as a single-channel float32 :class:`~combireg.image.Image`."""
        import torch

        return Image(torch.from_numpy(np.asarray(self.array, dtype=np.float32))[None], self.geometry)


@dataclass
class AppliedLandmarks:
    """Landmarks carried through a field: ``landmarks`` are the points ``p + u(p)``."""

    landmarks: Landmarks
    outside: np.ndarray  # bool (N,): points outside the field's grid (mapped with its edge values)

    @property
    def n_outside(self) -> int:
        return int(np.count_nonzero(self.outside))


# ====================================================================================== inputs
def input_kind(path: str | os.PathLike) -> str:
    """``"image"`` or ``"landmarks"`` from a file name's suffix.

    Raises
    ------
    CombiregError
        A suffix that is neither an image nor a landmark format.
    """
    from .io import SUPPORTED_SUFFIXES

    name = Path(path).name.lower()
    if name.endswith(SUPPORTED_SUFFIXES):
        return "image"
    if name.endswith(_LANDMARK_SUFFIXES):
        return "landmarks"
    raise CombiregError(f"{path}: unknown format (images: {', '.join(SUPPORTED_SUFFIXES)}; landmarks: "
                        f"{', '.join(_LANDMARK_SUFFIXES)})")


def read_field(field) -> tuple[np.ndarray, Geometry]:
    """A displacement field from a file, or ``(array, Geometry)`` as it is.

    Raises
    ------
    CombiregError
        Not a 3-D image with 3 components per voxel, or non-finite displacements.
    """
    from . import io

    if isinstance(field, tuple):
        displacement, geometry = field
        displacement = np.asarray(displacement, dtype=np.float32)
        if displacement.shape != geometry.shape + (3,):
            raise CombiregError(f"the field's array {displacement.shape} does not match its grid {geometry.shape} x 3")
    else:
        displacement, geometry = io.read_displacement(field)
    if not np.all(np.isfinite(displacement)):
        raise CombiregError(f"{field if not isinstance(field, tuple) else 'the field'}: has non-finite displacements")
    return displacement, geometry


# ====================================================================================== images
def _source_indices(geometry: Geometry, displacement: np.ndarray, field_geometry: Geometry,
                    input_geometry: Geometry) -> np.ndarray:
    """Continuous indices (N, 3), ITK order, in the input of ``x + u(x)`` for every voxel of ``geometry``."""
    from .warp import resample_field

    u = resample_field(displacement, field_geometry, geometry)
    points = geometry.world_grid() + u
    return input_geometry.world_to_index(points.reshape(-1, 3))


def warp_array(array: np.ndarray, geometry: Geometry, displacement: np.ndarray, field_geometry: Geometry, *,
               interpolation: str = "linear", output_geometry: Geometry | None = None,
               name: str = "the input", require_overlap: bool = True) -> AppliedImage:
    """``OUTPUT(x) = INPUT(x + u(x))`` on the field's grid (or ``output_geometry``).

    Parameters
    ----------
    array : ndarray, (Z, Y, X)
        The input image on ``geometry``. ``nearest`` keeps its type; the others give float32.
    geometry : Geometry
    displacement : ndarray, (Z', Y', X', 3)
        The field (LPS mm) on ``field_geometry``.
    interpolation : {"linear", "nearest", "bspline"}
    output_geometry : Geometry, optional
        Another output grid; the field is then interpolated trilinearly at its voxel centres
        (edge values outside the field's grid).
    name : str
        How errors name the input.
    require_overlap : bool
        Raise when no point ``x + u(x)`` falls inside the input (else the result is all 0).

    Raises
    ------
    CombiregError
        An unknown interpolation, or an input that no point ``x + u(x)`` falls in.
    """
    if interpolation not in INTERPOLATIONS:
        raise CombiregError(f"unknown interpolation {interpolation!r} (use one of {', '.join(INTERPOLATIONS)})")
    out_geometry = field_geometry if output_geometry is None else output_geometry
    array = np.asarray(array)
    index = _source_indices(out_geometry, displacement, field_geometry, geometry)
    size = np.asarray(geometry.size, dtype=np.float64)
    inside = np.all((index >= -0.5) & (index <= size - 0.5), axis=1)
    if require_overlap and not inside.any():
        raise CombiregError(f"{name} does not overlap the field's extent: no point x + u(x) of the field's grid "
                            f"falls inside it (field.nii.gz carries source-space inputs onto the target grid, "
                            f"field_inverse.nii.gz target-space ones onto the source grid)")
    if interpolation == "nearest":
        nearest = np.floor(index + 0.5).astype(np.int64)  # ITK's NearestNeighborInterpolateImageFunction
        valid = np.all((nearest >= 0) & (nearest < np.asarray(geometry.size)), axis=1)
        out = np.zeros(out_geometry.num_voxels, dtype=array.dtype)
        k = nearest[valid]
        out[valid] = array[k[:, 2], k[:, 1], k[:, 0]]
    elif interpolation == "bspline":
        from scipy.ndimage import map_coordinates

        values = map_coordinates(array.astype(np.float64), index[:, ::-1].T, order=3, mode="mirror")
        out = np.where(inside, values, 0.0).astype(np.float32)
    else:
        out = _linear(array, geometry, displacement, field_geometry, out_geometry)
    return AppliedImage(out.reshape(out_geometry.shape), out_geometry, interpolation, float(inside.mean()))


def _linear(array: np.ndarray, geometry: Geometry, displacement: np.ndarray, field_geometry: Geometry,
            out_geometry: Geometry) -> np.ndarray:
    """Trilinear, exactly as ``warped_<k>.nii.gz`` is made (:func:`combireg.warp.warp_image`)."""
    import torch

    from .warp import resample_field, warp_image

    u = resample_field(displacement, field_geometry, out_geometry)
    source = Image(torch.from_numpy(np.asarray(array, dtype=np.float32))[None], geometry)
    return warp_image(source, out_geometry, u).numpy()[0].reshape(-1)


# ====================================================================================== landmarks
def map_landmarks(landmarks: Landmarks, displacement: np.ndarray, field_geometry: Geometry) -> AppliedLandmarks:
    """Each point ``p`` to ``p + u(p)`` (trilinear); points outside the grid get the edge values
    and a warning with their count. Labels and the coordinate system are kept."""
    points = landmarks.points_lps_mm
    outside = warn_outside(field_geometry, points, landmarks.labels, what="landmark(s)")
    mapped = points + sample_displacement(displacement, field_geometry, points)
    return AppliedLandmarks(Landmarks(mapped, list(landmarks.labels) if landmarks.labelled else [],
                                      labelled=landmarks.labelled, space=landmarks.space), outside)


# ====================================================================================== files
def _check_output(path: Path, overwrite: bool) -> None:
    """An output file may be written: not a folder, not there unless ``overwrite``, its folder exists."""
    if path.is_dir():
        raise CombiregError(f"{path}: is a directory")
    if path.exists() and not overwrite:
        raise CombiregError(f"{path}: exists (use --overwrite)")
    if not path.absolute().parent.is_dir():
        raise CombiregError(f"{path}: folder {path.absolute().parent} does not exist")


@contextlib.contextmanager
def _atomic_file(path: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix) that replaces it once written whole."""
    _check_output(path, overwrite)
    suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith((".nii.gz", ".mrk.json")) else path.suffix
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.absolute().parent)
    except OSError:
        raise CombiregError(f"{path}: folder {path.absolute().parent} is not writable") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_input_image(input_, keep_type: bool) -> tuple[np.ndarray, Geometry, str]:
    from . import io

    if isinstance(input_, Image):
        if input_.num_channels != 1:
            raise CombiregError("apply_field takes a single-channel image")
        return input_.numpy()[0], input_.geometry, "the input image"
    if keep_type:
        array, geometry = io.read_array(input_)
    else:
        image = io.read_image(input_)
        array, geometry = image.numpy()[0], image.geometry
    return array, geometry, str(input_)


def apply_field(field, input, output: str | os.PathLike | None = None, *, labels: bool = False,  # noqa: A002
                interpolation: str | None = None, landmark_space: str | None = None, reference=None,
                overwrite: bool = False) -> AppliedImage | AppliedLandmarks:
    """Carry an image or a landmark set through a field (module docstring).

    Parameters
    ----------
    field : path or (ndarray (Z, Y, X, 3), Geometry)
        A displacement field in our convention (``field.nii.gz`` or ``field_inverse.nii.gz``).
    input : path, Image or Landmarks
        An image (any grid, any supported format) or a landmark file (.fcsv, .mrk.json,
        BraTS-Reg or generic .csv, elastix points).
    output : path, optional
        Where to write the result (written whole or not at all): an image format for images,
        the input's landmark format for landmarks. None: only return it.
    labels : bool
        Images: nearest neighbour keeping the pixel type (label maps, masks).
    interpolation : {"linear", "nearest", "bspline"}, optional
        Images: default ``linear`` (``nearest`` with ``labels``).
    landmark_space : {"lps", "ras", "index"}, optional
        Landmark files that do not declare their coordinate system.
    reference : path, Image or Geometry, optional
        Voxel-index landmark files: the image the mapped points lie on (their output indices
        refer to it; the input's indices refer to the field's grid).
    overwrite : bool
        Replace an existing ``output``.

    Returns
    -------
    AppliedImage or AppliedLandmarks

    Raises
    ------
    CombiregError
        A field that is not a 3-vector image, an unknown input or output format, an input
        that does not overlap the field's extent, conflicting options, an existing output.
    """
    from .landmarks import parse_space, read_landmarks, write_landmarks

    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise CombiregError(f"unknown interpolation {interpolation!r} (use one of {', '.join(INTERPOLATIONS)})")
    if labels and interpolation not in (None, "nearest"):
        raise CombiregError(f"--labels uses nearest-neighbour interpolation; it cannot be {interpolation!r}")
    kind = "landmarks" if isinstance(input, Landmarks) else "image" if isinstance(input, Image) else input_kind(input)
    output = None if output is None else Path(output)
    if output is not None:
        out_kind = input_kind(output)
        if out_kind != kind:
            raise CombiregError(f"{output}: the output of {'an image' if kind == 'image' else 'landmarks'} must be "
                                f"{'an image file' if kind == 'image' else 'a landmark file'} too")
        if kind == "landmarks" and not isinstance(input, Landmarks) and landmark_format(output) != landmark_format(input):
            raise CombiregError(f"{output}: landmarks are written in the input's format "
                                f"({landmark_format(input)}, like {Path(input).name})")
        _check_output(output, overwrite)
    displacement, geometry = read_field(field)
    if kind == "landmarks":
        space = parse_space(landmark_space)
        points = input if isinstance(input, Landmarks) else read_landmarks(input, space=space, reference=geometry)
        if output is not None and points.space == "index" and reference is None:
            raise CombiregError(f"{input}: voxel-index landmarks need --reference IMAGE, the image the mapped points "
                                f"lie on (the source image for field.nii.gz, the target for field_inverse.nii.gz)")
        result = map_landmarks(points, displacement, geometry)
        if output is not None:
            with _atomic_file(output, overwrite) as tmp:
                write_landmarks(tmp, result.landmarks, space=points.space, reference=reference)
        return result
    array, input_geometry, name = _read_input_image(input, keep_type=labels)
    result = warp_array(array, input_geometry, displacement, geometry, interpolation=interpolation or
                        ("nearest" if labels else "linear"), name=name)
    if result.inside_fraction < 0.5:
        log.warning("%s covers only %.0f%% of the field's grid (x + u(x) falls outside it elsewhere; 0 there)",
                    name, 100 * result.inside_fraction)
    if output is not None:
        from . import io

        dtype = result.array.dtype if labels else np.float32
        with _atomic_file(output, overwrite) as tmp:
            io.write_image(tmp, result.array, result.geometry, dtype=dtype)
    return result
