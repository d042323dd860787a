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

    ``cc^2 = cov(I, J)^2 / (var(I) var(J) + eps)`` over a cube of ``window`` voxels around each
    voxel, so 0 is perfect local linear agreement and 1 none. Gradients flow to ``warped``
    only (the target is fixed during optimisation).

    Parameters
    ----------
    target_stats : tuple of Tensor, optional
        ``(mean_J, var_J)`` of the target precomputed by :func:`local_stats`; the target
        does not move during optimisation, so its local moments need computing only once.
    """
    if target_stats is None:
        target_stats = local_stats(target, window)
    mean_t, var_t = target_stats
    weight = None if mask is None else mask.detach().expand_as(warped)
    return _LocalNCC.apply(warped, target.detach(), mean_t, var_t, window, weight)


def _local_cc2(warped, target, mean_t, var_t, window):
    c = warped.shape[1]
    moments = box_filter(torch.cat([warped, warped * warped, warped * target], dim=1), window)
    mean_w, mean_ww, mean_wt = moments[:, :c], moments[:, c : 2 * c], moments[:, 2 * c :]
    cov = mean_wt - mean_w * mean_t
    var_w = (mean_ww - mean_w * mean_w).clamp_min(0)
    denom = var_w * var_t + _EPS
    return cov * cov / denom, cov, denom, mean_w


class _LocalNCC(torch.autograd.Function):
    """Local NCC loss with a hand-written backward pass.

    Why: autograd through the moment images keeps ~15 full-size intermediates and runs as many
    elementwise kernels; the closed-form gradient needs one box filter of three moment images
    forward and one backward (about 3x faster on a 2-core CPU, and far less memory).

    With ``m = B I``, ``s_II = B I^2``, ``s_IJ = B (I J)`` (B the box filter), ``cov = s_IJ - m mu_J``,
    ``var_I = s_II - m^2``, ``D = var_I var_J + eps`` and ``cc = cov^2 / D``::

        dcc/ds_IJ = 2 cov / D,   dcc/ds_II = -cov^2 var_J / D^2,
        dcc/dm = -mu_J dcc/ds_IJ - 2 m dcc/ds_II,
        dL/dI = B^T g_m + 2 I B^T g_II + J B^T g_IJ.
    """

    @staticmethod
    def forward(ctx, warped, target, mean_t, var_t, window, weight=None):
        cc, cov, denom, mean_w = _local_cc2(warped, target, mean_t, var_t, window)
        ctx.save_for_backward(warped, target, mean_t, var_t, cov, denom, mean_w, weight)
        ctx.window = window
        if weight is None:
            return 1.0 - cc.mean()
        # A weighted mean over voxels (cost-function masking); the weights are constants.
        ctx.total_weight = weight.sum().clamp_min(1.0)
        return 1.0 - (cc * weight).sum() / ctx.total_weight

    @staticmethod
    def backward(ctx, grad_output):
        warped, target, mean_t, var_t, cov, denom, mean_w, weight = ctx.saved_tensors
        if weight is None:
            scale = -grad_output / cov.numel()
        else:
            scale = -grad_output * weight / ctx.total_weight
        g_wt = scale * 2.0 * cov / denom
        g_ww = -scale * cov * cov * var_t / (denom * denom)
        g_w = -mean_t * g_wt - 2.0 * mean_w * g_ww
        c = warped.shape[1]
        back = box_filter(torch.cat([g_w, g_ww, g_wt], dim=1), ctx.window, transpose=True)
        grad = back[:, :c] + 2.0 * warped * back[:, c : 2 * c] + target * back[:, 2 * c :]
        return grad, None, None, None, None, None


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
        Sum over axes and components of the mean (over voxels) squared derivative.
    """
    return _GradientRegulariser.apply(displacement, scale.to(displacement))


_AXIS_DIMS = (4, 3, 2)  # grid axes x, y, z are the last, middle and first spatial dims


class _GradientRegulariser(torch.autograd.Function):
    """|grad u|^2 with a closed-form backward pass (a weighted discrete Laplacian).

    Why: autograd keeps the three difference images and runs ~10 elementwise kernels on them;
    the adjoint of a forward difference is a backward difference, so the gradient is
    ``-2 w (D^T D u)`` computed straight from ``u`` (about 3x faster on a CPU).
    """

    @staticmethod
    def forward(ctx, displacement, scale):
        ctx.save_for_backward(displacement, scale)
        total = displacement.new_zeros(())
        for axis, dim in enumerate(_AXIS_DIMS):
            diff = torch.diff(displacement, dim=dim)
            weights = (scale[axis] ** 2).view(1, 3, 1, 1, 1) * (3.0 / max(diff.numel(), 1))
            total = total + (diff * diff * weights).sum()
        return total

    @staticmethod
    def backward(ctx, grad_output):
        displacement, scale = ctx.saved_tensors
        grad = torch.zeros_like(displacement)
        for axis, dim in enumerate(_AXIS_DIMS):
            n = displacement.shape[dim]
            if n < 2:
                continue
            diff = torch.diff(displacement, dim=dim)
            numel = diff.numel()
            diff = diff * ((scale[axis] ** 2).view(1, 3, 1, 1, 1) * (6.0 / numel))
            # d/du of sum(w * (u[i+1] - u[i])^2) = 2w (d[i-1] - d[i]) with d[-1] = d[n-1] = 0
            grad.narrow(dim, 1, n - 1).add_(diff)
            grad.narrow(dim, 0, n - 1).sub_(diff)
        return grad * grad_output, None
