"""Rigid pre-alignment in torch: centre of gravity, then Mattes mutual information on coarse copies.

The default ``PreAlignment "rigid"`` of :func:`combireg.register`. Why not elastix's
``EulerTransform`` (:func:`combireg.preprocess.prealign`, still there for ``"affine"``, the
``preprocess`` command and the baselines): loading the itk-elastix module alone costs about 7 s
of CPU, more than the whole rigid optimisation here, which draws 8000 voxels of 8 and 4 mm
copies per step and takes about a second. The map is the same kind (rotation and translation
about the target's centre of gravity, Mattes MI with a cubic B-spline Parzen window, robust to a
different sequence on each side). The two maps differ by 0.3-1.4 mm over the landmarks of the
held-out 1 mm to FLAIR pairs (neither is the truth: the pairs also deform), and the registrations
they start end at the same TRE (1.190 against 1.188 mm mean over the 21 development pairs,
BENCHMARKS.md).

The result is a 4x4 matrix ``A`` in LPS mm taking a TARGET point x to its SOURCE point
``A @ [x, 1]``, as :func:`combireg.preprocess.prealign` returns it.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CombiregError
from .geometry import Geometry
from .image import Image
from .losses import mutual_information
from .optimize import Adam
from .pyramid import coarse_copy

__all__ = ["rigid_align", "rotation_matrix", "RIGID_SPACINGS_MM", "RIGID_ITERATIONS",
           "RIGID_STEP_MM", "RIGID_SAMPLES"]

log = logging.getLogger(__name__)

#: Grid spacing in mm of the coarse copies, coarsest first: 8 mm captures 15 degrees and 15 mm
#: of pose from the centres of gravity, 4 mm fixes the map to a fraction of a millimetre.
RIGID_SPACINGS_MM = (8.0, 4.0)
#: Adam iterations per level.
RIGID_ITERATIONS = (150, 80)
#: Adam's first step per level, in mm of motion (translation, and rotation at the brain's
#: radius); it decays linearly to a tenth over the level.
RIGID_STEP_MM = (2.0, 0.5)
#: Target voxels drawn at random for each iteration (elastix draws 2048; a 4 mm brain has
#: about 130 000).
RIGID_SAMPLES = 8000
#: Fewest voxels along an image's shortest axis on any level (a 190 mm brain has 24 at 8 mm).
_MIN_VOXELS = 24
#: A level stops when the share of target samples inside the source falls below this fraction
#: of its share at the level's start (a source with a smaller field of view starts below 1).
_MIN_OVERLAP = 0.5
#: Below this share at the start there is nothing to align.
_LOST_OVERLAP = 0.02
#: Percentiles of each coarse copy mapped to 0 and 1 before the histogram.
_PERCENTILES = (0.5, 99.5)


def rotation_matrix(rotation_vector: torch.Tensor) -> torch.Tensor:
    """3x3 rotation of an axis-angle vector (radians; its direction is the axis), differentiable."""
    zero = rotation_vector.new_zeros(())
    rx, ry, rz = rotation_vector.unbind()
    skew = torch.stack([torch.stack([zero, -rz, ry]), torch.stack([rz, zero, -rx]),
                        torch.stack([-ry, rx, zero])])
    return torch.linalg.matrix_exp(skew)


def _coarse(image: Image, mask: Image | None, spacing_mm: float) -> tuple[torch.Tensor, Geometry, torch.Tensor | None]:
    """First channel smoothed and shrunk to at least ``spacing_mm`` per axis (Gaussian of half a
    factor, as a pyramid level), normalised to [0, 1]; the mask by nearest neighbour."""
    # A small image (a phantom, a slab) keeps at least _MIN_VOXELS voxels along its shortest
    # axis: a histogram of a few hundred samples cannot rank poses.
    extent = float(np.min(np.where(np.asarray(image.geometry.size) > 1, image.geometry.extent_mm, np.inf)))
    spacing_mm = min(spacing_mm, extent / _MIN_VOXELS) if np.isfinite(extent) else spacing_mm
    coarse, coarse_mask = coarse_copy(image, mask, spacing_mm)
    data, geometry = coarse.data[0], coarse.geometry
    inside = None if coarse_mask is None else coarse_mask.data[0] > 0
    values = data[inside] if inside is not None else data.reshape(-1)
    if values.numel() == 0:
        raise CombiregError("rigid pre-alignment: the mask leaves no voxel of the image")
    low, high = float(values.min()), float(values.max())
    # Relative: smoothing leaves float32 rounding noise on a constant image.
    if high - low <= 1e-5 * max(abs(low), abs(high), 1e-30):
        raise CombiregError("rigid pre-alignment: the image is constant")
    lo, hi = np.percentile(values.numpy(), _PERCENTILES)
    if hi - lo <= 1e-5 * (high - low):
        lo, hi = low, high  # mostly background: the full range
    return ((data - lo) / (hi - lo)).clamp_(0.0, 1.0), geometry, inside


def _centre_of_gravity(data: torch.Tensor, geometry: Geometry, inside: torch.Tensor | None) -> np.ndarray:
    weights = data.reshape(-1).double().numpy()
    if inside is not None:
        weights = weights * inside.reshape(-1).numpy()
    if weights.sum() <= 0:
        return geometry.index_to_world(((np.asarray(geometry.size) - 1) / 2.0)[None])[0]
    return weights @ geometry.world_grid().reshape(-1, 3) / weights.sum()


def rigid_align(source: Image, target: Image, *, source_mask: Image | None = None,
                target_mask: Image | None = None, spacings_mm=RIGID_SPACINGS_MM,
                iterations=RIGID_ITERATIONS, step_mm=RIGID_STEP_MM, samples: int = RIGID_SAMPLES,
                bins: int = 32, seed: int = 0) -> np.ndarray:
    """Rigid registration of ``source`` to ``target``: centres of gravity, then Mattes MI.

    Parameters
    ----------
    source, target : Image
        The first channel of each is used; any grids, orientations and spacings.
    source_mask, target_mask : Image, optional
        Binary masks on the grid of their image (nonzero inside): only target samples inside
        the target mask count, and only those that land inside the source mask.
    spacings_mm : sequence of float
        Spacing of each level's coarse copies, coarsest first (never finer than an image).
    iterations : sequence of int
        Adam iterations per level (>= 0).
    step_mm : sequence of float
        Adam's first step per level in mm (> 0), decaying linearly to a tenth.
    samples : int
        Target voxels drawn at random (with replacement) for each iteration; all of them when
        the level has fewer.
    bins : int
        Histogram bins per image of the Parzen-window MI.
    seed : int
        Seed of the random samples: runs are deterministic.

    Returns
    -------
    ndarray, (4, 4) float64
        ``A`` in LPS mm taking a target point x to its source point ``A @ [x, 1]``.

    Raises
    ------
    CombiregError
        A mask that leaves nothing, a constant image, or fewer than 2 % of the target's
        samples inside the source after aligning the centres of gravity.
    """
    for name, value in (("source", source), ("target", target)):
        if not isinstance(value, Image):
            raise TypeError(f"rigid_align: {name} must be an Image, got {type(value).__name__}")
    levels = len(spacings_mm)
    if levels < 1 or len(iterations) != levels or len(step_mm) != levels:
        raise ValueError("spacings_mm, iterations and step_mm need one value per level")
    if any(s <= 0 for s in spacings_mm) or any(int(n) < 0 for n in iterations) or any(s <= 0 for s in step_mm):
        raise ValueError("spacings_mm and step_mm must be > 0 and iterations >= 0")
    if samples < 100:
        raise ValueError(f"samples must be >= 100, got {samples}")
    generator = torch.Generator().manual_seed(int(seed))
    target_centre = source_centre = None
    rotation = torch.zeros(3, dtype=torch.float64, requires_grad=True)  # mm at the radius
    translation = torch.zeros(3, dtype=torch.float64, requires_grad=True)  # mm
    radius = 1.0
    for level, spacing in enumerate(spacings_mm):
        fixed, fixed_geometry, fixed_inside = _coarse(target, target_mask, float(spacing))
        moving, moving_geometry, moving_inside = _coarse(source, source_mask, float(spacing))
        if target_centre is None:
            # The rotation turns about the target's centre of gravity and starts as the
            # shift between the two centres (elastix's CenterOfGravity initialisation).
            target_centre = _centre_of_gravity(fixed, fixed_geometry, fixed_inside)
            source_centre = _centre_of_gravity(moving, moving_geometry, moving_inside)
        points = torch.as_tensor(fixed_geometry.world_grid().reshape(-1, 3) - target_centre)
        values = fixed.reshape(-1)
        candidates = (torch.arange(values.numel()) if fixed_inside is None
                      else torch.nonzero(fixed_inside.reshape(-1)).reshape(-1))
        if level == 0:
            # Rotation in mm of motion at the RMS radius of the target's content: a step
            # moves the outer brain about as far as a translation step does.
            weights = values[candidates].double()
            radius = max(float((points[candidates].square().sum(1) * weights).sum()
                               / weights.sum().clamp_min(1e-12)) ** 0.5, 1.0)
        to_normalised = torch.as_tensor(moving_geometry.world_to_normalised_matrix)
        offset = torch.as_tensor(source_centre)
        moving_volume = moving[None, None]
        mask_volume = None if moving_inside is None else moving_inside.to(torch.float32)[None, None]
        count = int(iterations[level])
        optimiser = Adam([rotation, translation], lr=float(step_mm[level]))
        best = (float("inf"), rotation.detach().clone(), translation.detach().clone())
        start_overlap = None
        for step in range(count):
            optimiser.lr = float(step_mm[level]) * (1.0 - 0.9 * step / max(count - 1, 1))
            # A new random subset every iteration, as elastix's random sampler: cheap
            # iterations whose noise the decaying step averages out.
            chosen = candidates
            if candidates.numel() > samples:
                chosen = candidates[torch.randint(candidates.numel(), (samples,), generator=generator)]
            fixed_values = values[chosen].reshape(1, 1, 1, 1, -1)
            optimiser.zero_grad()
            mapped = points[chosen] @ rotation_matrix(rotation / radius).T + offset + translation
            grid = (mapped @ to_normalised[:3, :3].T + to_normalised[:3, 3]).to(torch.float32)
            grid = grid.reshape(1, 1, 1, -1, 3)
            warped = F.grid_sample(moving_volume, grid, mode="bilinear", padding_mode="border",
                                   align_corners=True)
            # Samples that leave the source (or its mask) do not count, as in elastix.
            weight = (grid.detach().abs() <= 1.0).all(dim=-1).to(torch.float32)[:, None]
            if mask_volume is not None:
                weight = weight * F.grid_sample(mask_volume, grid.detach(), mode="nearest",
                                                padding_mode="zeros", align_corners=True)
            overlap = float(weight.sum()) / weight.numel()
            if start_overlap is None:
                start_overlap = overlap
                if level == 0 and overlap < _LOST_OVERLAP:
                    raise CombiregError(f"rigid pre-alignment: only {100 * overlap:.1f} % of the target's voxels "
                                        "fall inside the source after aligning the centres of gravity; "
                                        "the images do not cover the same anatomy")
            if overlap < _MIN_OVERLAP * start_overlap:
                # MI can rise as the overlap shrinks (noise, a tiny image): stop before the
                # source leaves the target and keep the best pose of the level.
                with torch.no_grad():
                    rotation.copy_(best[1])
                    translation.copy_(best[2])
                log.warning("rigid pre-alignment: level %d stopped after %d iterations, the source was "
                            "leaving the target's field of view; kept its best pose", level, step)
                break
            loss = mutual_information(warped, fixed_values, weight, bins=bins)
            value = float(loss.detach())
            if value < best[0]:
                best = (value, rotation.detach().clone(), translation.detach().clone())
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        linear = rotation_matrix(rotation / radius).numpy()
        shift = source_centre + translation.numpy()
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = shift - linear @ target_centre
    log.info("rigid pre-alignment: target -> source matrix\n%s", np.array2string(matrix, precision=4))
    return matrix
