"""Instance optimisation of a dense displacement field (the paper's IO), pyramid and all.

Everything here works on tensors already in target space: the caller resamples the source
onto the target grid in world coordinates first. The result is returned in normalised units;
:mod:`combireg.warp` converts it to LPS mm.

Loss per pyramid level (the paper's Eq. 1, plus an optional inverse-consistency term)::

    L = sum_n w_n * (Sim_n(S o (id + u), T) + Sim_n(T o (id + v), S))
        + lambda * (|grad u|^2 + |grad v|^2) + mu * (|u + v o (id + u)|^2 + |v + u o (id + v)|^2)
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
from .filters import smooth_and_resize
from .geometry import Geometry
from .image import Image
from .losses import gradient_regulariser, local_stats, weighted_similarity
from .params import Settings
from .warp import gradient_scale, identity_grid, invert_normalised, upsample_normalised, warp_normalised

__all__ = ["LevelReport", "FieldPair", "optimise_fields", "torch_threads", "normalise_intensities", "level_image"]

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

    def to_dict(self) -> dict:
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
        }


@dataclass
class FieldPair:
    """Optimised fields in normalised units on the last level's grid (target space)."""

    forward: torch.Tensor  # (1, 3, z, y, x): target point -> source point
    backward: torch.Tensor  # (1, 3, z, y, x): source point -> target point
    geometry: Geometry  # the grid both fields live on
    levels: list


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
        out[k] = ((image.data[k] - lo) / (hi - lo)).clamp(0.0, 1.0)
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


def optimise_fields(source: torch.Tensor, target: torch.Tensor, geometry: Geometry, settings: Settings, *,
                    init_forward: torch.Tensor | None = None, init_backward: torch.Tensor | None = None,
                    target_mask: torch.Tensor | None = None, source_mask: torch.Tensor | None = None,
                    callback: Callable[[dict], None] | None = None) -> FieldPair:
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
        Initial normalised fields on any level of this grid's pyramid (resized as needed).
    target_mask, source_mask : Tensor, (1, 1, Z, Y, X), optional
        Weights in [0, 1] on ``geometry`` (the source mask already resampled into target
        space) restricting the similarity (cost-function masking): the forward term counts a
        target voxel x with weight ``target_mask(x) * source_mask(x + u(x))``, the backward
        term symmetrically. The regulariser covers the whole grid, so masked-out regions follow
        their surroundings smoothly.
    callback : callable, optional
        Called after every iteration with a dict (level, levels, iteration, iterations, loss).

    Returns
    -------
    FieldPair
    """
    torch.manual_seed(settings.seed)
    device = target.device
    forward = init_forward
    backward = init_backward
    levels = []
    for level in range(settings.num_levels):
        factors = settings.pyramid_schedule[level]
        level_geometry = geometry.shrink(factors)
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
                                     level_geometry, settings, level, callback, masks)
        levels.append(report)
        log.info("level %d %s: %d iterations in %.1f s, loss %.5f", level, shape, report.iterations,
                 report.seconds, report.loss)
    forward = forward.detach()
    if settings.bidirectional:
        backward = backward.detach()
    else:
        # Why: without a backward optimisation the inverse is the numerical inverse of u.
        backward = invert_normalised(forward)
    return FieldPair(forward, backward, geometry.shrink(settings.pyramid_schedule[-1]), levels)


def _optimise_level(src: torch.Tensor, tgt: torch.Tensor, forward: torch.Tensor, backward: torch.Tensor | None,
                    level_geometry: Geometry, settings: Settings, level: int,
                    callback: Callable[[dict], None] | None,
                    masks: tuple = (None, None)) -> LevelReport:
    iterations = settings.iterations[level]
    lr = settings.learning_rate[level]
    window = settings.ncc_window[level]
    lam = settings.regularization_weight[level]
    mu = settings.inverse_consistency_weight if backward is not None else 0.0
    params = [forward] + ([backward] if backward is not None else [])
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(params, lr=lr)
    grid = identity_grid(src.shape[2:], src.device)
    scale = gradient_scale(level_geometry, src.device)
    half_extent = torch.as_tensor(np.where(level_geometry.extent_mm > 0, level_geometry.extent_mm / 2, 1.0),
                                  dtype=torch.float32, device=src.device)
    uses_ncc = "NCC" in settings.metrics
    tgt_mask, src_mask = masks
    tgt_stats = local_stats(tgt, window) if uses_ncc else None
    src_stats = local_stats(src, window) if uses_ncc and backward is not None else None
    history, terms = [], {}
    start = time.perf_counter()
    loss_value = float("nan")
    for it in range(iterations):
        optimiser.zero_grad(set_to_none=True)
        warped_src = warp_normalised(src, forward, grid)
        sim_f, terms_f = weighted_similarity(warped_src, tgt, settings.metrics, settings.metric_weights,
                                             window=window, target_stats=tgt_stats,
                                             mask=_pair_mask(tgt_mask, src_mask, forward, grid))
        reg = gradient_regulariser(forward, scale)
        loss = sim_f
        terms = {f"forward_{k}": v for k, v in terms_f.items()}
        if backward is not None:
            warped_tgt = warp_normalised(tgt, backward, grid)
            sim_b, terms_b = weighted_similarity(warped_tgt, src, settings.metrics, settings.metric_weights,
                                                 window=window, target_stats=src_stats,
                                                 mask=_pair_mask(src_mask, tgt_mask, backward, grid))
            reg = reg + gradient_regulariser(backward, scale)
            loss = loss + sim_b
            terms.update({f"backward_{k}": v for k, v in terms_b.items()})
            if mu > 0:
                ic = _ic_residual(forward, backward, grid, half_extent) + _ic_residual(backward, forward, grid, half_extent)
                loss = loss + mu * ic
                terms["inverse_consistency_mm2"] = float(ic.detach())
        loss = loss + lam * reg
        terms["regularisation"] = float(reg.detach())
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
    return LevelReport(level, tuple(src.shape[2:]), tuple(level_geometry.spacing), iterations, lr,
                       time.perf_counter() - start, loss_value, terms, history)
