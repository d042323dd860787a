"""Similarity and regularisation terms; stateless functions on (N, C, Z, Y, X) tensors.

All similarities are *losses* (lower is better) and are averaged over channels, so that a
weight means the same for one channel or several. Intensities are expected roughly in [0, 1]
(see :func:`combireg.optimize.normalise_intensities`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .filters import box_filter

__all__ = ["mse", "local_ncc", "global_ncc", "gradient_regulariser", "SIMILARITIES", "weighted_similarity"]

# Why so small: with intensities in [0, 1], a smooth region's local variance is ~1e-3..1e-4, so
# var*var is ~1e-6..1e-8; VoxelMorph's 1e-5 would dominate there and reward warps that merely
# raise local variance (measured: 3x larger field error on a smooth phantom).
_EPS = 1e-8


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.expand_as(values)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def mse(warped: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, **_) -> torch.Tensor:
    """Mean squared intensity difference."""
    return _masked_mean((warped - target) ** 2, mask)


def local_ncc(warped: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, *,
              window: int = 7, target_stats: tuple | None = None, **_) -> torch.Tensor:
    """``1 - mean(cc^2)`` of the windowed normalised cross-correlation (as in VoxelMorph).

    ``cc = cov(I, J)^2 / (var(I) var(J) + eps)`` over a cube of ``window`` voxels around each
    voxel, so 0 is perfect local linear agreement and 1 none.

    Parameters
    ----------
    target_stats : tuple of Tensor, optional
        ``(mean_J, var_J)`` of the target precomputed by :func:`local_stats`; the target
        does not move during optimisation, so its local moments need computing only once.
    """
    c = warped.shape[1]
    if target_stats is None:
        target_stats = local_stats(target, window)
    mean_t, var_t = target_stats
    moments = box_filter(torch.cat([warped, warped * warped, warped * target], dim=1), window)
    mean_w, mean_ww, mean_wt = moments[:, :c], moments[:, c : 2 * c], moments[:, 2 * c :]
    cov = mean_wt - mean_w * mean_t
    var_w = (mean_ww - mean_w * mean_w).clamp_min(0)
    cc = cov * cov / (var_w * var_t + _EPS)
    return 1.0 - _masked_mean(cc, mask)


def local_stats(image: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local mean and variance of ``image`` over a ``window`` cube (for :func:`local_ncc`)."""
    c = image.shape[1]
    moments = box_filter(torch.cat([image, image * image], dim=1), window)
    mean = moments[:, :c]
    return mean, (moments[:, c:] - mean * mean).clamp_min(0)


def global_ncc(warped: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, **_) -> torch.Tensor:
    """``1 - NCC`` computed over the whole image (per channel, then averaged)."""
    dims = (2, 3, 4)
    if mask is not None:
        m = mask.expand_as(warped)
        total = m.sum(dim=dims).clamp_min(1.0)
        mw = (warped * m).sum(dim=dims) / total
        mt = (target * m).sum(dim=dims) / total
        dw = (warped - mw[..., None, None, None]) * m
        dt = (target - mt[..., None, None, None]) * m
    else:
        dw = warped - warped.mean(dim=dims, keepdim=True)
        dt = target - target.mean(dim=dims, keepdim=True)
    num = (dw * dt).sum(dim=dims)
    den = torch.sqrt((dw * dw).sum(dim=dims) * (dt * dt).sum(dim=dims) + _EPS)
    return 1.0 - (num / den).mean()


SIMILARITIES: dict[str, Callable[..., torch.Tensor]] = {
    "MSE": mse,
    "NCC": local_ncc,
    "GlobalNCC": global_ncc,
}


def weighted_similarity(warped: torch.Tensor, target: torch.Tensor, metrics: Sequence[str],
                        weights: Sequence[float], *, window: int, target_stats=None,
                        mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """``sum_n w_n * Sim_n(warped, target)``; also returns each term's value (floats) by name."""
    total = warped.new_zeros(())
    terms = {}
    for name, weight in zip(metrics, weights):
        value = SIMILARITIES[name](warped, target, mask, window=window, target_stats=target_stats)
        terms[name] = float(value.detach())
        if weight:
            total = total + weight * value
    return total, terms


def gradient_regulariser(displacement: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mean squared first-order spatial gradient ``|grad u|^2`` of a displacement field.

    Parameters
    ----------
    displacement : Tensor, (N, 3, Z, Y, X)
        Components ordered (x, y, z), in any linear units.
    scale : Tensor, (3, 3)
        ``scale[a, c]`` converts a forward difference of component ``c`` along grid axis ``a``
        (a = x, y, z) into a dimensionless derivative ``d u_c / d x_a`` (physical units over
        physical units), so the value does not depend on the grid resolution.

    Returns
    -------
    Tensor, ()
        Sum over axes and components of the mean squared derivative.
    """
    total = displacement.new_zeros(())
    for axis, dim in enumerate((4, 3, 2)):  # x, y, z grid axes are the last, middle, first dims
        diff = torch.diff(displacement, dim=dim)
        total = total + ((diff * scale[axis].view(1, 3, 1, 1, 1)) ** 2).mean() * 3
    return total
