"""Simulated pre-/post-operative image pairs with exactly known correspondence.

A case is built from a healthy two-channel (T1, T2) template and analytic forward maps from
template space ``p`` (world LPS mm) into each simulated image:

* pre-op (the *source*): ``psi_pre(p) = p + w_push(p) + w_rand1(p)``, the mass effect of a
  tumour (a radial push away from its centre) plus a small smooth random field;
* post-op (the *target*): ``psi_post(p) = T(p + w_pull(p) + w_rand2(p))``, tissue collapsing
  towards the resection cavity, another smooth random field, then a rigid misalignment ``T``.

Images are made by pull-back, ``image(y) = template(psi^{-1}(y))``, with ``psi^{-1}`` solved
numerically (damped Newton) and checked to 0.01 mm. Lesions are painted as functions of the
pulled-back template point, so their appearance moves with the tissue. Landmarks are mapped
with the forward maps, which makes the ground truth exact:

``target landmark = psi_post(p)``, ``source landmark = psi_pre(p)`` and, on the target grid,
``u(x) = psi_pre(psi_post^{-1}(x)) - x`` maps every target point ``x`` to its source point
``x + u(x)``.

The template (MNI152NLin2009cAsym 1 mm T1w/T2w) and the 32 AFIDs come from
:func:`combireg.template.fetch_template`; the deformation models are
:mod:`combireg.deformations`.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy import ndimage as ndi

from .cases import MANIFEST_COLUMNS
from .deformations import Deformation, FourierField, RadialField, Rigid, apply_linear, rotation_matrix
from .errors import CombiregError
from .geometry import Geometry
from .image import Image
from .landmarks import Landmarks, write_fcsv
from .outputs import atomic_output_dir, prepare_output_dir
from .template import NOTICE, fetch_template

__all__ = [
    "SimulatedCase",
    "simulate_case",
    "write_case",
    "generate_dataset",
    "estimate_brain_mask",
    "CASE_FILES",
    "MANIFEST_HEADER",
]

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- constants
#: File names of one case directory; later tools rely on them.
CASE_FILES = {
    "source_t1": "source_t1.nii.gz",
    "source_t2": "source_t2.nii.gz",
    "target_t1": "target_t1.nii.gz",
    "target_t2": "target_t2.nii.gz",
    "source_landmarks": "source_landmarks.fcsv",
    "target_landmarks": "target_landmarks.fcsv",
    "ground_truth": "gt_field.nii.gz",
    "info": "case.json",
}
#: The header of ``manifest.csv``: the manifest of :mod:`combireg.cases`.
MANIFEST_HEADER = MANIFEST_COLUMNS

_INVERSE_MAX_RESIDUAL_MM = 0.01  # a pulled-back point with a larger inverse residual is a failure
_CHUNK = 1 << 18  # points per chunk: bounds memory to a few tens of MB per temporary
_INTENSITY_SCALE = 1000.0  # template channels are rescaled so that bright tissue is ~1000


# ============================================================================ lesion model
@dataclass(frozen=True)
class _Lesion:
    """Tumour shape and oedema extent, defined in template space.

    The tumour is the set ``rho(p) < 1``: an ellipsoid of nominal radius ``R`` with random axes
    and a smooth lobulated surface.
    """

    centre: np.ndarray
    radius: float
    axes: np.ndarray  # (3, 3) rotation; columns are the ellipsoid axes
    scales: np.ndarray  # (3,) semi-axis factors
    lobulation: FourierField  # scalar, relative surface modulation
    core_fraction: float  # necrotic core boundary as a fraction of rho
    edema_width_mm: float
    edema_irregularity: FourierField  # scalar, relative width modulation
    texture: FourierField  # scalar, relative intensity modulation inside the tumour

    @property
    def max_extent_mm(self) -> float:
        """Largest distance of the tumour surface from the centre."""
        return self.radius * float(self.scales.max()) * (1.0 + self.lobulation.max_amplitude)

    def rho(self, p: np.ndarray) -> np.ndarray:
        local = apply_linear(p - self.centre, self.axes.T) / self.scales
        return np.linalg.norm(local, axis=1) / self.radius / (1.0 + self.lobulation(p)[:, 0])

    def edema(self, p: np.ndarray, rho: np.ndarray, width_factor: float) -> np.ndarray:
        """Oedema weight in [0, 1], decaying with the distance outside the tumour surface."""
        outside_mm = np.maximum(rho - 1.0, 0.0) * self.radius
        width = self.edema_width_mm * width_factor * (1.0 + self.edema_irregularity(p)[:, 0])
        return np.exp(-((outside_mm / width) ** 2))


def _random_lesion(rng: np.random.Generator, centre: np.ndarray, radius: float) -> _Lesion:
    axes, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return _Lesion(
        centre=centre,
        radius=radius,
        axes=axes,
        scales=rng.uniform(0.85, 1.15, size=3),
        lobulation=FourierField.random(rng, max_amplitude=0.12, wavelength_mm=(radius, 2.5 * radius),
                                       n_components=1),
        core_fraction=float(rng.uniform(0.45, 0.65)),
        edema_width_mm=float(rng.uniform(8.0, 16.0)),
        edema_irregularity=FourierField.random(rng, max_amplitude=0.35, wavelength_mm=(15.0, 40.0),
                                               n_components=1),
        texture=FourierField.random(rng, max_amplitude=0.12, wavelength_mm=(4.0, 12.0), n_components=1),
    )


def _soft_inside(x: np.ndarray, edge: float, width: float) -> np.ndarray:
    """1 well below ``edge``, 0 well above; a smooth step avoids voxel-sized jaggies."""
    return 0.5 * (1.0 - np.tanh((x - edge) / width))


# ============================================================================ template handling
@dataclass(frozen=True)
class _Tissue:
    """Reference intensities of the normalised template (T1, T2), used to paint lesions."""

    wm: np.ndarray  # (2,)
    csf: np.ndarray  # (2,)
    gm_t1: float


def _normalise_template(template: Image) -> np.ndarray:
    """Template channels as float32 scaled so that the 99.9th percentile is 1000."""
    data = template.numpy().astype(np.float32)
    out = np.empty_like(data)
    for c in range(data.shape[0]):
        hi = float(np.percentile(data[c], 99.9))
        if hi <= 0:
            raise CombiregError(f"template channel {c} has no positive intensities")
        out[c] = np.clip(data[c], 0.0, None) * (_INTENSITY_SCALE / hi)
    return out


def estimate_brain_mask(template: Image) -> np.ndarray:
    """A rough brain-tissue mask of a T1/T2 template (grey plus white matter, no CSF).

    White matter is bright on T1 and dark on T2, which separates it from scalp fat; the largest
    such component, grown by 5 mm, bounds the brain, and within that bound tissue is whatever is
    neither CSF-dark on T1 nor CSF-bright on T2.

    Parameters
    ----------
    template : Image
        Channels (T1, T2).

    Returns
    -------
    ndarray of bool, (Z, Y, X)
    """
    norm = _normalise_template(template) / _INTENSITY_SCALE
    t1, t2 = norm[0], norm[1]
    wm = (t1 > 0.75) & (t2 < 0.45)
    labels, n = ndi.label(wm)
    if n == 0:
        raise CombiregError("template: found no white matter (T1 bright and T2 dark); pass brain_mask")
    sizes = ndi.sum_labels(wm, labels, index=np.arange(1, n + 1))
    wm = labels == (1 + int(np.argmax(sizes)))
    sampling = tuple(reversed(template.geometry.spacing))
    near_wm = ndi.distance_transform_edt(~wm, sampling=sampling) <= 5.0
    hull = ndi.binary_fill_holes(near_wm)
    return hull & (t1 > 0.45) & (t2 < 0.7)


def _smooth_hull(brain: np.ndarray, geometry: Geometry, radius_mm: float = 8.0) -> np.ndarray:
    """The brain with sulci, fissures and ventricles filled: a morphological closing (via
    distance transforms, cheap for large radii) followed by hole filling."""
    sampling = tuple(reversed(geometry.spacing))
    pad = int(np.ceil(radius_mm / min(geometry.spacing))) + 1
    padded = np.pad(brain, pad)  # so the closing is not clipped by the image border
    dilated = ndi.distance_transform_edt(~padded, sampling=sampling) <= radius_mm
    closed = ndi.distance_transform_edt(dilated, sampling=sampling) > radius_mm
    inner = tuple(slice(pad, -pad) for _ in range(3))
    return ndi.binary_fill_holes(closed[inner] | brain)


def _decimated(geometry: Geometry, arrays: list[np.ndarray], min_spacing_mm: float) -> tuple[Geometry, list]:
    """Every f-th voxel of each array (the same f on all axes, so that the spacing is at least about
    ``min_spacing_mm`` on the finest axis) and the matching grid."""
    f = max(1, int(min_spacing_mm // min(geometry.spacing)))
    if f == 1:
        return geometry, list(arrays)
    out = [np.ascontiguousarray(a[::f, ::f, ::f]) for a in arrays]
    size = tuple(reversed(out[0].shape))
    return Geometry(size, geometry.origin, tuple(f * np.asarray(geometry.spacing)), geometry.direction), out


def _tissue_reference(norm: np.ndarray, brain: np.ndarray, hull: np.ndarray) -> _Tissue:
    t1, t2 = norm[0][brain], norm[1][brain]
    wm_sel = t1 >= np.median(t1)
    return _Tissue(
        wm=np.array([np.median(t1[wm_sel]), np.median(t2[wm_sel])], dtype=np.float32),
        csf=np.array([np.percentile(norm[0][hull], 1), np.percentile(norm[1][hull], 99)], dtype=np.float32),
        gm_t1=float(np.percentile(t1, 15)),
    )


def _sample(volumes: list[np.ndarray], geometry: Geometry, points: np.ndarray) -> np.ndarray:
    """Trilinear samples of each volume (Z, Y, X) at world points ``(N, 3)``, ``(V, N)``; 0 outside."""
    coords = _world_to_index(geometry, points)[:, ::-1].T  # ITK (i, j, k) -> array axes (z, y, x)
    return np.stack([ndi.map_coordinates(v, coords, order=1, mode="constant", cval=0.0, prefilter=False)
                     for v in volumes])


# ============================================================================ grids
def _world_to_index(geometry: Geometry, points: np.ndarray) -> np.ndarray:
    """Continuous indices (ITK order) of world points (N, 3); see :func:`combireg.deformations.apply_linear` for why."""
    return apply_linear(points - np.asarray(geometry.origin), np.linalg.inv(geometry.index_to_world_linear))


def _index_to_world(geometry: Geometry, index: np.ndarray) -> np.ndarray:
    return apply_linear(index, geometry.index_to_world_linear) + np.asarray(geometry.origin)


def _resampled_geometry(geometry: Geometry, spacing: float) -> Geometry:
    """The template's grid (same origin and direction) at isotropic ``spacing``, inside its extent."""
    size = np.floor(geometry.extent_mm / spacing + 1e-6).astype(int) + 1
    return Geometry(tuple(int(v) for v in size), geometry.origin, (spacing,) * 3, geometry.direction)


