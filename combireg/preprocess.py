"""Preprocessing in world coordinates: reorientation, resampling, N4, affine pre-alignment, masks.

Everything here takes and returns combireg :class:`~combireg.image.Image` objects (all channels
unless a function says otherwise) and keeps world positions (LPS mm) meaningful:

* :func:`reorient` permutes and flips voxel axes only (no interpolation), so every voxel keeps
  its world position and its value;
* :func:`resample_to_spacing` / :func:`resample_to_geometry` interpolate in world coordinates
  (anti-aliased when the grid gets coarser);
* :func:`n4_bias_correction` is ITK's N4, fitted on a shrunk grid and applied at full resolution;
* :func:`prealign` is a rigid or affine registration with itk-elastix returning a 4x4 matrix in
  our field convention (target point x -> source point ``A @ [x, 1]``);
* :func:`load_mask` / :func:`check_mask` validate binary masks on their image's grid.

Orientation codes follow nibabel/NIfTI usage: three letters naming the anatomical direction
each voxel axis i, j, k (ITK order x, y, z) points *towards*. ``"RAS"`` means i increases to
the Right, j to the Anterior, k to the Superior; ITK's identity direction (LPS world axes) is
``"LPS"``. (ITK's ``OrientImageFilter`` names the opposite end, "from": its ``RAI`` is our
``LPS``.)
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from .elastix_driver import PoolThreader, itk_image, itk_message, run_elastix
from .errors import CombiregError
from .geometry import Geometry
from .image import Image
from .pyramid import coarse_copy
from .warp import affine_displacement, resample_image, warp_image_affine

__all__ = [
    "ORIENTATION_CODES",
    "orientation_code",
    "reorient_geometry",
    "reorient",
    "spacing_geometry",
    "resample_to_spacing",
    "resample_to_geometry",
    "n4_bias_correction",
    "prealign",
    "affine_displacement",
    "warp_affine",
    "write_affine",
    "read_affine",
    "check_mask",
    "load_mask",
]

log = logging.getLogger(__name__)

#: World (LPS) unit vector of each anatomical letter.
_LETTER_VECTORS = {
    "L": (1.0, 0.0, 0.0), "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0), "A": (0.0, -1.0, 0.0),
    "S": (0.0, 0.0, 1.0), "I": (0.0, 0.0, -1.0),
}
#: The 48 valid codes, one letter from each of the pairs L/R, P/A, I/S in any order.
ORIENTATION_CODES: tuple[str, ...] = tuple(sorted(
    "".join(letters)
    for order in itertools.permutations(("LR", "PA", "IS"))
    for letters in itertools.product(*order)
))

_INTERPOLATION_MODES = {"linear": "bilinear", "nearest": "nearest"}
_PREALIGN_KINDS = {"rigid": "EulerTransform", "affine": "AffineTransform"}
_PREALIGN_METRICS = {"mi": "AdvancedMattesMutualInformation", "ncc": "AdvancedNormalizedCorrelation",
                     "mse": "AdvancedMeanSquares"}
_PREALIGN_INITIALISATIONS = ("CenterOfGravity", "GeometricalCenter", "none")


# ------------------------------------------------------------------------------ orientation
def _check_code(code: str) -> str:
    if not isinstance(code, str):
        raise TypeError(f"orientation code must be a string, got {type(code).__name__}")
    upper = code.strip().upper()
    if upper not in ORIENTATION_CODES:
        raise CombiregError(f"unknown orientation code {code!r}: give three letters naming where the i, j, k "
                            f"axes point to, one from each of L/R, P/A, I/S (for example RAS, LPS, LPI)")
    return upper


def orientation_code(geometry: Geometry) -> str:
    """The code (nibabel style, "towards") closest to a grid's direction matrix.

    Parameters
    ----------
    geometry : Geometry

    Returns
    -------
    str
        For example ``"LPS"`` for ITK's identity direction, ``"RAS"`` for a NIfTI written by
        most neuroimaging tools.
    """
    direction = geometry.direction_matrix
    perm, _ = _best_axes(direction, np.eye(3))
    letters = []
    for axis in range(3):
        column = direction[:, axis]
        world = perm.index(axis)  # the world axis this voxel axis was matched with
        letters.append("LPS"[world] if column[world] >= 0 else "RAI"[world])
    return "".join(letters)


def _best_axes(direction: np.ndarray, wanted: np.ndarray) -> tuple[list[int], list[int]]:
    """The permutation and signs of the voxel axes that bring ``direction`` closest to ``wanted``.

    New axis b is old axis ``perm[b]`` times ``signs[b]``. Of the 48 signed permutations the
    one with the largest ``sum_b |wanted[:, b] . direction[:, perm[b]]|`` wins (the sign is then
    that of the dot product); for an oblique grid this is the nearest axis-aligned choice, and
    ties (45 degrees) are broken by the order of ``itertools.permutations``, deterministically.
    """
    best, best_score = None, -np.inf
    for perm in itertools.permutations(range(3)):
        dots = [float(wanted[:, b] @ direction[:, perm[b]]) for b in range(3)]
        score = sum(abs(d) for d in dots)
        if score > best_score + 1e-9:
            best, best_score = (list(perm), [1 if d >= 0 else -1 for d in dots]), score
    return best


def _code_matrix(code: str) -> np.ndarray:
    """(3, 3) matrix whose column b is the world (LPS) direction letter b of ``code`` points to."""
    return np.stack([np.asarray(_LETTER_VECTORS[c]) for c in code], axis=1)


def _reorientation(geometry: Geometry, code: str) -> tuple[list[int], list[int], Geometry]:
    code = _check_code(code)
    perm, signs = _best_axes(geometry.direction_matrix, _code_matrix(code))
    direction = geometry.direction_matrix
    size = np.asarray(geometry.size)
    spacing = np.asarray(geometry.spacing)
    new_direction = np.stack([signs[b] * direction[:, perm[b]] for b in range(3)], axis=1)
    # The new first voxel is the old voxel at index 0 or size-1 along each (flipped) axis.
    first = np.array([0.0 if signs[b] > 0 else size[perm[b]] - 1.0 for b in range(3)])
    first_old = np.zeros(3)
    first_old[perm] = first
    origin = geometry.index_to_world(first_old[None])[0]
    new = Geometry(tuple(int(size[p]) for p in perm), tuple(origin), tuple(float(spacing[p]) for p in perm),
                   tuple(new_direction.ravel()))
    return perm, signs, new


def reorient_geometry(geometry: Geometry, orientation: str = "RAS") -> Geometry:
    """The grid :func:`reorient` produces: the same voxels, axes permuted and flipped.

    Parameters
    ----------
    geometry : Geometry
    orientation : str
        Three-letter code, the directions the new i, j, k axes point to (see the module notes).

    Returns
    -------
    Geometry
        Same voxel centres in the world; the direction is the signed permutation of the old one
        closest to ``orientation`` (still oblique if the old one was).

    Raises
    ------
    CombiregError
        Unknown code.
    """
    return _reorientation(geometry, orientation)[2]


def reorient(image: Image, orientation: str = "RAS") -> Image:
    """Permute and flip the voxel axes so the direction is closest to ``orientation``.

    No interpolation: every voxel keeps its value and its world position, only the order in
    which voxels are stored (and with it origin, spacing order and direction) changes. An
    oblique direction stays oblique; the axes are assigned to the code's letters by the
    nearest signed permutation.

    Parameters
    ----------
    image : Image
        Any number of channels.
    orientation : str
        Code such as ``"RAS"``, ``"LPS"``, ``"LPI"`` naming where the new i, j, k axes point
        (nibabel convention; case-insensitive).

    Returns
    -------
    Image
        A new image (the input is not modified).

    Raises
    ------
    CombiregError
        Unknown code.
    """
    if not isinstance(image, Image):
        raise TypeError(f"reorient expects an Image, got {type(image).__name__}")
    perm, signs, geometry = _reorientation(image.geometry, orientation)
    # Tensor axes are (C, Z, Y, X): ITK axis a lives on tensor axis 3 - a.
    data = image.data.permute(0, 3 - perm[2], 3 - perm[1], 3 - perm[0])
    flips = [3 - b for b in range(3) if signs[b] < 0]
    if flips:
        data = torch.flip(data, dims=flips)
    return Image(data.contiguous(), geometry)


# ------------------------------------------------------------------------------ resampling
def _spacing_tuple(spacing_mm) -> np.ndarray:
    values = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)
    if values.size == 1:
        values = np.repeat(values, 3)
    if values.size != 3:
        raise CombiregError(f"spacing must be one value (isotropic) or three (x, y, z), got {values.size}")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise CombiregError(f"spacing must be positive mm, got {values.tolist()}")
    return values


def spacing_geometry(geometry: Geometry, spacing_mm) -> Geometry:
    """A grid of the given spacing covering the same field of view, with the same direction.

    The field of view is the voxels' full extent, ``size * spacing`` along each axis; the new
    size is that divided by the new spacing, rounded (at least 1), and the new grid is centred
    on the old one. Why centred boxes rather than a fixed first voxel: the result does not
    drift to one side, and up- and down-sampling are symmetric.

    Parameters
    ----------
    geometry : Geometry
    spacing_mm : float or sequence of 3 floats
        New spacing along the grid axes (x, y, z), a scalar for isotropic.

    Raises
    ------
    CombiregError
        Non-positive spacing.
    """
    new_spacing = _spacing_tuple(spacing_mm)
    fov = np.asarray(geometry.size) * np.asarray(geometry.spacing)
    # Why the epsilon: 48.9999999 voxels from floating-point spacing should be 49.
    new_size = np.maximum(1, np.floor(fov / new_spacing + 0.5 + 1e-6)).astype(int)
    centre = geometry.index_to_world(((np.asarray(geometry.size) - 1) / 2.0)[None])[0]
    origin = centre - geometry.direction_matrix @ (new_spacing * (new_size - 1) / 2.0)
    return Geometry(tuple(int(v) for v in new_size), tuple(origin), tuple(new_spacing), geometry.direction)


def _mode(interpolation: str) -> str:
    if interpolation not in _INTERPOLATION_MODES:
        raise CombiregError(f"unknown interpolation {interpolation!r} (use {' or '.join(_INTERPOLATION_MODES)})")
    return _INTERPOLATION_MODES[interpolation]


def resample_to_geometry(image: Image, geometry: Geometry, *, interpolation: str = "linear",
                         padding: str = "zeros") -> Image:
    """Resample ``image`` onto another grid in world coordinates (no anti-aliasing).

    Parameters
    ----------
    image : Image
    geometry : Geometry
        The new grid (any orientation).
    interpolation : {"linear", "nearest"}
        ``"nearest"`` for label images.
    padding : {"zeros", "border"}
        Value outside the image: 0 (default, as ITK's resampler) or the nearest edge voxel.

    Returns
    -------
    Image
        float32, all channels.
    """
    if padding not in ("border", "zeros"):
        raise ValueError(f"padding must be 'border' or 'zeros', got {padding!r}")
    data = image.data.detach().to(torch.float32)
    return resample_image(Image(data, image.geometry), geometry, mode=_mode(interpolation), padding_mode=padding)


def resample_to_spacing(image: Image, spacing_mm, *, interpolation: str = "linear") -> Image:
    """Resample ``image`` to a new spacing over the same field of view (see :func:`spacing_geometry`).

    Where an axis gets coarser by a factor ``f`` the image is first smoothed along it with a
    Gaussian of ``0.5 * sqrt(f**2 - 1)`` old voxels (anti-aliasing). Why this width: a voxel
    already averages over about sigma = 0.5 voxel; adding the difference in quadrature gives
    sigma = 0.5 new voxel, the usual pyramid blur, without over-smoothing small changes.
    Linear interpolation only; ``"nearest"`` (labels) is never smoothed. Outside the old
    voxel centres (the outer half voxel when up-sampling) the edge value is repeated.

    Parameters
    ----------
    image : Image
        Any number of channels.
    spacing_mm : float or sequence of 3 floats
        New spacing in mm (x, y, z order), a scalar for isotropic.
    interpolation : {"linear", "nearest"}

    Returns
    -------
    Image
        float32 on ``spacing_geometry(image.geometry, spacing_mm)``.
    """
    geometry = spacing_geometry(image.geometry, spacing_mm)
    mode = _mode(interpolation)
    data = image.data.detach().to(torch.float32)
    if mode == "bilinear":
        from .filters import gaussian_blur

        factors = np.asarray(geometry.spacing) / np.asarray(image.geometry.spacing)
        sigma_xyz = [0.5 * math.sqrt(f * f - 1.0) if f > 1.0 + 1e-6 else 0.0 for f in factors]
        if any(sigma_xyz):
            data = gaussian_blur(data[None], list(reversed(sigma_xyz)))[0]
    return resample_image(Image(data, image.geometry), geometry, mode=mode, padding_mode="border")


# ------------------------------------------------------------------------------ masks
MaskLike = Union[Image, str, os.PathLike]


def check_mask(mask: Image, geometry: Geometry, *, role: str = "target", name: str | None = None) -> Image:
    """Validate a mask for an image on ``geometry``; return it as float {0, 1}, (1, Z, Y, X).

    Nonzero voxels are inside.

    Parameters
    ----------
    mask : Image
        One channel.
    geometry : Geometry
        The grid of the image the mask belongs to.
    role : str
        Whose mask (``"target"``, ``"source"``, ...), for messages.
    name : str, optional
        The file it came from, for messages.

    Raises
    ------
    CombiregError
        More than one channel, another grid than the image's, non-finite values, or no voxel
        inside.
    """
    label = f"{role} mask" + (f" {name}" if name else "")
    owner = "image" if role == "image" else f"{role} image"
    if not isinstance(mask, Image):
        raise TypeError(f"{label}: expected an Image or a path, got {type(mask).__name__}")
    if mask.num_channels != 1:
        raise CombiregError(f"{label}: has {mask.num_channels} channels; a mask is one scalar image")
    if not mask.geometry.same_grid(geometry):
        raise CombiregError(
            f"{label}: lies on another grid than the {owner} (size {mask.geometry.size}, spacing "
            f"{_fmt(mask.geometry.spacing)}, origin {_fmt(mask.geometry.origin)} vs size {geometry.size}, spacing "
            f"{_fmt(geometry.spacing)}, origin {_fmt(geometry.origin)}); a mask must share its image's grid")
    data = mask.data.detach()
    if not bool(torch.isfinite(data).all()):
        raise CombiregError(f"{label}: contains NaN/Inf voxels")
    inside = (data != 0).to(torch.float32)
    if not bool(inside.any()):
        raise CombiregError(f"{label}: is empty (no nonzero voxel)")
    return Image(inside, geometry)


def load_mask(path: MaskLike, geometry: Geometry, *, role: str = "target") -> Image:
    """Read (or take) a binary mask and check it against its image's grid.

    Parameters
    ----------
    path : path or Image
        A scalar image file (any format :func:`combireg.io.read_image` reads) or an Image.
    geometry : Geometry
        The grid of the image the mask belongs to.
    role : str
        Whose mask, for messages (``"target"``, ``"source"``, ``"image"``).

    Returns
    -------
    Image
        float32 {0, 1} values, shape (1, Z, Y, X), on ``geometry``.

    Raises
    ------
    CombiregError
        Unreadable file, another grid than ``geometry``, or an empty mask (one line each).
    """
    if isinstance(path, Image):
        return check_mask(path, geometry, role=role)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{role} mask: expected a path or an Image, got {type(path).__name__}")
    from . import io

    try:
        mask = io.read_image(path)
    except CombiregError as exc:
        raise CombiregError(f"{role} mask: {exc}") from None
    return check_mask(mask, geometry, role=role, name=str(path))


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


# ------------------------------------------------------------------------------ ITK helpers
def _itk():
    import itk  # lazy: importing itk costs about a second

    return itk


def _mask_array(mask: Image | None, geometry: Geometry, role: str) -> np.ndarray | None:
    if mask is None:
        return None
    return check_mask(mask, geometry, role=role).numpy()[0] > 0


# ------------------------------------------------------------------------------ N4
def n4_bias_correction(image: Image, mask: Image | None = None, *, shrink_factor: int = 4,
                       iterations: Sequence[int] = (50, 50, 50, 50), convergence_threshold: float = 1e-3,
                       control_points: int = 4, histogram_bins: int = 200,
                       bias_fwhm: float = 0.15) -> Image:
    """N4 bias-field correction (ITK's ``N4BiasFieldCorrectionImageFilter``), channel by channel.

    The bias field is fitted on the image shrunk by ``shrink_factor`` (nearest-neighbour
    subsampling onto a grid with the same first and last voxel centres, like ITK's
    ``ShrinkImageFilter``: no smoothing, so tissue edges are not blurred into the background),
    then N4's B-spline control-point lattice is evaluated exactly on the full-resolution grid
    and the image divided by it. Why: the fit is the expensive part and the field is smooth.

    Parameters
    ----------
    image : Image
        Intensities with a multiplicative bias (MR magnitudes: background about 0). Each
        channel gets its own field.
    mask : Image, optional
        Where to fit (nonzero = inside), on the image's grid. Voxels <= 0 are always left out
        of the fit (N4 works on log intensities). The correction is applied everywhere.
    shrink_factor : int
        Subsampling factor of the fitting grid, >= 1 (kept so that every axis has at least 8
        voxels).
    iterations : sequence of int
        Maximum iterations per fitting level (one entry per level; the B-spline mesh doubles
        at each level).
    convergence_threshold : float
        N4's stopping threshold per level.
    control_points : int
        Control points per axis at the first level (> 3, the spline order).
    histogram_bins : int
        Bins of N4's intensity histogram.
    bias_fwhm : float
        Full width at half maximum of the Gaussian assumed for the bias field (N4's
        deconvolution width, in log intensity).

    Returns
    -------
    Image
        float32, corrected, same grid and channels.

    Raises
    ------
    CombiregError
        A mask on another grid, empty, or no positive voxel inside it.
    """
    if not isinstance(image, Image):
        raise TypeError(f"n4_bias_correction expects an Image, got {type(image).__name__}")
    if int(shrink_factor) != shrink_factor or shrink_factor < 1:
        raise ValueError(f"shrink_factor must be an integer >= 1, got {shrink_factor!r}")
    iterations = [int(v) for v in iterations]
    if not iterations or min(iterations) < 1:
        raise ValueError(f"iterations must be one positive count per fitting level, got {iterations!r}")
    if control_points < 4:
        raise ValueError(f"control_points must be at least 4 (spline order 3 + 1), got {control_points}")
    if convergence_threshold <= 0 or histogram_bins < 2 or bias_fwhm <= 0:
        raise ValueError("convergence_threshold and bias_fwhm must be positive, histogram_bins >= 2")
    geometry = image.geometry
    user_mask = _mask_array(mask, geometry, "image")
    # At least 8 voxels per axis on the fitting grid (N4's B-spline fit needs some samples).
    factors = [max(1, min(int(shrink_factor), n // 8)) for n in geometry.size]
    small_geometry = geometry.shrink(factors) if max(factors) > 1 else geometry
    data = image.data.detach().to(torch.float32).cpu()
    out = [_n4_channel(Image(data[k:k + 1], geometry), k, user_mask, small_geometry, iterations,
                       convergence_threshold, control_points, histogram_bins, bias_fwhm)
           for k in range(image.num_channels)]
    return Image(torch.stack(out).to(torch.float32), geometry)


def _n4_channel(channel: Image, k: int, user_mask: np.ndarray | None, small_geometry: Geometry,
                iterations: list, convergence_threshold: float, control_points: int, histogram_bins: int,
                bias_fwhm: float) -> torch.Tensor:
    """N4 of one channel (see :func:`n4_bias_correction`): fit on ``small_geometry``, apply on the full grid."""
    itk = _itk()
    geometry = channel.geometry
    float_image = itk.Image[itk.F, 3]
    mask_image = itk.Image[itk.UC, 3]
    small = resample_image(channel, small_geometry, mode="nearest", padding_mode="border").numpy()[0]
    fit = small > 0
    if user_mask is not None:
        small_mask = resample_image(Image(torch.from_numpy(user_mask.astype(np.float32))[None], geometry),
                                    small_geometry, mode="nearest", padding_mode="zeros").numpy()[0]
        fit &= small_mask > 0.5
    if np.count_nonzero(fit) < 100:
        raise CombiregError(f"N4: channel {k} has {np.count_nonzero(fit)} positive voxels inside the mask on "
                            f"the fitting grid; N4 needs positive intensities (MR magnitudes) to fit")
    n4 = itk.N4BiasFieldCorrectionImageFilter[float_image, mask_image, float_image].New()
    n4.SetInput(itk_image(small, small_geometry))
    n4.SetMaskImage(itk_image(fit.astype(np.uint8), small_geometry, np.uint8))
    n4.SetNumberOfFittingLevels(len(iterations))
    n4.SetMaximumNumberOfIterations(iterations)
    n4.SetConvergenceThreshold(float(convergence_threshold))
    n4.SetNumberOfControlPoints([int(control_points)] * 3)
    n4.SetNumberOfHistogramBins(int(histogram_bins))
    n4.SetBiasFieldFullWidthAtHalfMaximum(float(bias_fwhm))
    n4.Update()
    lattice = n4.GetLogBiasFieldControlPointLattice()
    # ReconstructBiasField evaluates the lattice on the filter's *input* grid, normalised
    # by its first and last voxel centres; the shrunk grid has the same ones, so pointing
    # the input at the full-resolution image evaluates the same field exactly there.
    n4.SetInput(itk_image(channel.numpy()[0], geometry))
    log_bias = np.asarray(itk.array_from_image(n4.ReconstructBiasField(lattice)), dtype=np.float32)
    log.info("N4 channel %d: %d iterations at the last level, log bias range %.3f..%.3f", k,
             n4.GetElapsedIterations(), float(log_bias.min()), float(log_bias.max()))
    return torch.from_numpy(channel.numpy()[0] / np.exp(log_bias))


# ------------------------------------------------------------------------------ pre-alignment
def prealign(source: Image, target: Image, kind: str = "rigid", *, source_mask: Image | None = None,
             target_mask: Image | None = None, metric: str = "mi", resolutions: int = 4,
             iterations: int = 256, samples: int = 2048, initialization: str = "CenterOfGravity",
             seed: int = 121212, elastix_parameters: dict | None = None,
             working_spacing_mm: float | None = None) -> np.ndarray:
    """Rigid or affine registration of ``source`` to ``target`` with itk-elastix.

    Parameters
    ----------
    source, target : Image
        The first channel of each is used; any grids (different ones too).
    kind : {"rigid", "affine"}
        elastix ``EulerTransform`` (rotation + translation) or ``AffineTransform``.
    source_mask, target_mask : Image, optional
        Binary masks (nonzero inside) on the grid of their image; only samples inside count.
    metric : {"mi", "ncc", "mse"}
        Advanced Mattes mutual information (default: robust to contrast changes and other
        modalities), normalised correlation, or mean squares.
    resolutions : int
        Levels of elastix's smoothing pyramid.
    iterations : int
        Adaptive stochastic gradient descent iterations per level.
    samples : int
        Random samples per iteration.
    initialization : {"CenterOfGravity", "GeometricalCenter", "none"}
        elastix's automatic transform initialisation: align the intensity centres of mass,
        the image centres, or start from the identity.
    seed : int
        elastix ``RandomSeed``: runs are deterministic for a fixed seed.
    elastix_parameters : dict, optional
        Further elastix parameters, ``{key: [value, ...]}`` (strings), applied last; for
        settings this signature does not name.
    working_spacing_mm : float, optional
        Run elastix on copies smoothed and shrunk to at least this spacing along every axis
        (masks by nearest neighbour). Why: elastix builds its smoothing pyramid at the input's
        resolution, which dominated the time of a 1 mm rigid alignment (12 s of it), while a
        rigid or affine map is determined to a fraction of a millimetre by 3 mm images.

    Returns
    -------
    ndarray, (4, 4) float64
        Homogeneous matrix ``A`` in LPS mm taking a TARGET point x to its SOURCE point
        ``A @ [x, 1]``: the direction of combireg's displacement fields (target x -> source
        x + u(x), here ``u(x) = A x - x``, see :func:`affine_displacement`), and of elastix's
        own transforms (fixed = target, moving = source).

    Raises
    ------
    CombiregError
        Unknown kind/metric/initialisation, bad masks, or elastix failed (its last error).
    """
    for name, value in (("source", source), ("target", target)):
        if not isinstance(value, Image):
            raise TypeError(f"prealign: {name} must be an Image, got {type(value).__name__}")
    if kind not in _PREALIGN_KINDS:
        raise CombiregError(f"unknown pre-alignment {kind!r} (use {' or '.join(_PREALIGN_KINDS)})")
    if metric not in _PREALIGN_METRICS:
        raise CombiregError(f"unknown pre-alignment metric {metric!r} (use {', '.join(_PREALIGN_METRICS)})")
    if initialization not in _PREALIGN_INITIALISATIONS:
        raise CombiregError(f"unknown initialisation {initialization!r} (use {', '.join(_PREALIGN_INITIALISATIONS)})")
    if resolutions < 1 or iterations < 1 or samples < 1:
        raise ValueError("resolutions, iterations and samples must be positive")
    if working_spacing_mm is not None:
        source, source_mask = coarse_copy(source, source_mask, working_spacing_mm)
        target, target_mask = coarse_copy(target, target_mask, working_spacing_mm)
    source_inside = _mask_array(source_mask, source.geometry, "source")
    target_inside = _mask_array(target_mask, target.geometry, "target")
    itk = _itk()
    fixed = itk_image(target.numpy()[0], target.geometry)
    moving = itk_image(source.numpy()[0], source.geometry)
    pm = dict(itk.ParameterObject.New().GetDefaultParameterMap(kind, int(resolutions)))
    pm["Transform"] = [_PREALIGN_KINDS[kind]]
    pm["Metric"] = [_PREALIGN_METRICS[metric]]
    pm["NumberOfResolutions"] = [str(int(resolutions))]
    pm["MaximumNumberOfIterations"] = [str(int(iterations))]
    pm["NumberOfSpatialSamples"] = [str(int(samples))]
    pm["RandomSeed"] = [str(int(seed))]
    pm["AutomaticTransformInitialization"] = ["false" if initialization == "none" else "true"]
    if initialization != "none":
        pm["AutomaticTransformInitializationMethod"] = [initialization]
    # Why: elastix erodes masks per pyramid level by default, which emptied a 25 mm ball mask
    # on a 64 mm test image ("Could not find enough image samples"); the mask is what we mean.
    pm["ErodeMask"] = ["false"]
    pm["WriteResultImage"] = ["false"]  # only the transform is wanted
    for key, values in (elastix_parameters or {}).items():
        pm[str(key)] = [str(v) for v in ([values] if isinstance(values, (str, int, float)) else values)]
    with PoolThreader(), tempfile.TemporaryDirectory(prefix="combireg-prealign-",
                                                      ignore_cleanup_errors=True) as workdir:
        fixed_mask = None if target_inside is None else \
            itk_image(target_inside.astype(np.uint8), target.geometry, np.uint8)
        moving_mask = None if source_inside is None else \
            itk_image(source_inside.astype(np.uint8), source.geometry, np.uint8)
        reg = run_elastix([(fixed, moving)], pm, workdir, what=f"elastix {kind} pre-alignment",
                          fixed_mask=fixed_mask, moving_mask=moving_mask)
        try:
            transform = reg.ConvertToItkTransform(reg.GetCombinationTransform())
        except Exception as exc:
            raise CombiregError(f"elastix {kind} pre-alignment failed: {itk_message(exc)}") from None
        matrix = _matrix_of_transform(transform, target.geometry)
    log.info("pre-alignment (%s): target -> source matrix\n%s", kind, np.array2string(matrix, precision=4))
    return matrix


def _matrix_of_transform(transform, geometry: Geometry) -> np.ndarray:
    """The 4x4 matrix of an affine ITK transform, from the images of four points.

    Why points, not parameters: elastix's Euler and affine parameter layouts, centres of
    rotation and initial transforms are then all accounted for by ITK itself. The points are
    the target's centre and 100 mm along each world axis from it (well conditioned, near the
    data so no large numbers cancel).
    """
    centre = geometry.index_to_world(((np.asarray(geometry.size) - 1) / 2.0)[None])[0]
    points = np.vstack([centre, centre + 100.0 * np.eye(3)])
    mapped = np.array([[float(v) for v in transform.TransformPoint([float(c) for c in p])] for p in points])
    linear = ((mapped[1:] - mapped[0]) / 100.0).T
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = mapped[0] - linear @ centre
    return matrix


def warp_affine(source: Image, matrix: np.ndarray, geometry: Geometry, *, interpolation: str = "linear") -> Image:
    """Resample ``source`` onto ``geometry`` through an affine: the value at x is ``source(A x)``.

    Parameters
    ----------
    source : Image
        Any number of channels.
    matrix : ndarray, (4, 4)
        Target point -> source point, LPS mm (what :func:`prealign` returns).
    geometry : Geometry
        The grid to fill (usually the target's).
    interpolation : {"linear", "nearest"}

    Returns
    -------
    Image
        float32 on ``geometry``; 0 where ``A x`` falls outside the source.
    """
    mode = _mode(interpolation)
    data = Image(source.data.detach().to(torch.float32), source.geometry)
    return warp_image_affine(data, geometry, matrix, mode=mode)


# ------------------------------------------------------------------------------ affine files
_AFFINE_HEADER = ("combireg affine: 4x4 homogeneous matrix A in LPS mm (ITK physical space).\n"
                  "It maps a TARGET point x to its SOURCE point A @ [x, 1] (the direction of\n"
                  "combireg's displacement fields: u(x) = A x - x, and of elastix/ITK transforms).\n"
                  "Read with numpy.loadtxt(path) or combireg.preprocess.read_affine(path).")


def write_affine(path: str | os.PathLike, matrix: np.ndarray) -> None:
    """Write a 4x4 matrix as text: ``#`` header lines, then four rows of four numbers."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"expected a 4x4 matrix, got shape {matrix.shape}")
    np.savetxt(path, matrix, fmt="%.10g", header=_AFFINE_HEADER)


def read_affine(path: str | os.PathLike) -> np.ndarray:
    """Read a matrix written by :func:`write_affine` (or any 4x4 text matrix, ``#`` comments).

    Raises
    ------
    CombiregError
        Missing file, not numbers, not 4x4, or a last row other than ``0 0 0 1``.
    """
    path = Path(path)
    if not path.is_file():
        raise CombiregError(f"{path}: no such file")
    try:
        matrix = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise CombiregError(f"{path}: not a text matrix ({exc})") from None
    if matrix.shape != (4, 4) or not np.allclose(matrix[3], (0, 0, 0, 1)) or not np.all(np.isfinite(matrix)):
        raise CombiregError(f"{path}: expected a 4x4 homogeneous matrix (last row 0 0 0 1), got shape {matrix.shape}")
    return matrix
