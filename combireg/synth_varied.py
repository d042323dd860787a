"""The varied benchmark: one simulated pre-/post-operative anatomy, acquired the ways users bring it.

:mod:`combireg.synth` makes pairs that differ by a tumour's mass effect, a resection's collapse,
gentle random fields and a small rigid motion, all on one 1 mm grid with T1+T2 on both sides.
elastix's default reaches 0.33 mm on them: too easy to tell methods apart. Here one *anatomy*
(a seed) is harder, and it is *acquired* several ways (the *variants*), so a variant's result can
be compared with the 1 mm isotropic one of the same anatomy:

Anatomy (template space ``p``, world LPS mm)
    * pre-op (source): ``psi_pre(p) = p + push(p) + w_pre(p)``, the tumour's mass effect and a
      smooth random field;
    * post-op (target): ``psi_post(p) = T(p + pull(p) + shift(p) + cortex(p) + w_post(p))``:
      the cavity's collapse; a brain shift that sinks the tissue under the craniotomy by 5-10 mm
      and fades over the hemisphere (a Gaussian of 30-45 mm); shorter-wavelength cortical
      displacements (25-60 mm waves, about 2.5 mm); a smooth random field; a rigid motion ``T``;
    * lesion: the tumour (enhancing rim, necrotic core) and its oedema pre-op; post-op a cavity
      up to 30 % larger than the tumour (resected margin: tissue that exists on one side only)
      filled with CSF-like, blood-like or mixed contents, oedema that shrinks or grows, and an
      extra-axial air/fluid pocket under the craniotomy (post-op only).
    * sequences T1, T2 and FLAIR-like. FLAIR is derived honestly from the template's T1/T2: the
      T2 contrast with free fluid suppressed (fluid fraction from the T2 brightness between
      grey matter and CSF), oedema and blood bright, a CSF cavity dark.

Variants (:data:`VARIANTS`)
    ``iso1`` 1 mm isotropic, T1+T2 both sides; ``iso2`` both sides 2 mm (block-averaged from a
    1 mm rendering, so partial volume is real); ``thick`` target in 1 x 1 x 4 mm slices along the
    axis closest to superior-inferior, source 1 mm; ``oblique`` target on a grid with oblique
    direction cosines (8-15 degrees), source on another grid (1.2 mm isotropic); ``pose`` source
    rotated 8-15 degrees about a random axis and shifted 8-15 mm; ``t1_t2`` T1 source against a T2
    target; ``t1_flair`` T1 source against a FLAIR-like target.

Difficulty (:data:`DIFFICULTIES`)
    ``standard`` is what the defaults were developed and tested on; ``hard`` (a held-out tier)
    gives the cortical field 50-110 mm wavelengths and up to about 7.5 mm across the hemisphere
    (drawn 8-10 mm, then scaled to its gradient bound; ``standard``: about 2-3 mm), a wider brain
    shift (Gaussian of 40-60 mm) and stronger gyral-scale motion (about 2.6-3 mm against
    1.4-2.3). The same seed draws the same lesion, shift size, pose and looks at either
    difficulty.

Landmarks: the AFIDs plus dense points on the cortex (grey matter within 5 mm of the brain's
outer surface), in deep grey matter (grey-matter intensity more than 20 mm deep) and in white
matter, away from the lesion and inside every variant's grids, so every variant of an anatomy is
scored on the same template points. Ground truth is exact, as in :mod:`combireg.synth`.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage as ndi

from .deformations import Deformation, FourierField, RadialField, Rigid, rotation_matrix, unit_vectors
from .errors import CombiregError
from .geometry import Geometry
from .image import Image
from .landmarks import Landmarks, write_fcsv
from .outputs import atomic_output_dir, prepare_output_dir
from .synth import (
    _CHUNK,
    _INVERSE_MAX_RESIDUAL_MM,
    _Appearance,
    _acquire,
    _decimated,
    _grid_points,
    _Lesion,
    _normalise_template,
    _oblique_geometry,
    _place_tumour,
    _resampled_geometry,
    _sample,
    _smooth_hull,
    _soft_inside,
    _world_to_index,
    estimate_brain_mask,
)
from .template import NOTICE, fetch_template

__all__ = ["VARIANTS", "CROSS_SEQUENCE_VARIANTS", "DIFFICULTIES", "GaussianShift", "Anatomy", "make_anatomy",
           "generate_varied_set"]

log = logging.getLogger(__name__)

#: The acquisitions of one anatomy; case ids are ``v<seed>_<variant>``.
VARIANTS = ("iso1", "iso2", "thick", "oblique", "pose", "t1_t2", "t1_flair")
#: Variants whose two sides carry different sequences.
CROSS_SEQUENCE_VARIANTS = ("t1_t2", "t1_flair")
SEQUENCES = ("t1", "t2", "flair")
#: Channels (sequence names) of source and target per variant.
_CHANNELS = {"iso1": (("t1", "t2"), ("t1", "t2")), "iso2": (("t1", "t2"), ("t1", "t2")),
             "thick": (("t1", "t2"), ("t1", "t2")), "oblique": (("t1", "t2"), ("t1", "t2")),
             "pose": (("t1", "t2"), ("t1", "t2")), "t1_t2": (("t1",), ("t2",)),
             "t1_flair": (("t1",), ("flair",))}
MANIFEST_HEADER = ("id", "source", "target", "target_landmarks", "source_landmarks")
#: Dense landmarks per group besides the AFIDs (see :func:`_landmark_candidates`).
LANDMARK_COUNTS = {"cortex": 150, "deepgm": 75, "wm": 75, "near": 75}
_LANDMARK_MARGIN_MM = 3.0  # landmarks keep this far from every grid's edge
_THICK_SLICE = 4  # 1 x 1 x 4 mm target

#: How strongly an anatomy deforms. ``standard`` is the set the defaults were developed on (seeds
#: 200-202, test seeds 300-302); ``hard`` carries cortical displacement approaching the issue's
#: "up to about 10 mm across the hemisphere" and stronger gyral-scale motion, the part that a
#: B-spline grid of elastix's default spacing follows least (measured: it raises elastix's and
#: the default's error alike, BENCHMARKS.md). Each amplitude is drawn uniformly from its range
#: (mm), then scaled down until the field's gradient bound holds, so no term folds on its own.
DIFFICULTIES = {
    "standard": {"shift_mm": (8.0, 12.0), "shift_sigma_mm": (30.0, 45.0),
                 "cortex_mm": (2.5, 4.0), "cortex_wavelength_mm": (25.0, 60.0), "cortex_max_gradient": 0.35,
                 "gyral_mm": (2.5, 3.5), "gyral_wavelength_mm": (12.0, 30.0), "gyral_max_gradient": 0.6},
    "hard": {"shift_mm": (8.0, 12.0), "shift_sigma_mm": (40.0, 60.0),
             "cortex_mm": (8.0, 10.0), "cortex_wavelength_mm": (50.0, 110.0), "cortex_max_gradient": 0.6,
             "gyral_mm": (3.5, 5.0), "gyral_wavelength_mm": (12.0, 28.0), "gyral_max_gradient": 0.9},
}


# ============================================================================ deformation terms
@dataclass(frozen=True)
class GaussianShift:
    """Brain shift: ``w(p) = v exp(-|p - c|^2 / (2 s^2))``, a sag of the tissue near ``c``.

    Its largest derivative is ``|v| / s * exp(-1/2)`` (0.2 for 10 mm over 30 mm), far from folding.

    Parameters
    ----------
    centre : ndarray, (3,)
        ``c``, LPS mm (the craniotomy).
    vector : ndarray, (3,)
        ``v``, the shift at ``c`` in mm.
    sigma : float
        ``s`` in mm.
    """

    centre: np.ndarray
    vector: np.ndarray
    sigma: float

    def _gauss(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = p - self.centre
        return d, np.exp(-np.einsum("ni,ni->n", d, d) / (2.0 * self.sigma**2))

    def __call__(self, p: np.ndarray) -> np.ndarray:
        _, g = self._gauss(p)
        return g[:, None] * self.vector

    def jacobian(self, p: np.ndarray) -> np.ndarray:
        """``dw/dp``, (N, 3, 3): ``v (grad g)^T`` with ``grad g = -g (p - c) / s^2``."""
        d, g = self._gauss(p)
        grad = -(g / self.sigma**2)[:, None] * d
        return self.vector[None, :, None] * grad[:, None, :]


@dataclass(frozen=True)
class BrainOnly:
    """A displacement ``w(p) = m(p) f(p)`` confined to the brain by a smooth mask ``m``.

    Why: a brain shift moves the brain but not the skull and scalp, so the brain slides along
    the inside of the skull and opens an extra-axial gap under the craniotomy; a field smooth
    across the whole head (what every registration method assumes) cannot be right on both
    sides of that boundary, which is what makes cortical points hard in real post-operative
    scans. ``m`` is the brain hull smoothed with a Gaussian of a few mm, sampled trilinearly
    together with its world-space gradient (for the Jacobian ``m J_f + f (grad m)^T``).

    Parameters
    ----------
    inner : callable with ``jacobian``
        The displacement ``f`` (e.g. a :class:`GaussianShift`).
    mask : ndarray, (4, z, y, x)
        ``m`` and its world-space gradient (d/dx, d/dy, d/dz in LPS), float32.
    geometry : Geometry
        The grid of ``mask``.
    """

    inner: object
    mask: np.ndarray
    geometry: Geometry

    def _mask(self, p: np.ndarray) -> np.ndarray:
        """(4, N) samples; beyond the grid the border value, so the map stays continuous."""
        coords = _world_to_index(self.geometry, p)[:, ::-1].T
        return np.stack([ndi.map_coordinates(v, coords, order=1, mode="nearest", prefilter=False)
                         for v in self.mask])

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return self._mask(p)[0][:, None] * self.inner(p)

    def jacobian(self, p: np.ndarray) -> np.ndarray:
        m = self._mask(p)
        return m[0][:, None, None] * self.inner.jacobian(p) + self.inner(p)[:, :, None] * m[1:].T[:, None, :]


def _smooth_mask_with_gradient(mask: np.ndarray, geometry: Geometry, sigma_mm: float) -> np.ndarray:
    """(4, z, y, x): a binary mask smoothed by ``sigma_mm`` and its gradient in world (LPS) axes."""
    smooth = ndi.gaussian_filter(mask.astype(np.float32), [sigma_mm / s for s in reversed(geometry.spacing)])
    d_index = np.stack([np.gradient(smooth, axis=2 - a) for a in range(3)])  # d/di, d/dj, d/dk
    to_world = np.linalg.inv(geometry.index_to_world_linear).T  # grad_world = inv(L)^T grad_index
    d_world = np.einsum("wa,azyx->wzyx", to_world, d_index)
    return np.concatenate([smooth[None], d_world]).astype(np.float32)


@dataclass(frozen=True)
class Chain:
    """``psi(p) = outer(inner(p))``: two invertible maps composed, hence invertible.

    Why: a sum of displacement terms can fold where their compressions add up; composing keeps
    each map's own invertibility (a gyral-scale field with strains up to 60 % is safe alone).
    """

    inner: Deformation
    outer: Deformation

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return self.outer(self.inner(p))

    def inverse(self, y: np.ndarray, **options) -> tuple[np.ndarray, np.ndarray]:
        q, residual_outer = self.outer.inverse(y, **options)
        p, residual_inner = self.inner.inverse(q, **options)
        return p, np.maximum(residual_outer, residual_inner)

    @property
    def rigid(self) -> Rigid | None:
        return self.outer.rigid


def _bounded_fourier(rng: np.random.Generator, amplitude: float, wavelength_mm: tuple[float, float],
                     max_gradient: float) -> FourierField:
    """A :class:`FourierField` of ``amplitude`` mm, scaled down until its gradient bound holds."""
    field = FourierField.random(rng, max_amplitude=amplitude, wavelength_mm=wavelength_mm)
    if field.max_gradient > max_gradient:
        field = replace(field, amplitudes=field.amplitudes * (max_gradient / field.max_gradient))
    return field


def _compose_rigid(outer: Rigid, inner: Rigid | None) -> Rigid:
    """``outer o inner`` as one :class:`Rigid` (about ``outer``'s centre)."""
    if inner is None:
        return outer
    rotation = outer.rotation @ inner.rotation
    # Written about outer's centre: T(q) = R (q - c) + c + t, so t = T(c) - c.
    t = outer.apply(inner.apply(outer.centre[None]))[0] - outer.centre
    return Rigid(rotation, outer.centre, t)


# ============================================================================ the anatomy
@dataclass(frozen=True)
class _Looks:
    """Reference intensities (normalised template, ~0..1000) used to paint lesions and FLAIR."""

    wm: np.ndarray  # (T1, T2)
    gm: np.ndarray  # (T1, T2)
    csf: np.ndarray  # (T1, T2)


@dataclass(frozen=True)
class Anatomy:
    """Everything about one simulated patient that does not depend on how it is acquired."""

    seed: int
    template_geometry: Geometry
    norm: np.ndarray  # (2, Z, Y, X) normalised template (T1, T2)
    mask_f: np.ndarray  # (Z, Y, X) smoothed brain mask
    outside_hull_mm: np.ndarray  # (z, y, x) distance outside the brain hull, coarse grid
    coarse_geometry: Geometry
    looks: _Looks
    lesion: _Lesion
    craniotomy: np.ndarray  # (3,) LPS mm, on the brain surface above the tumour
    psi_pre: Deformation
    psi_post: "Chain"
    cavity_scale: float
    cavity_blood: float  # 0 CSF-like .. 1 blood-like contents
    edema_change: float  # post-op oedema relative to pre-op
    air_radius_mm: float
    appearance_pre: _Appearance
    appearance_post: _Appearance
    template_points: np.ndarray  # (N, 3) landmark candidates in template space
    point_labels: tuple
    brain_centre: np.ndarray
    info: dict


def _looks(norm_c: np.ndarray, brain_c: np.ndarray, hull: np.ndarray) -> _Looks:
    t1, t2 = norm_c[0][brain_c], norm_c[1][brain_c]
    white = t1 >= np.median(t1)
    grey = t1 <= np.percentile(t1, 30)
    return _Looks(wm=np.array([np.median(t1[white]), np.median(t2[white])], dtype=np.float32),
                  gm=np.array([np.median(t1[grey]), np.median(t2[grey])], dtype=np.float32),
                  csf=np.array([np.percentile(norm_c[0][hull], 1), np.percentile(norm_c[1][hull], 99)],
                               dtype=np.float32))


def _craniotomy(hull: np.ndarray, geometry: Geometry, tumour_centre: np.ndarray, brain_centre: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
    """Where the surgeon opens the skull: a point of the brain hull's convexity near the tumour.

    Candidates are hull-surface voxels on the tumour's side of the midline and above the axial
    plane 10 mm below the brain's centre (a craniotomy is made over the convexity, not the skull
    base); one of the 20 nearest to the tumour is drawn.
    """
    surface = hull & ~ndi.binary_erosion(hull)
    world = geometry.index_to_world(np.argwhere(surface)[:, ::-1].astype(np.float64))
    side = np.sign(tumour_centre[0] - brain_centre[0]) or 1.0
    convexity = (world[:, 2] > brain_centre[2] - 10.0) & (side * (world[:, 0] - brain_centre[0]) > 10.0)
    world = world[convexity] if convexity.any() else world
    distance = np.linalg.norm(world - tumour_centre, axis=1)
    nearest = np.argsort(distance)[:20]
    return world[nearest[rng.integers(len(nearest))]]


def _landmark_candidates(rng: np.random.Generator, afids: Landmarks, norm: np.ndarray, brain: np.ndarray,
                         hull_depth_mm: np.ndarray, geometry: Geometry, looks: _Looks, counts: dict,
                         lesion_centre: np.ndarray, lesion_extent_mm: float) -> tuple:
    """Template points: AFIDs, cortical grey matter, deep grey matter, white matter and
    peritumoral tissue within 25 mm of the cavity (4x extra each, so that points lost to the
    lesion or to a grid edge can be replaced)."""
    t1 = norm[0]
    grey_hi = 0.5 * (looks.gm[0] + looks.wm[0])
    grey = brain & (t1 < grey_hi)
    zyx = np.indices(brain.shape, sparse=True)
    world = [sum(geometry.index_to_world_linear[w, a] * zyx[2 - a] for a in range(3)) + geometry.origin[w]
             for w in range(3)]
    from_lesion = np.sqrt(sum((world[w] - lesion_centre[w]) ** 2 for w in range(3)))
    groups = {
        "cortex": grey & (hull_depth_mm < 5.0),
        "deepgm": grey & (hull_depth_mm > 20.0),
        "wm": brain & (t1 > looks.wm[0] * 0.95) & (hull_depth_mm > 8.0),
        # BraTS-Reg's landmarks lie around the tumour, where motion and appearance change most.
        "near": brain & (from_lesion > lesion_extent_mm + 2.0) & (from_lesion < lesion_extent_mm + 25.0),
    }
    points, labels = [afids.points_lps_mm], [f"afid_{lab}" for lab in afids.labels]
    for name, mask in groups.items():
        flat = np.flatnonzero(mask)
        take = min(len(flat), 4 * counts[name] + 50)
        if take < counts[name]:
            raise CombiregError(f"template has only {len(flat)} {name} voxels for {counts[name]} landmarks")
        chosen = flat[rng.choice(len(flat), size=take, replace=False)]
        k, j, i = np.unravel_index(chosen, mask.shape)
        index = np.stack([i, j, k], axis=1) + rng.uniform(-0.5, 0.5, size=(take, 3))
        points.append(geometry.index_to_world(index))
        labels += [f"{name}_{n:03d}" for n in range(take)]
    return np.concatenate(points), tuple(labels)


def _strengths(difficulty: str) -> dict:
    """:data:`DIFFICULTIES`'s entry, or a one-line error naming the known ones."""
    if difficulty not in DIFFICULTIES:
        raise CombiregError(f"difficulty {difficulty!r} is not one of {', '.join(DIFFICULTIES)}")
    return DIFFICULTIES[difficulty]


def make_anatomy(template: Image, afids: Landmarks, seed: int, *, brain_mask: np.ndarray | None = None,
                 landmark_counts: dict | None = None, landmarks: bool = True,
                 difficulty: str = "standard") -> Anatomy:
    """Draw one harder pre-/post-operative anatomy from the template (see the module docstring).

    Parameters
    ----------
    template : Image
        Channels (T1, T2).
    afids : Landmarks
        Anatomical fiducials on the template.
    seed : int
        Everything random derives from it.
    brain_mask : ndarray of bool, optional
        See :func:`combireg.synth.estimate_brain_mask`.
    landmark_counts : dict, optional
        Dense landmarks per group (``cortex``, ``deepgm``, ``wm``, ``near``); default :data:`LANDMARK_COUNTS`.
    landmarks : bool
        Draw landmark candidates (False for training pairs, which need none: saves a few seconds).
    difficulty : str
        A key of :data:`DIFFICULTIES`; ``"standard"`` draws exactly what it always drew for a seed.

    Returns
    -------
    Anatomy
    """
    strength = _strengths(difficulty)
    counts = {**LANDMARK_COUNTS, **(landmark_counts or {})}
    geom = template.geometry
    rng_shape, rng_warp, rng_points, rng_look, rng_lesion = (
        np.random.default_rng(s) for s in np.random.SeedSequence([int(seed), 12]).spawn(5))
    norm = _normalise_template(template)
    brain = estimate_brain_mask(template) if brain_mask is None else np.asarray(brain_mask, dtype=bool)
    coarse_geom, coarse = _decimated(geom, [norm[0], norm[1], brain], 2.0)
    norm_c, brain_c = np.stack(coarse[:2]), coarse[2]
    hull = _smooth_hull(brain_c, coarse_geom)
    looks = _looks(norm_c, brain_c, hull)
    _, _, lesion = _place_tumour(rng_shape, norm_c, brain_c, hull, coarse_geom, (10.0, 20.0))
    centre = lesion.centre
    sampling = tuple(reversed(coarse_geom.spacing))
    outside_hull = ndi.distance_transform_edt(~hull, sampling=sampling).astype(np.float32)
    hull_depth_c = ndi.distance_transform_edt(hull, sampling=sampling).astype(np.float32)
    brain_centre = geom.index_to_world(np.argwhere(brain).mean(axis=0)[None, ::-1])[0]
    craniotomy = _craniotomy(hull, coarse_geom, centre, brain_centre, rng_warp)

    radius = lesion.radius
    push = RadialField(centre, radius, min(2.0 * rng_warp.uniform(3.0, 8.0) / radius, 1.6))
    pull = RadialField(centre, radius, -min(2.0 * rng_warp.uniform(3.0, 7.0) / radius, 0.45))
    # Resolving oedema gives back the volume it took: the peritumoral tissue contracts too.
    edema_radius = radius + lesion.edema_width_mm
    edema_pull = RadialField(centre, edema_radius, -min(2.0 * rng_warp.uniform(2.0, 4.0) / edema_radius, 0.2))
    inward = brain_centre - craniotomy
    inward /= np.linalg.norm(inward)
    tilt = rng_warp.normal(size=3) * 0.3
    direction = inward + tilt - inward * np.dot(tilt, inward)
    direction /= np.linalg.norm(direction)
    brain_mask_c = _smooth_mask_with_gradient(hull, coarse_geom, 4.0)
    shift = BrainOnly(GaussianShift(craniotomy, direction * rng_warp.uniform(*strength["shift_mm"]),
                                    float(rng_warp.uniform(*strength["shift_sigma_mm"]))), brain_mask_c, coarse_geom)
    # The brain also moves inside the skull away from the craniotomy (CSF drainage, sagging).
    cortex = BrainOnly(_bounded_fourier(rng_warp, rng_warp.uniform(*strength["cortex_mm"]),
                                        strength["cortex_wavelength_mm"],
                                        max_gradient=strength["cortex_max_gradient"]),
                       brain_mask_c, coarse_geom)
    # Local tissue motion at the scale of gyri, composed first (see Chain): what a smooth
    # registration cannot fully recover between image edges.
    gyral = _bounded_fourier(rng_warp, rng_warp.uniform(*strength["gyral_mm"]), strength["gyral_wavelength_mm"],
                             max_gradient=strength["gyral_max_gradient"])
    noise_pre = _bounded_fourier(rng_warp, rng_warp.uniform(1.0, 2.5), (50.0, 150.0), max_gradient=0.15)
    noise_post = _bounded_fourier(rng_warp, rng_warp.uniform(1.0, 2.5), (50.0, 150.0), max_gradient=0.15)
    angles = rng_warp.uniform(-4.0, 4.0, size=3)
    translation = rng_warp.uniform(-4.0, 4.0, size=3)
    rigid = Rigid(rotation_matrix(angles), brain_centre, translation)
    psi_pre = Deformation((push, noise_pre))
    psi_post = Chain(Deformation((gyral,)), Deformation((pull, edema_pull, shift, cortex, noise_post), rigid))

    cavity_scale = float(rng_lesion.uniform(1.0, 1.3))
    cavity_blood = float(rng_lesion.choice([0.0, 1.0, rng_lesion.uniform(0.3, 0.7)]))
    edema_change = float(rng_lesion.uniform(0.3, 1.5))
    air_radius = float(rng_lesion.uniform(12.0, 25.0))
    appearance_pre = _Appearance(
        bias=FourierField.random(rng_look, max_amplitude=rng_look.uniform(0.03, 0.1), wavelength_mm=(200.0, 400.0),
                                 n_components=1),
        gamma=np.ones(3), noise_sigma=float(rng_look.uniform(15.0, 30.0)))
    appearance_post = _Appearance(
        bias=FourierField.random(rng_look, max_amplitude=rng_look.uniform(0.1, 0.25), wavelength_mm=(150.0, 400.0),
                                 n_components=1),
        gamma=rng_look.uniform(0.75, 1.3, size=3), noise_sigma=float(rng_look.uniform(25.0, 50.0)))

    # Landmark candidates need the hull depth at full resolution: nearest-neighbour up-sampling
    # of the coarse map is accurate to the 2 mm it was computed at, plenty for 5/8/20 mm bands.
    points, labels = np.zeros((0, 3)), ()
    if landmarks:
        hull_depth = _sample([hull_depth_c], coarse_geom, geom.world_grid().reshape(-1, 3))[0].reshape(geom.shape)
        points, labels = _landmark_candidates(rng_points, afids, norm, brain, hull_depth, geom, looks, counts,
                                              centre, lesion.max_extent_mm * cavity_scale)
    info = {
        "seed": int(seed),
        "difficulty": difficulty,
        "tumour": {"centre_template_lps_mm": centre.tolist(), "radius_mm": radius,
                   "max_extent_mm": lesion.max_extent_mm, "cavity_scale": cavity_scale,
                   "cavity_blood_fraction": cavity_blood, "edema_change": edema_change},
        "craniotomy_lps_mm": craniotomy.tolist(),
        "air_pocket_radius_mm": air_radius,
        "mass_effect_peak_mm": push.peak_mm,
        "collapse_peak_mm": pull.peak_mm,
        "edema_resolution_peak_mm": edema_pull.peak_mm,
        "brain_shift_mm": float(np.linalg.norm(shift.inner.vector)),
        "brain_shift_sigma_mm": shift.inner.sigma,
        "cortical_field_max_mm": cortex.inner.max_amplitude,
        "gyral_field_max_mm": gyral.max_amplitude,
        "random_field_max_mm": {"source": noise_pre.max_amplitude, "target": noise_post.max_amplitude},
        "rigid_target": {"rotation_deg_xyz": angles.tolist(), "translation_lps_mm": translation.tolist()},
        "appearance": {"source": {"noise_sigma": appearance_pre.noise_sigma,
                                  "bias_max": appearance_pre.bias.max_amplitude},
                       "target": {"noise_sigma": appearance_post.noise_sigma,
                                  "bias_max": appearance_post.bias.max_amplitude,
                                  "gamma_t1_t2_flair": appearance_post.gamma.tolist()}},
    }
    mask_f = ndi.gaussian_filter(brain.astype(np.float32), sigma=1.0)
    return Anatomy(int(seed), geom, norm, mask_f, outside_hull, coarse_geom, looks, lesion, craniotomy, psi_pre,
                   psi_post, cavity_scale, cavity_blood, edema_change, air_radius, appearance_pre, appearance_post,
                   points, labels, brain_centre, info)


# ============================================================================ rendering
def _flair(t1: np.ndarray, t2: np.ndarray, looks: _Looks) -> np.ndarray:
    """FLAIR-like contrast from T2: free fluid (T2 brighter than grey matter) suppressed."""
    fluid = np.clip((t2 - looks.gm[1]) / max(float(looks.csf[1] - looks.gm[1]), 1e-3), 0.0, 1.0)
    return t2 * (1.0 - 0.9 * fluid)


def _paint(values: np.ndarray, p: np.ndarray, mask: np.ndarray, outside_hull: np.ndarray, anatomy: Anatomy,
           postop: bool) -> np.ndarray:
    """(T1, T2, FLAIR) over the pulled-back template values ``values`` (2, N), lesion included."""
    looks, lesion = anatomy.looks, anatomy.lesion
    t1, t2 = values
    out = np.stack([t1, t2, _flair(t1, t2, looks)])
    rho = lesion.rho(p)
    edge = 0.06
    wm_weight = np.clip((t1 - looks.gm[0]) / max(float(looks.wm[0] - looks.gm[0]), 1e-3), 0.0, 1.0)
    change = anatomy.edema_change if postop else 1.0
    edema = lesion.edema(p, rho, change) * mask * (0.35 + 0.65 * wm_weight) * min(change, 1.0)
    edema_values = (0.75 * looks.wm[0], 0.8 * looks.csf[1], 1.5 * looks.gm[1])
    out[0] *= 1.0 - 0.25 * edema
    for c in (1, 2):
        out[c] += 0.85 * edema * (edema_values[c] - out[c])
    texture = 1.0 + lesion.texture(p)[:, 0]
    if postop:
        inside = _soft_inside(rho / anatomy.cavity_scale, 1.0, edge)
        margin = np.exp(-(((rho / anatomy.cavity_scale - 1.0) * lesion.radius / 1.5) ** 2)) * (1.0 - inside)
        out[0] *= 1.0 + 0.12 * margin
        b = anatomy.cavity_blood
        csf = (looks.csf[0] * (1.0 + 0.3 * (texture - 1.0)), looks.csf[1], 0.1 * looks.csf[1])
        blood = (1.15 * looks.wm[0] * texture, 0.45 * looks.csf[1] * texture, 1.3 * looks.gm[1] * texture)
        lesion_values = [(1.0 - b) * c + b * d for c, d in zip(csf, blood)]
        # Air under the craniotomy: extra-axial (outside the brain hull, within 10 mm of it).
        near = np.exp(-(np.linalg.norm(p - anatomy.craniotomy, axis=1) / anatomy.air_radius_mm) ** 4)
        extra_axial = _soft_inside(np.abs(outside_hull - 5.0), 5.0, 1.0) * (outside_hull > 0.5)
        air = near * extra_axial
        out *= 1.0 - 0.95 * air
    else:
        inside = _soft_inside(rho, 1.0, edge)
        core = _soft_inside(rho, lesion.core_fraction, edge)
        lesion_values = [(core * 0.35 + (1.0 - core) * 1.1) * looks.wm[0] * texture,
                         (core * 0.95 + (1.0 - core) * 0.6) * looks.csf[1] * texture,
                         (core * 0.5 + (1.0 - core) * 1.4) * looks.gm[1] * texture]
    for c in range(3):
        out[c] = inside * lesion_values[c] + (1.0 - inside) * out[c]
    return out


def _render(anatomy: Anatomy, geometry: Geometry, psi: Deformation, *, postop: bool,
            keep_template_points: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Pull the template back through ``psi`` onto ``geometry``: (3, Z, Y, X) noise-free (T1, T2,
    FLAIR), and with ``keep_template_points`` the template point ``psi^{-1}(x)`` of every voxel."""
    n = geometry.num_voxels
    image = np.empty((3, n), dtype=np.float32)
    template_points = np.empty((n, 3), dtype=np.float64) if keep_template_points else None
    worst = 0.0
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        p, residual = psi.inverse(_grid_points(geometry, start, stop), max_iter=100)
        worst = max(worst, float(residual.max()))
        values = _sample([anatomy.norm[0], anatomy.norm[1], anatomy.mask_f], anatomy.template_geometry, p)
        outside = _sample([anatomy.outside_hull_mm], anatomy.coarse_geometry, p)[0]
        image[:, start:stop] = _paint(values[:2], p, values[2], outside, anatomy, postop)
        if template_points is not None:
            template_points[start:stop] = p
    if worst > _INVERSE_MAX_RESIDUAL_MM:
        raise CombiregError(f"seed {anatomy.seed}: inverse deformation did not converge ({worst:.3g} mm)")
    return image.reshape((3,) + geometry.shape), template_points


# ============================================================================ grids of the variants
def _block_average(image: np.ndarray, geometry: Geometry, factors_xyz) -> tuple[np.ndarray, Geometry]:
    """Average ``factors`` voxels per axis (a thicker acquisition with real partial volume)."""
    fx, fy, fz = (int(f) for f in factors_xyz)
    c = image.shape[0]
    nz, ny, nx = (s // f for s, f in zip(geometry.shape, (fz, fy, fx)))
    cropped = image[:, :nz * fz, :ny * fy, :nx * fx]
    out = cropped.reshape(c, nz, fz, ny, fy, nx, fx).mean(axis=(2, 4, 6))
    spacing = np.asarray(geometry.spacing) * (fx, fy, fz)
    # The new voxel centre is the centre of its block.
    origin = geometry.index_to_world(np.array([[(fx - 1) / 2.0, (fy - 1) / 2.0, (fz - 1) / 2.0]]))[0]
    return out.astype(np.float32), Geometry((nx, ny, nz), tuple(origin), tuple(spacing), geometry.direction)


def _superior_axis(geometry: Geometry) -> int:
    """The grid axis (0 = x, 1 = y, 2 = z) closest to the world's superior-inferior axis."""
    return int(np.argmax(np.abs(geometry.direction_matrix[2])))


def _pose_rigid(rng: np.random.Generator, centre: np.ndarray) -> tuple[Rigid, dict]:
    axis = unit_vectors(rng, 1)[0]
    angle = np.deg2rad(rng.uniform(8.0, 15.0))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)  # Rodrigues
    translation = unit_vectors(rng, 1)[0] * rng.uniform(8.0, 15.0)
    return Rigid(rotation, centre, translation), {"angle_deg": float(np.rad2deg(angle)), "axis": axis.tolist(),
                                                  "translation_lps_mm": translation.tolist()}


def _with_rigid(psi: Deformation, rigid: Rigid) -> Deformation:
    return Deformation(psi.fields, _compose_rigid(rigid, psi.rigid))


# ============================================================================ writing
def _acquired(anatomy: Anatomy, image: np.ndarray, geometry: Geometry, postop: bool, seed_key: int) -> np.ndarray:
    """Contrast, bias and noise of the side's scanner on a copy of ``image``."""
    rng = np.random.default_rng(np.random.SeedSequence([anatomy.seed, 99, seed_key]))
    out = image.copy()
    _acquire(out, geometry, anatomy.appearance_post if postop else anatomy.appearance_pre, rng)
    return out


def _case_files(variant: str) -> dict:
    src, tgt = _CHANNELS[variant]
    return {"source": [f"source_{s}.nii.gz" for s in src], "target": [f"target_{s}.nii.gz" for s in tgt]}


def _write_variant(directory: Path, variant: str, source: tuple, target: tuple, landmarks: tuple,
                   ground_truth: np.ndarray | None, info: dict) -> dict:
    from .io import write_displacement, write_image  # lazy: io imports ITK

    directory.mkdir(parents=True, exist_ok=True)
    files = _case_files(variant)
    for (image, geometry), names, sequences in ((source, files["source"], _CHANNELS[variant][0]),
                                                (target, files["target"], _CHANNELS[variant][1])):
        for name, sequence in zip(names, sequences):
            write_image(directory / name, image[SEQUENCES.index(sequence)], geometry, dtype=np.int16)
    src_lm, tgt_lm = landmarks
    write_fcsv(directory / "source_landmarks.fcsv", src_lm, coordinate_system="LPS")
    write_fcsv(directory / "target_landmarks.fcsv", tgt_lm, coordinate_system="LPS")
    if ground_truth is not None:
        write_displacement(directory / "gt_field.nii.gz", ground_truth, target[1])
    distance = np.linalg.norm(tgt_lm.points_lps_mm - src_lm.points_lps_mm, axis=1)
    info = {**info, "variant": variant, "files": files,
            "source_geometry": source[1].to_dict(), "target_geometry": target[1].to_dict(),
            "landmarks": {"total": len(src_lm),
                          "groups": {g: sum(1 for lab in src_lm.labels if lab.startswith(g + "_"))
                                     for g in ("afid", *LANDMARK_COUNTS)},
                          "initial_tre_mm": {"mean": float(distance.mean()),
                                             "p95": float(np.percentile(distance, 95)),
                                             "max": float(distance.max())}},
            "conventions": "world LPS mm; target point x corresponds to source point x + u(x) (gt_field on the "
                           "target grid)"}
    (directory / "case.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _select_landmarks(anatomy: Anatomy, maps: list[tuple[Deformation, Geometry]], counts: dict) -> np.ndarray:
    """Indices of the candidates kept: away from the lesion and the air pocket, inside every grid
    (through the map of that grid's side) by :data:`_LANDMARK_MARGIN_MM`, the first N per group."""
    points = anatomy.template_points
    lesion = anatomy.lesion
    # Points in the cavity have no counterpart; those around it do (they count, as in BraTS-Reg).
    keep = np.linalg.norm(points - lesion.centre, axis=1) > lesion.max_extent_mm * anatomy.cavity_scale + 2.0
    for psi, geometry in maps:
        index = geometry.world_to_index(psi(points))
        margin = _LANDMARK_MARGIN_MM / np.asarray(geometry.spacing)
        keep &= np.all((index >= margin) & (index <= np.asarray(geometry.size) - 1 - margin), axis=1)
    labels = np.asarray(anatomy.point_labels)
    chosen = [np.flatnonzero(keep & np.char.startswith(labels, "afid_"))]
    for group, n in counts.items():
        chosen.append(np.flatnonzero(keep & np.char.startswith(labels, group + "_"))[:n])
        if len(chosen[-1]) < n:
            log.warning("seed %d: only %d of %d %s landmarks could be placed", anatomy.seed, len(chosen[-1]), n, group)
    return np.concatenate(chosen)


def simulate_variants(anatomy: Anatomy, out_dir: Path, variants=VARIANTS, *,
                      landmark_counts: dict | None = None, write_ground_truth: bool = True) -> list[str]:
    """Render and write every variant of one anatomy into ``out_dir/v<seed>_<variant>/``.

    Returns
    -------
    list of str
        The case ids written.
    """
    counts = {**LANDMARK_COUNTS, **(landmark_counts or {})}
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise CombiregError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    seed = anatomy.seed
    rng_grid = np.random.default_rng(np.random.SeedSequence([seed, 77]))
    base = _resampled_geometry(anatomy.template_geometry, 1.0)
    pose, pose_info = _pose_rigid(rng_grid, anatomy.brain_centre)
    oblique_deg = rng_grid.uniform(8.0, 15.0, size=3) * rng_grid.choice([-1.0, 1.0], size=3)
    oblique = _oblique_geometry(base, rotation_matrix(oblique_deg))
    coarse_source = _resampled_geometry(anatomy.template_geometry, 1.2)
    psi_pose = _with_rigid(anatomy.psi_pre, pose)
    thick_axis = _superior_axis(base)
    thick_factors = tuple(_THICK_SLICE if a == thick_axis else 1 for a in range(3))
    thick_geometry = _block_average(np.zeros((1,) + base.shape, np.float32), base, thick_factors)[1]
    iso2_geometry = _block_average(np.zeros((1,) + base.shape, np.float32), base, (2, 2, 2))[1]

    # Landmarks shared by all variants: inside every grid any variant uses.
    maps = [(anatomy.psi_pre, base), (anatomy.psi_post, base), (psi_pose, base), (anatomy.psi_post, oblique),
            (anatomy.psi_pre, coarse_source), (anatomy.psi_post, thick_geometry), (anatomy.psi_pre, iso2_geometry)]
    chosen = _select_landmarks(anatomy, maps, counts)
    points = anatomy.template_points[chosen]
    labels = [anatomy.point_labels[i] for i in chosen]
    target_lm = Landmarks(anatomy.psi_post(points), labels)

    def landmarks(psi_source: Deformation) -> tuple[Landmarks, Landmarks]:
        return Landmarks(psi_source(points), labels), target_lm

    info = {**anatomy.info, "pose_variant": pose_info, "oblique_target_deg_xyz": oblique_deg.tolist(),
            "thick_axis": "xyz"[thick_axis]}
    written = []

    def done(variant: str) -> None:
        written.append(f"v{seed}_{variant}")
        log.info("seed %d: wrote %s", seed, variant)

    need_base = {"iso1", "iso2", "thick", "pose", "t1_t2", "t1_flair"} & set(variants)
    if need_base:
        target_img, target_p = _render(anatomy, base, anatomy.psi_post, postop=True, keep_template_points=True)

        def truth(psi_source: Deformation, geometry: Geometry, template_p: np.ndarray) -> np.ndarray | None:
            if not write_ground_truth:
                return None
            y = geometry.world_grid().reshape(-1, 3)
            return (psi_source(template_p) - y).astype(np.float32).reshape(geometry.shape + (3,))

        if {"iso1", "iso2", "thick", "t1_t2", "t1_flair"} & set(variants):
            source_img, _ = _render(anatomy, base, anatomy.psi_pre, postop=False)
            source_acq = _acquired(anatomy, source_img, base, False, 1)
            target_acq = _acquired(anatomy, target_img, base, True, 1)
            gt = truth(anatomy.psi_pre, base, target_p)
            for variant in ("iso1", "t1_t2", "t1_flair"):
                if variant in variants:
                    _write_variant(out_dir / f"v{seed}_{variant}", variant, (source_acq, base), (target_acq, base),
                                   landmarks(anatomy.psi_pre), gt, info)
                    done(variant)
            del source_acq, target_acq
            if "iso2" in variants:
                src2, geom2 = _block_average(source_img, base, (2, 2, 2))
                tgt2, _ = _block_average(target_img, base, (2, 2, 2))
                gt2 = None
                if write_ground_truth:
                    p2, _ = anatomy.psi_post.inverse(geom2.world_grid().reshape(-1, 3))
                    gt2 = truth(anatomy.psi_pre, geom2, p2)
                _write_variant(out_dir / f"v{seed}_iso2", "iso2", (_acquired(anatomy, src2, geom2, False, 2), geom2),
                               (_acquired(anatomy, tgt2, geom2, True, 2), geom2), landmarks(anatomy.psi_pre), gt2, info)
                done("iso2")
            if "thick" in variants:
                tgt4, geom4 = _block_average(target_img, base, thick_factors)
                gt4 = None
                if write_ground_truth:
                    p4, _ = anatomy.psi_post.inverse(geom4.world_grid().reshape(-1, 3))
                    gt4 = truth(anatomy.psi_pre, geom4, p4)
                _write_variant(out_dir / f"v{seed}_thick", "thick", (_acquired(anatomy, source_img, base, False, 3), base),
                               (_acquired(anatomy, tgt4, geom4, True, 3), geom4), landmarks(anatomy.psi_pre), gt4, info)
                done("thick")
            del source_img
        if "pose" in variants:
            posed, _ = _render(anatomy, base, psi_pose, postop=False)
            _write_variant(out_dir / f"v{seed}_pose", "pose", (_acquired(anatomy, posed, base, False, 4), base),
                           (_acquired(anatomy, target_img, base, True, 4), base), landmarks(psi_pose),
                           truth(psi_pose, base, target_p), {**info})
            done("pose")
            del posed
        del target_img, target_p
    if "oblique" in variants:
        target_img, target_p = _render(anatomy, oblique, anatomy.psi_post, postop=True,
                                       keep_template_points=write_ground_truth)
        source_img, _ = _render(anatomy, coarse_source, anatomy.psi_pre, postop=False)
        gt = None
        if write_ground_truth:
            gt = (anatomy.psi_pre(target_p) - oblique.world_grid().reshape(-1, 3)).astype(np.float32)
            gt = gt.reshape(oblique.shape + (3,))
        _write_variant(out_dir / f"v{seed}_oblique", "oblique",
                       (_acquired(anatomy, source_img, coarse_source, False, 5), coarse_source),
                       (_acquired(anatomy, target_img, oblique, True, 5), oblique), landmarks(anatomy.psi_pre), gt, info)
        done("oblique")
    return written


def training_pair(anatomy: Anatomy, spacing: float) -> tuple[Image, Image]:
    """One (source, target) T1+T2 pair of ``anatomy`` at ``spacing`` mm, for DRN training.

    Half the pairs (by the seed) get the ``pose`` variant's large rigid difference, so a network
    sees both the residual after a pre-alignment and a posed start. Noise, bias and contrast as
    in the benchmark; no landmarks or ground truth.
    """
    import torch

    grid = _resampled_geometry(anatomy.template_geometry, float(spacing))
    rng = np.random.default_rng(np.random.SeedSequence([anatomy.seed, 55]))
    psi_source = anatomy.psi_pre
    if rng.random() < 0.5:
        psi_source = _with_rigid(psi_source, _pose_rigid(rng, anatomy.brain_centre)[0])
    source, _ = _render(anatomy, grid, psi_source, postop=False)
    target, _ = _render(anatomy, grid, anatomy.psi_post, postop=True)
    source = _acquired(anatomy, source, grid, False, 6)[:2]
    target = _acquired(anatomy, target, grid, True, 6)[:2]
    return Image(torch.from_numpy(source), grid), Image(torch.from_numpy(target), grid)


def generate_varied_set(out_dir: str | os.PathLike, seeds, *, variants=VARIANTS, overwrite: bool = False,
                        write_ground_truth: bool = True, landmark_counts: dict | None = None,
                        cache_dir: str | os.PathLike | None = None,
                        progress: Callable[[str], None] | None = None, difficulty: str = "standard") -> Path:
    """Simulate every variant of every seed's anatomy into ``out_dir`` with ``manifest.csv``.

    Written into a temporary folder beside ``out_dir`` and renamed at the end. ``difficulty``
    is a key of :data:`DIFFICULTIES` (recorded in every ``case.json``).

    Returns
    -------
    Path
        ``out_dir/manifest.csv``.
    """
    out_dir = Path(out_dir)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise CombiregError("give at least one seed")
    _strengths(difficulty)  # refused before the template is read
    prepare_output_dir(out_dir, overwrite=overwrite)
    template, afids = fetch_template(cache_dir)
    brain = estimate_brain_mask(template)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        case_ids = []
        for seed in seeds:
            anatomy = make_anatomy(template, afids, seed, brain_mask=brain, landmark_counts=landmark_counts,
                                   difficulty=difficulty)
            for case_id in simulate_variants(anatomy, tmp, variants, landmark_counts=landmark_counts,
                                             write_ground_truth=write_ground_truth):
                case_ids.append(case_id)
                if progress is not None:
                    progress(case_id)
            del anatomy
        write_manifest(tmp / "manifest.csv", tmp, case_ids)
        (tmp / "NOTICE.md").write_text(NOTICE)
    return out_dir / "manifest.csv"


def write_manifest(path: Path, root: Path, case_ids: list[str]) -> None:
    """``id,source,target,target_landmarks,source_landmarks`` for the cases under ``root``."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_HEADER)
        for case_id in case_ids:
            files = json.loads((root / case_id / "case.json").read_text())["files"]
            writer.writerow([case_id, ",".join(f"{case_id}/{f}" for f in files["source"]),
                             ",".join(f"{case_id}/{f}" for f in files["target"]),
                             f"{case_id}/target_landmarks.fcsv", f"{case_id}/source_landmarks.fcsv"])