def _oblique_geometry(geometry: Geometry, rotation: np.ndarray) -> Geometry:
    """A grid rotated about the centre of ``geometry`` that still covers all of it."""
    spacing = np.asarray(geometry.spacing)
    direction = rotation @ geometry.direction_matrix
    centre = geometry.index_to_world((np.asarray(geometry.size)[None] - 1) / 2.0)[0]
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * (np.asarray(geometry.size) - 1)
    local = (geometry.index_to_world(corners) - centre) @ np.linalg.inv(direction).T
    half = np.abs(local).max(axis=0)
    size = np.ceil(2.0 * half / spacing - 1e-6).astype(int) + 1
    origin = centre - direction @ (spacing * (size - 1) / 2.0)
    return Geometry(tuple(int(v) for v in size), tuple(origin), tuple(spacing), tuple(direction.ravel()))


def _grid_points(geometry: Geometry, start: int, stop: int) -> np.ndarray:
    """World points of the voxels with flat (C-order, (Z, Y, X)) indices ``start..stop-1``."""
    k, j, i = np.unravel_index(np.arange(start, stop), geometry.shape)
    return _index_to_world(geometry, np.stack([i, j, k], axis=1).astype(np.float64))


# ============================================================================ simulation
@dataclass
class SimulatedCase:
    """One simulated pre-/post-operative pair with its ground truth.

    Attributes
    ----------
    source : Image
        Pre-operative (T1, T2).
    target : Image
        Post-operative (T1, T2).
    source_landmarks, target_landmarks : Landmarks
        Corresponding points (same labels, same order), LPS mm.
    displacement_lps_mm : ndarray (Z, Y, X, 3) or None
        On the target grid: target point ``x`` corresponds to source point ``x + u(x)``.
    info : dict
        JSON-serialisable parameters of the simulation.
    """

    source: Image
    target: Image
    source_landmarks: Landmarks
    target_landmarks: Landmarks
    displacement_lps_mm: np.ndarray | None
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Appearance:
    """Scanner-like effects of one acquisition."""

    bias: FourierField  # scalar log-bias field
    gamma: np.ndarray  # (2,) per-channel contrast remap exponents
    noise_sigma: float  # Rician noise level, intensity units


