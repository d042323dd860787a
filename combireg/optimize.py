"""Instance optimisation of a dense displacement field (the paper's IO), pyramid and all.

Everything here works on tensors already in target space: the caller resamples the source
onto the target grid in world coordinates first. The result is returned in normalised units;
:mod:`combireg.warp` converts it to LPS mm.

Loss per pyramid level (the paper's Eq. 1, plus an optional inverse-consistency term)::

    L = sum_n w_n * (Sim_n(S o (id + u), T) + Sim_n(T o (id + v), S))
        + lambda * (|grad u|^2 + |grad v|^2) + mu * (|u + v o (id + u)|^2 + |v + u o (id + v)|^2)

With ``(Transform "Diffeomorphic")`` the optimised fields are stationary velocities ``v_f``
(and ``v_b``): ``u = exp(v_f)`` and ``v = exp(v_b)`` (:func:`~combireg.warp.exp_velocity`) in
every term above, the regulariser acts on the velocities, and the returned inverse is
``exp(-v_f)``.

Two optional refinements (parameter keys ``MetricWeighting`` and ``CorrespondenceWeighting``):

* adaptive metric weights: every K iterations ``w_n`` is set proportional to
  ``c_n / |dSim_n/d(u, v)|`` (``c_n`` the configured weights), normalised to sum 1 and
  averaged with the previous weights (:func:`balanced_metric_weights`);
* missing-correspondence weights: every K iterations each direction's similarity is weighted
  voxel-wise by ``exp(-(e / s)^4)`` of its smoothed forward-backward error
  ``e(x) = |u(x) + v(x + u(x))|`` mm (detached), with ``s`` raised where needed so that at most a
  set share of the image is excluded (:func:`correspondence_weight`).
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .errors import CombiregError
from .filters import gaussian_blur, smooth_and_resize
from .geometry import Geometry
from .image import Image
from .losses import gradient_directions, local_stats, regularisers, weighted_similarity
from .params import Settings
from .pyramid import Level, pyramid_levels
from .warp import (
    exp_velocity,
    gradient_scale,
    identity_grid,
    invert_normalised,
    log_displacement,
    max_jacobian_row_sum,
    max_voxel_norm,
    squaring_steps,
    upsample_normalised,
    warp_normalised,
)

__all__ = ["LevelReport", "FieldPair", "optimise_fields", "torch_threads", "normalise_intensities", "level_image",
           "correspondence_weight", "balanced_metric_weights", "image_content", "Adam"]

log = logging.getLogger(__name__)


@dataclass
class LevelReport:
    """What happened on one pyramid level."""

    level: int
    shape_zyx: tuple
    spacing_mm: tuple
    iterations: int
    learning_rate: float
    seconds: float
    loss: float
    terms: dict = field(default_factory=dict)
    loss_history: list = field(default_factory=list)
    metric_weights: dict = field(default_factory=dict)  # metric -> weight at the end of the level
    correspondence: dict | None = None  # the last correspondence-weight update, when enabled
    similarity_gain: float | None = None  # adaptive metric weights: the factor on the mixed similarity
    squaring_steps: int | None = None  # Diffeomorphic: the most squaring steps an iteration used

    def to_dict(self) -> dict:
        extra = {} if self.correspondence is None else {"correspondence": self.correspondence}
        if self.similarity_gain is not None:
            extra["similarity_gain"] = round(self.similarity_gain, 6)
        if self.squaring_steps is not None:
            extra["squaring_steps"] = self.squaring_steps
        return {
            "level": self.level,
            "shape_zyx": list(self.shape_zyx),
            "spacing_mm": [round(s, 4) for s in self.spacing_mm],
            "iterations": self.iterations,
            "learning_rate": self.learning_rate,
            "seconds": round(self.seconds, 3),
            "final_loss": self.loss,
            "final_terms": self.terms,
            "loss_history": [round(v, 6) for v in self.loss_history],
            "metric_weights": {k: round(v, 6) for k, v in self.metric_weights.items()},
            **extra,
        }


@dataclass
class FieldPair:
    """Optimised fields in normalised units on the last level's grid (target space).

    ``forward`` and ``backward`` are displacements whatever the transform model: for
    ``Transform "Diffeomorphic"`` they are ``exp(v_f)`` and ``exp(-v_f)``, and ``velocity`` is
    ``v_f``.
    """

    forward: torch.Tensor  # (1, 3, z, y, x): target point -> source point
    backward: torch.Tensor | None  # (1, 3, z, y, x): source point -> target point (None: not asked for)
    geometry: Geometry  # the grid both fields live on
    levels: list
    #: (1, 1, z, y, x) similarity weight of the forward direction on ``geometry`` (CorrespondenceWeighting)
    correspondence_weight: torch.Tensor | None = None
    correspondence: dict | None = None  # its summary (see :func:`correspondence_weight`)
    #: The transform model for report.json: ``{"transform": ...}``, for "Diffeomorphic" with
    #: ``squaring_steps``, ``first_step_voxels`` and, after an initial field, ``init_log_residual_mm``.
    transform: dict = field(default_factory=lambda: {"transform": "Displacement"})
    velocity: torch.Tensor | None = None  # (1, 3, z, y, x) v_f for "Diffeomorphic"
    #: The (source, target) images (1, C, z, y, x) the last level was optimised on, for checks
    #: after the optimisation (building them again from full resolution costs ~0.4 s for 1 mm).
    level_images: tuple | None = None


def normalise_intensities(image: Image, percentiles: tuple[float, float], *, role: str = "image") -> Image:
    """Map each channel's ``percentiles`` to 0 and 1 and clip to [0, 1].

    Raises
    ------
    CombiregError
        If a channel is constant.
    """
    out = torch.empty_like(image.data, dtype=torch.float32)
    for k in range(image.num_channels):
        values = image.data[k].detach().cpu().numpy()
        lo_v, hi_v = float(values.min()), float(values.max())
        if hi_v - lo_v <= 0:
            raise CombiregError(f"{role} channel {k} is constant ({lo_v:g}); nothing to register")
        lo, hi = np.percentile(values, percentiles)
        if hi - lo <= 1e-12 * max(1.0, abs(hi)):
            lo, hi = lo_v, hi_v  # mostly background: fall back to the full range
        # In place in the output (the same kernels as ((x - lo) / (hi - lo)).clamp(0, 1), without
        # two full-size temporaries). np.percentile selects (np.partition), it does not sort.
        torch.sub(image.data[k], lo, out=out[k])
        out[k].div_(hi - lo).clamp_(0.0, 1.0)
    return Image(out, image.geometry)


def level_image(data: torch.Tensor, factors_xyz, shape_zyx) -> torch.Tensor:
    """Smooth (sigma = factor / 2 voxels, as elastix's pyramids) and resize to a level's shape."""
    sigma_zyx = [0.5 * f if f > 1 else 0.0 for f in reversed(factors_xyz)]
    if tuple(data.shape[2:]) == tuple(shape_zyx) and not any(sigma_zyx):
        return data
    return smooth_and_resize(data, sigma_zyx, shape_zyx)


#: Below this many voxels a level runs on one thread: torch's intra-op threads cost more than
#: they save on small tensors, and on a busy machine their spin-waiting made a 30^3 test
#: volume 10x slower (measured on 2 cores with another process running).
SINGLE_THREAD_VOXELS = 200_000


@contextlib.contextmanager
def torch_threads(count: int):
    """Run a block with ``count`` torch intra-op threads (at least 1), restoring the previous number."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _ic_residual(first: torch.Tensor, second: torch.Tensor, grid: torch.Tensor, half_extent: torch.Tensor) -> torch.Tensor:
    """Mean squared |first + second o (id + first)| in mm (zero for exact inverses)."""
    residual = first + warp_normalised(second, first, grid)
    return ((residual * half_extent.view(1, 3, 1, 1, 1)) ** 2).mean() * 3


def _pair_mask(fixed_mask: torch.Tensor | None, moving_mask: torch.Tensor | None, displacement: torch.Tensor,
               grid: torch.Tensor) -> torch.Tensor | None:
    """Similarity weights of one direction: the fixed side's mask times the moving side's mask
    carried along by the current field (detached: the mask weights the similarity, it is not a
    term the field may optimise by moving the mask)."""
    if moving_mask is None:
        return fixed_mask
    carried = warp_normalised(moving_mask, displacement.detach(), grid)
    return carried if fixed_mask is None else fixed_mask * carried


def _with_weight(mask: torch.Tensor | None, weight: torch.Tensor | None) -> torch.Tensor | None:
    if weight is None:
        return mask
    return weight if mask is None else mask * weight


def _half_extent(geometry: Geometry, device) -> torch.Tensor:
    """Millimetres per normalised unit along each grid axis (x, y, z)."""
    return torch.as_tensor(np.where(geometry.extent_mm > 0, geometry.extent_mm / 2, 1.0), dtype=torch.float32,
                           device=device)


#: Bisection steps when the exclusion cap raises the error scale (relative precision ~1e-6).
_CAP_STEPS = 30
#: w = exp(-(e / s)^p): p = 4 keeps sub-scale errors at weight ~1 (p = 2 took 6 % off every
#: voxel with the 0.5 mm disagreement found everywhere, which used up the exclusion cap).
_WEIGHT_POWER = 4
#: Normalised intensity (0..1, see :func:`normalise_intensities`) above which a voxel has content.
CONTENT_THRESHOLD = 0.05


def image_content(image: torch.Tensor) -> torch.Tensor:
    """Voxels with content: any channel above :data:`CONTENT_THRESHOLD`, dilated by one voxel.

    Where an image is empty background (skull-stripped scans are zero outside the brain) both
    fields are unconstrained and follow the regulariser alone, so their disagreement there says
    nothing about correspondence (measured on data_samples/case0000 without this: 96 % of the
    voxels with weight < 0.5 lay outside the head, and they used up the exclusion cap).
    """
    inside = (image.amax(dim=1, keepdim=True) > CONTENT_THRESHOLD).float()
    return torch.nn.functional.max_pool3d(inside, 3, stride=1, padding=1)


def correspondence_weight(first: torch.Tensor, second: torch.Tensor, geometry: Geometry, *,
                          error_scale_mm: float, smoothing_mm: float, max_exclusion: float,
                          grid: torch.Tensor | None = None,
                          content: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Similarity weight of the direction ``first`` from its forward-backward consistency.

    ``e(x) = |first(x) + second(x + first(x))|`` in mm is zero where the two fields are inverse
    to each other and large where they disagree, typically where one image has content the other
    lacks (a resection cavity, tissue that left the field of view): there the two directions are
    pulled to different, incompatible matches. ``e`` is smoothed with a Gaussian of
    ``smoothing_mm`` and turned into ``w = exp(-(e / s)^4)``: about 1 below ``s / 2`` (two
    independently optimised fields disagree by a fraction of a voxel everywhere; measured
    0.3-0.5 mm at 2 mm voxels), ``exp(-1) = 0.37`` at ``s`` and below 0.01 above ``1.5 s``.
    ``s`` is ``error_scale_mm`` unless that would exclude more than ``max_exclusion``
    (``mean(1 - w) > max_exclusion``); then ``s`` is raised (by bisection) until exactly that
    share is excluded, so ``mean(w) >= 1 - max_exclusion``: the weight can never switch off the
    similarity, and when the errors are large everywhere only the largest are excluded.
    With ``content`` (the fixed image's :func:`image_content`), voxels without content keep
    weight 1 and the means are taken over the voxels with content.

    Parameters
    ----------
    first, second : Tensor, (1, 3, Z, Y, X)
        Normalised fields on ``geometry`` (forward and backward, or backward and forward).
    geometry : Geometry
        Their grid (spacing and extent give the millimetres).
    error_scale_mm, smoothing_mm, max_exclusion : float
        ``s``, the Gaussian's standard deviation (0: none) and the cap (0 < cap <= 1).
    grid : Tensor, (1, Z, Y, X, 3), optional
        :func:`~combireg.warp.identity_grid` of the fields' shape, if already at hand.
    content : Tensor, (1, 1, Z, Y, X), optional
        1 where the image the direction ``first`` is evaluated on has content, else 0.

    Returns
    -------
    weight : Tensor, (1, 1, Z, Y, X)
        Values in (0, 1], detached.
    info : dict
        ``excluded`` (mean(1 - w)), ``below_half`` (fraction of voxels with w < 0.5),
        ``error_scale_mm`` (the ``s`` used), ``capped`` (whether the cap raised it) and
        ``max_error_mm``.
    """
    with torch.no_grad():
        if grid is None:
            grid = identity_grid(first.shape[2:], first.device, first.dtype)
        residual = first + warp_normalised(second, first, grid)
        mm = residual * _half_extent(geometry, first.device).view(1, 3, 1, 1, 1)
        error = torch.linalg.vector_norm(mm, dim=1, keepdim=True)
        if smoothing_mm > 0:
            error = gaussian_blur(error, [smoothing_mm / s for s in reversed(geometry.spacing)])
        counted = error
        if content is not None and bool(content.any()):
            error = error * content
            counted = error[content > 0]
        power = counted ** _WEIGHT_POWER

        def excluded(scale: float) -> float:
            return float((-torch.expm1(-power / scale ** _WEIGHT_POWER)).mean())

        scale = float(error_scale_mm)
        capped = excluded(scale) > max_exclusion
        if capped:
            # 1 - exp(-t) <= t, so mean(1 - w) <= mean(e^p) / s^p: this scale meets the cap.
            bound = (float(power.mean()) / max_exclusion) ** (1.0 / _WEIGHT_POWER)
            low, high = scale, max(scale, bound)
            for _ in range(_CAP_STEPS):
                middle = float(np.sqrt(low * high))
                low, high = (middle, high) if excluded(middle) > max_exclusion else (low, middle)
            scale = high
        weight = torch.exp(-(error / scale) ** _WEIGHT_POWER)
        counted = torch.exp(-power / scale ** _WEIGHT_POWER)
        info = {"excluded": float((1.0 - counted).mean()), "below_half": float((counted < 0.5).float().mean()),
                "error_scale_mm": scale, "capped": bool(capped), "max_error_mm": float(error.max())}
    return weight, info


def balanced_metric_weights(grad_norms, prior, previous=None, *, momentum: float = 0.5) -> tuple[float, ...]:
    """Metric weights that balance the metrics' gradients (GradNorm-like), summing to 1.

    ``w_n`` is proportional to ``prior_n / grad_norms_n``: each metric's weighted gradient
    ``w_n |dSim_n/du|`` is then proportional to ``prior_n``, whatever its natural scale (equal
    priors: every metric moves the field equally much). With ``previous`` weights the result is
    ``momentum * previous + (1 - momentum) * new``, renormalised (a running average that damps
    the noise of single updates). A metric with prior 0 keeps weight 0.

    Parameters
    ----------
    grad_norms : sequence of float
        ``|dSim_n/du|`` per metric (>= 0).
    prior : sequence of float
        The configured weights (>= 0, summing to 1).
    previous : sequence of float, optional
        The current adaptive weights.

    Returns
    -------
    tuple of float
    """
    norms = np.asarray(grad_norms, dtype=np.float64)
    base = np.asarray(prior, dtype=np.float64)
    active = base > 0
    if not np.all(np.isfinite(norms)) or not np.any(norms[active] > 0):
        return tuple(float(v) for v in (previous if previous is not None else prior))
    # A metric with a vanishing gradient would take all the weight: floor at 1e-6 of the largest.
    norms = np.maximum(norms, 1e-6 * norms[active].max())
    new = np.where(active, base / norms, 0.0)
    new /= new.sum()
    if previous is not None:
        new = momentum * np.asarray(previous, dtype=np.float64) + (1.0 - momentum) * new
        new /= new.sum()
    return tuple(float(v) for v in new)


@dataclass
class _MetricWeights:
    """The metric weights in use, carried from level to level."""

    prior: tuple
    adaptive: bool
    interval: int
    current: tuple = ()
    gain: float = 1.0
    updates: int = 0

    def __post_init__(self) -> None:
        self.current = tuple(self.prior)

    @property
    def effective(self) -> tuple:
        """The weights the loss uses: the mix (summing to 1) times the gain."""
        return tuple(self.gain * w for w in self.current)

    def update(self, grad_norms) -> None:
        self.current = balanced_metric_weights(grad_norms, self.prior, self.current if self.updates else None)
        self.updates += 1
        # Why a gain: the balanced mix moves the similarity's gradient magnitude (typically the
        # NCC gradient is 10-30x the MSE one, and the mix then pulls ~10x less), which would
        # silently change what RegularizationWeight means. The gain keeps the summed weighted
        # gradient norms of the configured weights: sum c_n |g_n| = gain * sum w_n |g_n|.
        mixed = sum(w * g for w, g in zip(self.current, grad_norms))
        configured = sum(c * g for c, g in zip(self.prior, grad_norms))
        if mixed > 0 and configured > 0 and np.isfinite(configured / mixed):
            self.gain = float(configured / mixed)


class Adam:
    """Adam with torch's defaults (betas 0.9, 0.999, eps 1e-8), step for step what
    ``torch.optim.Adam`` computes on a CPU (its single-tensor update, the same tensor operations in
    the same order, so the fields are bit-identical).

    Why not ``torch.optim.Adam``: its first ``zero_grad``/``step`` imports ``torch._dynamo``
    (which pulls in dask's ``distributed``), about 1.1 s of CPU at the start of every run.
    """

    def __init__(self, params, lr: float, betas: tuple = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = list(params)
        self.lr, self.betas, self.eps = float(lr), tuple(float(b) for b in betas), float(eps)
        self.steps = [0] * len(self.params)  # per parameter, as torch counts them
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for i, (param, exp_avg, exp_avg_sq) in enumerate(zip(self.params, self.exp_avg, self.exp_avg_sq)):
            grad = param.grad
            if grad is None:
                continue
            # torch counts steps in a float32 tensor and reads them back as a Python float.
            self.steps[i] += 1
            step = float(self.steps[i])
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1 ** step
            bias_correction2 = 1 - beta2 ** step
            step_size = self.lr / bias_correction1
            bias_correction2_sqrt = bias_correction2 ** 0.5
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)


def optimise_fields(source: torch.Tensor, target: torch.Tensor, geometry: Geometry, settings: Settings, *,
                    init_forward: torch.Tensor | None = None, init_backward: torch.Tensor | None = None,
                    target_mask: torch.Tensor | None = None, source_mask: torch.Tensor | None = None,
                    callback: Callable[[dict], None] | None = None,
                    levels: list[Level] | None = None, inverse: bool = True) -> FieldPair:
    """Optimise forward (and backward) fields over the resolution pyramid.

    Parameters
    ----------
    source, target : Tensor, (1, C, Z, Y, X)
        Normalised intensities, both on ``geometry`` (the target grid).
    geometry : Geometry
        The full-resolution target grid.
    settings : Settings
        Validated parameters (metrics, weights, pyramid, iterations, learning rates, ...).
    init_forward, init_backward : Tensor, (1, 3, z, y, x), optional
        Initial normalised displacements on any level of this grid's pyramid (resized as
        needed). For ``Transform "Diffeomorphic"`` they are resized to the first level and turned
        into velocities there (:func:`~combireg.warp.log_displacement`).
    target_mask, source_mask : Tensor, (1, 1, Z, Y, X), optional
        Weights in [0, 1] on ``geometry`` (the source mask already resampled into target
        space) restricting the similarity (cost-function masking): the forward term counts a
        target voxel x with weight ``target_mask(x) * source_mask(x + u(x))``, the backward
        term symmetrically. The regulariser covers the whole grid, so masked-out regions follow
        their surroundings smoothly.
    callback : callable, optional
        Called after every iteration with a dict (level, levels, iteration, iterations, loss).
    levels : list of Level, optional
        The pyramid (default :func:`~combireg.pyramid.pyramid_levels` of ``settings`` on ``geometry``).
    inverse : bool
        Whether ``FieldPair.backward`` is needed when no backward field is optimised (the
        numerical inverse costs 15 warps of the last level); False leaves it None there.

    Returns
    -------
    FieldPair
    """
    torch.manual_seed(settings.seed)
    device = target.device
    forward = init_forward
    backward = init_backward
    pyramid = pyramid_levels(settings, geometry) if levels is None else levels
    levels = []
    if settings.correspondence_weighting and not settings.bidirectional:
        raise CombiregError('CorrespondenceWeighting "true" needs (Bidirectional "true"): it compares the '
                            'forward and backward fields')
    weights = _MetricWeights(tuple(settings.metric_weights), settings.metric_weighting == "adaptive",
                             settings.metric_weighting_interval)
    init_note = None
    if settings.diffeomorphic and forward is not None:
        forward, backward, init_note = _initial_velocities(forward, backward, pyramid[0].geometry, settings)
    for spec in pyramid:
        level, factors, level_geometry = spec.index, spec.factors, spec.geometry
        shape = level_geometry.shape
        src = level_image(source, factors, shape)
        tgt = level_image(target, factors, shape)
        masks = tuple(None if m is None else level_image(m, factors, shape) for m in (target_mask, source_mask))
        zeros = torch.zeros((1, 3) + shape, device=device)
        forward = zeros.clone() if forward is None else upsample_normalised(forward.detach(), shape).clone()
        if settings.bidirectional:
            backward = zeros.clone() if backward is None else upsample_normalised(backward.detach(), shape).clone()
        threads = 1 if level_geometry.num_voxels < SINGLE_THREAD_VOXELS else torch.get_num_threads()
        with torch_threads(threads):
            report = _optimise_level(src, tgt, forward, backward if settings.bidirectional else None,
                                     level_geometry, settings, level, callback, masks, weights, spec.ncc_window)
        levels.append(report)
        log.info("level %d %s: %d iterations in %.1f s, loss %.5f", level, shape, report.iterations,
                 report.seconds, report.loss)
    forward = forward.detach()
    if settings.bidirectional:
        backward = backward.detach()
    velocity, transform = None, {"transform": settings.transform}
    if settings.diffeomorphic:
        # The backward direction's own map (exp(v_b)) is what the correspondence weight compares
        # with; the inverse handed back is exp(-v_f).
        velocity, forward, partner, backward, transform = _exponentials(forward, backward, settings)
        if init_note is not None:
            transform["init_log_residual_mm"] = init_note
    else:
        if not settings.bidirectional:
            # Why: without a backward optimisation the inverse is the numerical inverse of u.
            backward = invert_normalised(forward) if inverse else None
        partner = backward
    last = pyramid[-1].geometry
    weight, info = None, None
    if settings.correspondence_weighting:
        content = image_content(tgt)
        weight, info = correspondence_weight(forward, partner, last, content=content,
                                             **_correspondence_options(settings))
    return FieldPair(forward, backward, last, levels, weight, info, transform, velocity, (src, tgt))


def _initial_velocities(forward: torch.Tensor, backward: torch.Tensor | None, first: Geometry,
                        settings: Settings) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Initial displacements turned into velocities on the first level (``Transform "Diffeomorphic"``).

    Returns the velocities and the mean and largest ``|exp(v) - u|`` in mm per direction.
    """
    half_extent = _half_extent(first, forward.device).view(1, 3, 1, 1, 1)
    velocities, note = [], {}
    for name, displacement in (("forward", forward), ("backward", backward)):
        if displacement is None:
            velocities.append(None)
            continue
        displacement = upsample_normalised(displacement.detach(), first.shape)
        velocity, residual = log_displacement(displacement, settings.squaring_steps)
        error = torch.linalg.vector_norm(residual * half_extent, dim=1)
        note[name] = {"mean": round(float(error.mean()), 6), "max": round(float(error.max()), 6)}
        velocities.append(velocity)
    log.info("initial field(s) as velocities: |exp(v) - u| %s mm", note)
    return velocities[0], velocities[1], note


def _exponentials(velocity: torch.Tensor, backward: torch.Tensor | None, settings: Settings) -> tuple:
    """``v_f``, ``exp(v_f)``, the backward direction's map, ``exp(-v_f)`` and the report's transform entry.

    The backward direction's map is ``exp(v_b)`` when a backward velocity was optimised (the
    correspondence weight compares it with the forward map), else ``exp(-v_f)``.
    """
    with torch.no_grad():
        grid = identity_grid(velocity.shape[2:], velocity.device, velocity.dtype)
        steps = squaring_steps(velocity, settings.squaring_steps)
        forward = exp_velocity(velocity, steps, grid)
        inverse = exp_velocity(-velocity, steps, grid)
        partner = inverse
        if backward is not None:
            partner = exp_velocity(backward, squaring_steps(backward, settings.squaring_steps), grid)
    transform = {"transform": settings.transform, "squaring_steps": steps,
                 "squaring_steps_setting": "automatic" if settings.squaring_steps == 0 else "fixed",
                 "first_step_voxels": round(max_voxel_norm(velocity) / 2 ** steps, 6),
                 "first_step_jacobian_row_sum": round(max_jacobian_row_sum(velocity) / 2 ** steps, 6)}
    return velocity, forward, partner, inverse, transform


def _displacement(field_: torch.Tensor, settings: Settings, grid: torch.Tensor) -> tuple[torch.Tensor, int | None]:
    """The displacement an optimised field stands for (itself, or ``exp(v)``) and the squaring steps."""
    if not settings.diffeomorphic:
        return field_, None
    steps = squaring_steps(field_, settings.squaring_steps)
    return exp_velocity(field_, steps, grid), steps


def _correspondence_options(settings: Settings) -> dict:
    return {"error_scale_mm": settings.correspondence_error_scale, "smoothing_mm": settings.correspondence_smoothing,
            "max_exclusion": settings.correspondence_max_exclusion}


def _optimise_level(src: torch.Tensor, tgt: torch.Tensor, forward: torch.Tensor, backward: torch.Tensor | None,
                    level_geometry: Geometry, settings: Settings, level: int,
                    callback: Callable[[dict], None] | None,
                    masks: tuple = (None, None), weights: _MetricWeights | None = None,
                    window: tuple | int | None = None) -> LevelReport:
    iterations = settings.iterations[level]
    lr = settings.learning_rate[level]
    window = settings.ncc_window[level] if window is None else window
    lam = settings.regularization_weight[level]
    beta = settings.bending_weight[level]
    mu = settings.inverse_consistency_weight if backward is not None else 0.0
    if weights is None:
        weights = _MetricWeights(tuple(settings.metric_weights), False, 1)
    params = [forward] + ([backward] if backward is not None else [])
    for p in params:
        p.requires_grad_(True)
    optimiser = Adam(params, lr=lr)
    grid = identity_grid(src.shape[2:], src.device)
    scale = gradient_scale(level_geometry, src.device)
    half_extent = _half_extent(level_geometry, src.device)
    uses_ncc = "NCC" in settings.metrics
    tgt_mask, src_mask = masks
    tgt_stats = local_stats(tgt, window) if uses_ncc else None
    src_stats = local_stats(src, window) if uses_ncc and backward is not None else None
    # NGF's fixed side, once per level like NCC's moments.
    uses_ngf = "NGF" in settings.metrics
    tgt_gradients = gradient_directions(tgt, level_geometry.spacing) if uses_ngf else None
    src_gradients = gradient_directions(src, level_geometry.spacing) if uses_ngf and backward is not None else None
    correspondence = settings.correspondence_weighting and backward is not None
    weight_f = weight_b = correspondence_info = None
    if correspondence:
        # The forward similarity is counted on the target's voxels, the backward one on the source's.
        content_f, content_b = image_content(tgt), image_content(src)

    def similarity(warped, fixed, stats, gradients, mask, metric_weights, per_metric):
        """The weighted similarity and each metric's value; with ``per_metric`` also the tensors."""
        options = dict(window=window, target_stats=stats, mask=mask, bins=settings.histogram_bins[level],
                       spacing=level_geometry.spacing, target_gradients=gradients)
        if not per_metric:
            total, values = weighted_similarity(warped, fixed, settings.metrics, metric_weights, **options)
            return total, values, None
        tensors = [weighted_similarity(warped, fixed, (name,), (1.0,), **options)[0] for name in settings.metrics]
        return None, {name: float(t.detach()) for name, t in zip(settings.metrics, tensors)}, tensors

    history, terms = [], {}
    start = time.perf_counter()
    loss_value = float("nan")
    most_steps = None
    warm_up = settings.warm_up_iterations
    for it in range(iterations):
        if warm_up:
            # Adam's first steps are about the full step at every voxel whatever its gradient
            # (m / sqrt(v) = sign(g)): rising to it lets the moments settle first.
            optimiser.lr = lr * min(1.0, (it + 1) / warm_up)
        optimiser.zero_grad()
        # The maps: the fields themselves, or exp(v) of the velocities (Transform "Diffeomorphic").
        disp_f, steps = _displacement(forward, settings, grid)
        disp_b = None
        if backward is not None:
            disp_b, steps_b = _displacement(backward, settings, grid)
            steps = None if steps is None else max(steps, steps_b)
        if steps is not None:
            most_steps = steps if most_steps is None else max(most_steps, steps)
        if correspondence and it % settings.correspondence_interval == 0:
            options = _correspondence_options(settings)
            weight_f, correspondence_info = correspondence_weight(disp_f.detach(), disp_b.detach(), level_geometry,
                                                                  grid=grid, content=content_f, **options)
            weight_b, _ = correspondence_weight(disp_b.detach(), disp_f.detach(), level_geometry, grid=grid,
                                                content=content_b, **options)
        rebalance = weights.adaptive and it % weights.interval == 0
        warped_src = warp_normalised(src, disp_f, grid)
        mask_f = _with_weight(_pair_mask(tgt_mask, src_mask, disp_f, grid), weight_f)
        sim_f, terms_f, tensors_f = similarity(warped_src, tgt, tgt_stats, tgt_gradients, mask_f, weights.effective,
                                               rebalance)
        terms = {f"forward_{k}": v for k, v in terms_f.items()}
        tensors_b = None
        if backward is not None:
            warped_tgt = warp_normalised(tgt, disp_b, grid)
            mask_b = _with_weight(_pair_mask(src_mask, tgt_mask, disp_b, grid), weight_b)
            sim_b, terms_b, tensors_b = similarity(warped_tgt, src, src_stats, src_gradients, mask_b,
                                                   weights.effective, rebalance)
            terms.update({f"backward_{k}": v for k, v in terms_b.items()})
        if rebalance:
            # Each metric's gradient with respect to the fields (both directions), then the
            # weighted sum with the new weights (the same graph: no second forward pass).
            per_metric = [t_f + (tensors_b[n] if tensors_b is not None else 0.0) for n, t_f in enumerate(tensors_f)]
            norms = []
            for value, prior in zip(per_metric, weights.prior):
                if prior <= 0:
                    norms.append(0.0)
                    continue
                grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
                norms.append(float(torch.sqrt(sum((g * g).sum() for g in grads if g is not None))))
            weights.update(norms)
            sim = sum(w * value for w, value in zip(weights.effective, per_metric) if w)
        else:
            sim = sim_f + (sim_b if backward is not None else 0.0)
        loss = sim
        if mu > 0:
            ic = _ic_residual(disp_f, disp_b, grid, half_extent) + _ic_residual(disp_b, disp_f, grid, half_extent)
            loss = loss + mu * ic
            terms["inverse_consistency_mm2"] = float(ic.detach())
        penalty, first, second = regularisers(forward, scale, level_geometry.spacing, lam, beta)
        if backward is not None:
            penalty_b, first_b, second_b = regularisers(backward, scale, level_geometry.spacing, lam, beta)
            penalty, first, second = penalty + penalty_b, first + first_b, second + second_b
        loss = loss + penalty
        terms["regularisation"] = first
        if beta > 0:
            terms["bending"] = second
        loss.backward()
        optimiser.step()
        loss_value = float(loss.detach())
        if not np.isfinite(loss_value):
            raise CombiregError(f"optimisation diverged on level {level} (loss {loss_value}); lower LearningRate")
        history.append(loss_value)
        if callback is not None:
            callback({"level": level, "levels": settings.num_levels, "iteration": it + 1,
                      "iterations": iterations, "loss": loss_value})
    for p in params:
        p.requires_grad_(False)
    if correspondence_info is not None:
        correspondence_info = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in correspondence_info.items()}
    return LevelReport(level, tuple(src.shape[2:]), tuple(level_geometry.spacing), iterations, lr,
                       time.perf_counter() - start, loss_value, terms, history,
                       dict(zip(settings.metrics, weights.current)), correspondence_info,
                       weights.gain if weights.adaptive else None, most_steps)