def _place_tumour(rng: np.random.Generator, norm: np.ndarray, brain: np.ndarray, hull: np.ndarray,
                  geometry: Geometry, radius_range: tuple[float, float]) -> tuple[np.ndarray, float, _Lesion]:
    """Pick radius, shape and a centre in one hemisphere's white matter, away from the brain edge."""
    depth = ndi.distance_transform_edt(hull, sampling=tuple(reversed(geometry.spacing)))
    t1 = norm[0]
    white = brain & (t1 >= np.median(t1[brain]))
    zyx = np.argwhere(brain)
    world_brain = geometry.index_to_world(zyx[::max(1, len(zyx) // 20000), ::-1].astype(np.float64))
    midline_x = float(np.median(world_brain[:, 0]))
    side = float(rng.choice([-1.0, 1.0]))
    radius = float(rng.uniform(*radius_range))
    for _ in range(6):
        lesion = _random_lesion(rng, np.zeros(3), radius)
        extent = lesion.max_extent_mm
        candidates = np.argwhere(white & (depth > extent + 8.0))
        if len(candidates):
            world = geometry.index_to_world(candidates[:, ::-1].astype(np.float64))
            candidates = world[side * (world[:, 0] - midline_x) > extent + 3.0]
        if len(candidates):
            jitter = rng.uniform(-0.5, 0.5, 3) * np.asarray(geometry.spacing)
            centre = candidates[rng.integers(len(candidates))] + jitter
            return centre, side, replace(lesion, centre=centre)
        radius *= 0.8  # a small brain (or phantom): shrink the tumour until it fits
        log.info("no room for the tumour; trying radius %.1f mm", radius)
    raise CombiregError("template brain is too small to place a tumour away from its edges")


def _deformations(rng: np.random.Generator, lesion: _Lesion, brain_centre: np.ndarray,
                  rigid_rotation_deg: float, rigid_translation_mm: float) -> tuple[Deformation, Deformation, dict]:
    radius, centre = lesion.radius, lesion.centre
    # Peak displacement a R / 2; a <= 1.6 keeps the radial profile far from folding (needs a < 8).
    push_peak = rng.uniform(3.0, 8.0)
    push = RadialField(centre, radius, min(2.0 * push_peak / radius, 1.6))
    # Collapse: a >= -0.6 keeps the tissue near the centre from being squeezed too hard (needs a > -1).
    pull_peak = rng.uniform(1.5, 4.0)
    pull = RadialField(centre, radius, -min(2.0 * pull_peak / radius, 0.6))
    noise_pre = FourierField.random(rng, max_amplitude=rng.uniform(1.0, 2.0), wavelength_mm=(60.0, 160.0))
    noise_post = FourierField.random(rng, max_amplitude=rng.uniform(1.0, 2.0), wavelength_mm=(60.0, 160.0))
    angles = rng.uniform(-rigid_rotation_deg, rigid_rotation_deg, size=3)
    translation = rng.uniform(-rigid_translation_mm, rigid_translation_mm, size=3)
    rigid = Rigid(rotation_matrix(angles), brain_centre, translation)
    params = {
        "mass_effect_peak_mm": push.peak_mm,
        "mass_effect_amplitude": push.amplitude,
        "collapse_peak_mm": pull.peak_mm,
        "collapse_amplitude": pull.amplitude,
        "random_field_max_mm": {"source": noise_pre.max_amplitude, "target": noise_post.max_amplitude},
        "random_field_max_gradient": {"source": noise_pre.max_gradient, "target": noise_post.max_gradient},
        "rigid": {
            "rotation_deg_xyz": angles.tolist(),
            "rotation_matrix": rigid.rotation.tolist(),
            "centre_lps_mm": brain_centre.tolist(),
            "translation_lps_mm": translation.tolist(),
            "note": "target = centre + rotation @ (q - centre) + translation",
        },
    }
    return Deformation((push, noise_pre)), Deformation((pull, noise_post), rigid), params


def _paint(values: np.ndarray, p: np.ndarray, mask: np.ndarray, lesion: _Lesion, tissue: _Tissue,
           postop: bool) -> np.ndarray:
    """Lesion intensities over the pulled-back template values ``values`` (2, N)."""
    rho = lesion.rho(p)
    edge = 0.06  # soft edge, as a fraction of the radius (about 1 mm)
    inside = _soft_inside(rho, 1.0, edge)
    texture = 1.0 + lesion.texture(p)[:, 0]
    # Oedema spreads along white matter and stays in the brain.
    wm_weight = np.clip((values[0] - tissue.gm_t1) / max(tissue.wm[0] - tissue.gm_t1, 1e-3), 0.0, 1.0)
    edema = lesion.edema(p, rho, 0.6 if postop else 1.0) * mask * (0.35 + 0.65 * wm_weight)
    edema *= 0.6 if postop else 1.0
    edema_t2 = 0.8 * tissue.csf[1]
    out = np.empty_like(values)
    out[0] = values[0] * (1.0 - 0.25 * edema)
    out[1] = values[1] + 0.85 * edema * (edema_t2 - values[1])
    if postop:
        # Resection cavity filled with CSF; a thin T1-bright margin (blood products, gliosis).
        margin = np.exp(-(((rho - 1.0) * lesion.radius / 1.5) ** 2)) * (1.0 - inside)
        out[0] *= 1.0 + 0.12 * margin
        lesion_values = (tissue.csf[0] * (1.0 + 0.3 * (texture - 1.0)), tissue.csf[1] * np.ones_like(rho))
    else:
        # Enhancing rim and necrotic core; T1 (post-contrast-like) and T2 differ in contrast.
        core = _soft_inside(rho, lesion.core_fraction, edge)
        t1 = (core * 0.35 + (1.0 - core) * 1.1) * tissue.wm[0] * texture
        t2 = (core * 0.95 + (1.0 - core) * 0.6) * tissue.csf[1] * texture
        lesion_values = (t1, t2)
    for c in range(2):
        out[c] = inside * lesion_values[c] + (1.0 - inside) * out[c]
    return out


def _render(geometry: Geometry, psi: Deformation, norm: np.ndarray, mask_f: np.ndarray,
            template_geometry: Geometry, lesion: _Lesion, tissue: _Tissue, *, postop: bool,
            displacement_of: Deformation | None = None) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Pull the template back through ``psi`` onto ``geometry`` and paint the lesion.

    When ``displacement_of`` is given, also return ``displacement_of(psi^{-1}(x)) - x`` at
    every voxel ``x`` (the ground-truth displacement for target grids).
    """
    n = geometry.num_voxels
    image = np.empty((2, n), dtype=np.float32)
    disp = np.empty((n, 3), dtype=np.float32) if displacement_of is not None else None
    worst = 0.0
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        y = _grid_points(geometry, start, stop)
        p, residual = psi.inverse(y)
        worst = max(worst, float(residual.max()))
        values = _sample([norm[0], norm[1], mask_f], template_geometry, p)
        values, mask = values[:2], values[2]
        image[:, start:stop] = _paint(values, p, mask, lesion, tissue, postop)
        if disp is not None:
            disp[start:stop] = displacement_of(p) - y
    if worst > _INVERSE_MAX_RESIDUAL_MM:
        raise RuntimeError(f"inverse deformation did not converge: residual {worst:.3g} mm")
    image = image.reshape((2,) + geometry.shape)
    return image, (disp.reshape(geometry.shape + (3,)) if disp is not None else None), worst


def _random_appearance(rng: np.random.Generator, *, postop: bool) -> _Appearance:
    if postop:
        return _Appearance(
            bias=FourierField.random(rng, max_amplitude=rng.uniform(0.1, 0.2), wavelength_mm=(200.0, 400.0),
                                     n_components=1),
            gamma=rng.uniform(0.75, 1.3, size=2),
            noise_sigma=float(rng.uniform(10.0, 20.0)),
        )
    return _Appearance(
        bias=FourierField.random(rng, max_amplitude=rng.uniform(0.03, 0.07), wavelength_mm=(200.0, 400.0),
                                 n_components=1),
        gamma=np.ones(2),
        noise_sigma=float(rng.uniform(4.0, 8.0)),
    )


def _acquire(image: np.ndarray, geometry: Geometry, appearance: _Appearance, rng: np.random.Generator) -> np.ndarray:
    """Contrast remap, multiplicative bias and Rician noise, in place on ``(2, Z, Y, X)``."""
    bias = np.empty(geometry.shape, dtype=np.float32).reshape(-1)
    for start in range(0, geometry.num_voxels, _CHUNK):
        stop = min(start + _CHUNK, geometry.num_voxels)
        bias[start:stop] = np.exp(appearance.bias(_grid_points(geometry, start, stop))[:, 0])
    bias = bias.reshape(geometry.shape)
    for c in range(image.shape[0]):
        channel = _INTENSITY_SCALE * (np.clip(image[c], 0.0, None) / _INTENSITY_SCALE) ** appearance.gamma[c]
        channel *= bias
        # Magnitude images: noise on the real and imaginary parts gives Rician statistics.
        real = channel + rng.normal(0.0, appearance.noise_sigma, size=channel.shape).astype(np.float32)
        imag = rng.normal(0.0, appearance.noise_sigma, size=channel.shape).astype(np.float32)
        image[c] = np.sqrt(real * real + imag * imag)
    return image


def _tissue_points(rng: np.random.Generator, brain: np.ndarray, geometry: Geometry, count: int) -> np.ndarray:
    """Up to ``4 count + 100`` random points inside brain-mask voxels (sub-voxel jitter), LPS mm."""
    flat = np.flatnonzero(brain)
    take = min(len(flat), 4 * count + 100)
    chosen = rng.choice(len(flat), size=take, replace=False)  # random order: callers keep a prefix
    k, j, i = np.unravel_index(flat[chosen], brain.shape)
    index = np.stack([i, j, k], axis=1) + rng.uniform(-0.5, 0.5, size=(take, 3))
    return geometry.index_to_world(index)


def _landmarks(rng: np.random.Generator, afids: Landmarks, brain: np.ndarray, template_geometry: Geometry,
               lesion_centre: np.ndarray, exclusion_mm: float, psi_pre: Deformation, psi_post: Deformation,
               source_geometry: Geometry, target_geometry: Geometry,
               n_tissue: int) -> tuple[Landmarks, Landmarks, dict]:
    def usable(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        far = np.linalg.norm(points - lesion_centre, axis=1) > exclusion_mm
        inside = (source_geometry.contains_index(source_geometry.world_to_index(psi_pre(points)))
                  & target_geometry.contains_index(target_geometry.world_to_index(psi_post(points))))
        return far, inside

    far, inside = usable(afids.points_lps_mm)
    keep = far & inside
    excluded = [lab for lab, f in zip(afids.labels, far) if not f]
    outside = [lab for lab, f, i in zip(afids.labels, far, inside) if f and not i]
    if excluded:
        log.info("AFIDs %s lie within %.1f mm of the tumour centre and are left out", ", ".join(excluded), exclusion_mm)
    if outside:
        log.info("AFIDs %s fall outside an image grid and are left out", ", ".join(outside))
    candidates = _tissue_points(rng, brain, template_geometry, n_tissue) if n_tissue > 0 else np.zeros((0, 3))
    far_t, inside_t = usable(candidates)
    tissue = candidates[far_t & inside_t][:n_tissue]
    if len(tissue) < n_tissue:
        log.warning("only %d of %d tissue points could be placed", len(tissue), n_tissue)
    points = np.concatenate([afids.points_lps_mm[keep], tissue])
    labels = [lab for lab, k in zip(afids.labels, keep) if k] + [f"tissue_{i + 1:03d}" for i in range(len(tissue))]
    counts = {"afids": int(keep.sum()), "tissue": len(tissue), "afids_excluded_near_tumour": excluded,
              "afids_outside_grid": outside}
    return Landmarks(psi_pre(points), labels), Landmarks(psi_post(points), labels), counts


def simulate_case(template: Image, afids: Landmarks, *, seed: int, spacing: float = 1.0,
                  n_tissue_points: int = 100, brain_mask: np.ndarray | None = None,
                  ground_truth: bool = True, oblique_source: bool = False,
                  tumour_radius_mm: tuple[float, float] = (10.0, 20.0),
                  rigid_rotation_deg: float = 4.0, rigid_translation_mm: float = 4.0) -> SimulatedCase:
    """Simulate one pre-/post-operative pair from a healthy template.

    Parameters
    ----------
    template : Image
        Two channels, (T1, T2), any grid (LPS world).
    afids : Landmarks
        Anatomical landmarks on the template (LPS mm).
    seed : int
        Everything random derives from it; the same inputs and seed give identical outputs.
    spacing : float
        Isotropic output spacing in mm (source and target grids).
    n_tissue_points : int
        Random brain-tissue landmarks added to the AFIDs.
    brain_mask : ndarray of bool (Z, Y, X), optional
        Brain tissue on the template grid; estimated with :func:`estimate_brain_mask` if omitted.
    ground_truth : bool
        Compute the dense target-to-source displacement.
    oblique_source : bool
        Put the pre-op image on a grid rotated by up to 15 degrees (exercises resampling).
    tumour_radius_mm : (float, float)
        Range of the nominal tumour radius ``R``.
    rigid_rotation_deg, rigid_translation_mm : float
        Bounds of the post-op rigid misalignment (per axis).

    Returns
    -------
    SimulatedCase
    """
    if template.num_channels != 2:
        raise CombiregError(f"template must have 2 channels (T1, T2), got {template.num_channels}")
    if not spacing > 0:
        raise CombiregError(f"spacing must be positive, got {spacing}")
    if n_tissue_points < 0:
        raise CombiregError("n_tissue_points must be >= 0")
    geom = template.geometry
    # Independent streams, so that e.g. asking for more tissue points leaves the images unchanged.
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(7)]
    rng_shape, rng_warp, rng_points, rng_look, rng_noise_src, rng_noise_tgt, rng_grid = streams

    norm = _normalise_template(template)
    brain = estimate_brain_mask(template) if brain_mask is None else np.asarray(brain_mask, dtype=bool)
    if brain.shape != geom.shape:
        raise CombiregError(f"brain_mask shape {brain.shape} does not match the template {geom.shape}")
    if brain.sum() < 100:
        raise CombiregError("brain_mask has fewer than 100 voxels")
    # Morphology on a >= 2 mm copy: distance transforms of a 1 mm template cost seconds, and
    # 2 mm is plenty for placing a tumour and for intensity statistics.
    coarse_geom, coarse = _decimated(geom, [norm[0], norm[1], brain], 2.0)
    norm_c, brain_c = np.stack(coarse[:2]), coarse[2]
    hull = _smooth_hull(brain_c, coarse_geom)
    tissue = _tissue_reference(norm_c, brain_c, hull)
    centre, side, lesion = _place_tumour(rng_shape, norm_c, brain_c, hull, coarse_geom, tumour_radius_mm)
    brain_centre = geom.index_to_world(np.argwhere(brain).mean(axis=0)[None, ::-1])[0]
    psi_pre, psi_post, warp_info = _deformations(rng_warp, lesion, brain_centre, rigid_rotation_deg,
                                                 rigid_translation_mm)

    target_geometry = _resampled_geometry(geom, float(spacing))
    source_geometry = target_geometry
    oblique_deg = [0.0, 0.0, 0.0]
    if oblique_source:
        oblique_deg = rng_grid.uniform(-15.0, 15.0, size=3).tolist()
        source_geometry = _oblique_geometry(target_geometry, rotation_matrix(np.asarray(oblique_deg)))

    mask_f = ndi.gaussian_filter(brain.astype(np.float32), sigma=1.0)
    src, _, res_src = _render(source_geometry, psi_pre, norm, mask_f, geom, lesion, tissue, postop=False)
    tgt, disp, res_tgt = _render(target_geometry, psi_post, norm, mask_f, geom, lesion, tissue, postop=True,
                                 displacement_of=psi_pre if ground_truth else None)
    look_src = _random_appearance(rng_look, postop=False)
    look_tgt = _random_appearance(rng_look, postop=True)
    _acquire(src, source_geometry, look_src, rng_noise_src)
    _acquire(tgt, target_geometry, look_tgt, rng_noise_tgt)

    exclusion = lesion.max_extent_mm + 5.0
    src_lm, tgt_lm, counts = _landmarks(rng_points, afids, brain, geom, centre, exclusion, psi_pre, psi_post,
                                        source_geometry, target_geometry, n_tissue_points)
    distance = np.linalg.norm(tgt_lm.points_lps_mm - src_lm.points_lps_mm, axis=1)
    info = {
        "seed": int(seed),
        "spacing_mm": float(spacing),
        "oblique_source_deg": oblique_deg,
        "tumour": {
            "centre_template_lps_mm": centre.tolist(),
            "centre_source_lps_mm": psi_pre(centre)[0].tolist(),
            "centre_target_lps_mm": psi_post(centre)[0].tolist(),
            "hemisphere": "left" if side > 0 else "right",  # LPS: +x is the patient's left
            "radius_mm": lesion.radius,
            "max_extent_mm": lesion.max_extent_mm,
            "semi_axis_factors": lesion.scales.tolist(),
            "core_fraction": lesion.core_fraction,
            "edema_width_mm": lesion.edema_width_mm,
            "landmark_exclusion_radius_mm": exclusion,
        },
        **warp_info,
        "appearance": {
            "source": {"noise_sigma": look_src.noise_sigma, "bias_max": look_src.bias.max_amplitude,
                       "gamma_t1_t2": look_src.gamma.tolist()},
            "target": {"noise_sigma": look_tgt.noise_sigma, "bias_max": look_tgt.bias.max_amplitude,
                       "gamma_t1_t2": look_tgt.gamma.tolist()},
        },
        "inverse_residual_max_mm": {"source": res_src, "target": res_tgt},
        "landmarks": {**counts, "total": len(src_lm),
                      "initial_distance_mm": {"mean": float(distance.mean()) if len(distance) else 0.0,
                                              "max": float(distance.max()) if len(distance) else 0.0}},
        "geometry": {"source": source_geometry.to_dict(), "target": target_geometry.to_dict()},
    }
    log.info("case seed %d: tumour R=%.1f mm, push %.1f mm, collapse %.1f mm, %d landmarks",
             seed, lesion.radius, warp_info["mass_effect_peak_mm"], warp_info["collapse_peak_mm"], len(src_lm))
    return SimulatedCase(
        source=Image(torch.from_numpy(src), source_geometry),
        target=Image(torch.from_numpy(tgt), target_geometry),
        source_landmarks=src_lm,
        target_landmarks=tgt_lm,
        displacement_lps_mm=disp,
        info=info,
    )


# ============================================================================ writing
def write_case(case: SimulatedCase, directory: str | os.PathLike, *, write_ground_truth: bool = True) -> Path:
    """Write one case with the file names of :data:`CASE_FILES` into ``directory``.

    Images are int16 (intensities are about 0..1000). Landmarks are Slicer .fcsv in LPS.
    """
    from .io import write_displacement, write_image  # lazy: io imports ITK

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for side, image in (("source", case.source), ("target", case.target)):
        for c, name in enumerate(("t1", "t2")):
            write_image(directory / CASE_FILES[f"{side}_{name}"], image.channel(c), dtype=np.int16)
    write_fcsv(directory / CASE_FILES["source_landmarks"], case.source_landmarks, coordinate_system="LPS")
    write_fcsv(directory / CASE_FILES["target_landmarks"], case.target_landmarks, coordinate_system="LPS")
    files = {k: v for k, v in CASE_FILES.items() if k not in ("ground_truth", "info")}
    if write_ground_truth:
        if case.displacement_lps_mm is None:
            raise ValueError("the case was simulated without ground_truth; cannot write gt_field")
        write_displacement(directory / CASE_FILES["ground_truth"], case.displacement_lps_mm, case.target.geometry)
        files["ground_truth"] = CASE_FILES["ground_truth"]
    info = {**case.info, "files": files,
            "conventions": ("world LPS mm; target point x corresponds to source point x + u(x) "
                            "(gt_field on the target grid)")}
    (directory / CASE_FILES["info"]).write_text(json.dumps(info, indent=2) + "\n")
    return directory


def _manifest_row(case_id: str) -> list[str]:
    rel = lambda key: f"{case_id}/{CASE_FILES[key]}"  # noqa: E731 - paths relative to the manifest
    return [case_id, f"{rel('source_t1')},{rel('source_t2')}", f"{rel('target_t1')},{rel('target_t2')}",
            rel("target_landmarks"), rel("source_landmarks")]


def _write_manifest(path: Path, case_ids: list[str]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)  # quotes the multi-channel fields, which contain commas
        writer.writerow(MANIFEST_HEADER)
        for case_id in case_ids:
            writer.writerow(_manifest_row(case_id))


def generate_dataset(out_dir: str | os.PathLike, *, n_cases: int = 5, seed: int = 0, spacing: float = 1.0,
                     write_ground_truth: bool = True, n_tissue_points: int = 100, overwrite: bool = False,
                     cache_dir: str | os.PathLike | None = None,
                     progress: Callable[[str], None] | None = None) -> Path:
    """Simulate ``n_cases`` cases (seeds ``seed, seed+1, ...``) into ``out_dir`` with a manifest.

    Everything is written into a temporary directory beside ``out_dir`` and renamed at the end,
    so an interrupted run leaves nothing half-written.

    Parameters
    ----------
    out_dir : path
        Dataset directory; refused when it exists and is not empty, unless ``overwrite``.
    progress : callable, optional
        Called with the case id after each case is written.

    Returns
    -------
    Path
        ``out_dir/manifest.csv``.
    """
    out_dir = Path(out_dir)
    if n_cases < 1:
        raise CombiregError("n_cases must be at least 1")
    prepare_output_dir(out_dir, overwrite=overwrite)
    template, afids = fetch_template(cache_dir)
    brain = estimate_brain_mask(template)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        case_ids = []
        for case_seed in range(seed, seed + n_cases):
            case_id = f"case{case_seed:04d}"
            case = simulate_case(template, afids, seed=case_seed, spacing=spacing, n_tissue_points=n_tissue_points,
                                 brain_mask=brain, ground_truth=write_ground_truth)
            write_case(case, tmp / case_id, write_ground_truth=write_ground_truth)
            case_ids.append(case_id)
            del case
            if progress is not None:
                progress(case_id)
        _write_manifest(tmp / "manifest.csv", case_ids)
        (tmp / "NOTICE.md").write_text(NOTICE)
    return out_dir / "manifest.csv"
