"""Similarity and regularisation terms; stateless functions on (N, C, Z, Y, X) tensors.

All similarities are *losses* (lower is better) and are averaged over channels, so that a
weight means the same for one channel or several. Intensities are expected roughly in [0, 1]
(see :func:`combireg.optimize.normalise_intensities`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .filters import box_filter

__all__ = ["mse", "local_ncc", "global_ncc", "mutual_information", "normalised_gradient_fields",
           "gradient_regulariser", "bending_regulariser", "SIMILARITIES", "weighted_similarity"]

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
    if torch.is_grad_enabled() and (warped.requires_grad or target.requires_grad):
        stacked = torch.cat([warped, warped * warped, warped * target], dim=1)  # autograd through it
    else:
        # The three moment images straight into one buffer, as torch.cat lays them out (without
        # the temporaries and the copy; bit-identical).
        stacked = warped.new_empty((warped.shape[0], 3 * c) + tuple(warped.shape[2:]))
        stacked[:, :c].copy_(warped)
        torch.mul(warped, warped, out=stacked[:, c:2 * c])
        torch.mul(warped, target, out=stacked[:, 2 * c:])
    moments = box_filter(stacked, window)
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
        c = warped.shape[1]
        stacked = warped.new_empty((warped.shape[0], 3 * c) + tuple(warped.shape[2:]))
        g_w, g_ww, g_wt = stacked[:, :c], stacked[:, c:2 * c], stacked[:, 2 * c:]
        torch.div(scale * 2.0 * cov, denom, out=g_wt)
        torch.div(-scale * cov * cov * var_t, denom * denom, out=g_ww)
        torch.sub(-mean_t * g_wt, 2.0 * mean_w * g_ww, out=g_w)
        back = box_filter(stacked, ctx.window, transpose=True)
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


#: Default number of joint-histogram bins per image for :func:`mutual_information` (elastix's
#: ``NumberOfHistogramBins`` default).
MI_BINS = 32


def mutual_information(warped: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, *,
                       bins: int = MI_BINS, **_) -> torch.Tensor:
    """Negative Parzen-window (Mattes) mutual information ``-MI(warped, target)`` in nats.

    Each intensity ``I`` (clamped to [0, 1]) is spread over ``bins`` histogram bins by a cubic
    B-spline Parzen window ``beta3`` (Mattes et al. 2003, as elastix's
    ``AdvancedMattesMutualInformation``): with the bin coordinate ``x = 1 + I (bins - 3)``, bin ``k``
    receives ``beta3(x - k)``. The window spans 4 bins, so ``bins`` also sets the kernel width
    (4 / (bins - 3) of the intensity range); bins 0 and ``bins - 1`` only catch the window's tails
    at the ends of the range. The (weighted) joint histogram over all voxels::

        p(k, l) = sum_i m_i beta3(x_i - k) beta3(y_i - l) / sum_i m_i

    (x from ``warped``, y from ``target``, m the voxel weight) gives::

        MI = H(A) + H(B) - H(A, B) = sum_kl p(k, l) log(p(k, l) / (p_A(k) p_B(l)))

    and the loss is ``-MI`` (lower is better, as elastix reports it), averaged over channels
    (and batch items). It is 0 for independent images and about ``-H(A)`` for identical ones (a
    little above: the window blurs the joint histogram's diagonal). Like any MI it is unchanged by a monotone (increasing or decreasing)
    remapping of either image's intensities, up to how the remapping moves values between bins.

    Every voxel is used (no sampling, so the value is deterministic): the histogram is built
    sparsely, 16 scatter passes of one value per voxel, so memory is O(voxels), not
    O(voxels * bins) as a dense soft-binning matrix would be.

    Parameters
    ----------
    warped, target : Tensor, (N, C, Z, Y, X)
        Intensities roughly in [0, 1]; values outside are clamped (and get no gradient).
        Gradients flow to ``warped`` only.
    mask : Tensor, (N, 1 or C, Z, Y, X), optional
        Voxel weights >= 0 (a weighted histogram); a voxel with weight 0 does not count.
        Treated as constant (detached), like :func:`local_ncc`'s.
    bins : int
        Histogram bins per image, >= 4.

    Returns
    -------
    Tensor, ()
        ``-MI``, between ``-log(bins)`` and 0.
    """
    if bins < 4:
        raise ValueError(f"mutual_information needs bins >= 4 (the B-spline window spans 4 bins), got {bins}")
    if warped.shape != target.shape:
        raise ValueError(f"warped {tuple(warped.shape)} and target {tuple(target.shape)} differ in shape")
    pairs = warped.shape[0] * warped.shape[1]
    flat_w = warped.reshape(pairs, -1)
    flat_t = target.detach().reshape(pairs, -1).to(warped.dtype)
    if mask is None:
        weight = None
        total = flat_w.new_full((pairs,), float(flat_w.shape[1]))
    else:
        weight = mask.detach().to(warped.dtype).expand_as(warped).reshape(pairs, -1)
        total = weight.sum(dim=1).clamp_min(1e-12)
    # The target does not move: its bins and window weights enter the histogram as constants.
    first_t, weights_t = _parzen_bins(flat_t, bins)
    if weight is not None:
        weights_t = weights_t * weight.unsqueeze(0)
    offsets = torch.arange(pairs, device=warped.device).unsqueeze(1) * (bins * bins)
    base_t = offsets + first_t  # flat index of the target's first bin in each pair's histogram
    joint = _JointHistogram.apply(flat_w, base_t, weights_t, bins).view(pairs, bins, bins)
    p = joint / total.view(pairs, 1, 1)
    # MI = sum p log p - sum p_A log p_A - sum p_B log p_B (the entropies with their signs).
    mi = _plogp(p).sum((1, 2)) - _plogp(p.sum(2)).sum(1) - _plogp(p.sum(1)).sum(1)
    return -mi.mean()


def _plogp(p: torch.Tensor) -> torch.Tensor:
    # Why the clamp, not xlogy: xlogy(p, p)'s gradient is nan at empty bins (0/0); here an empty
    # bin contributes 0 and a finite gradient that every voxel's weight for that bin (0) cancels.
    return p * torch.log(p.clamp_min(1e-30 if p.dtype == torch.float64 else 1e-20))


def _parzen_bins(values: torch.Tensor, bins: int, *, derivative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cubic B-spline Parzen window of intensities ``values`` over ``bins`` bins.

    Returns the first of the 4 bins each value touches (long, same shape as ``values``) and the
    window's weights for those 4 bins, (4, ...), or with ``derivative`` the weights' derivatives
    with respect to the *intensity* (only one of the two: the backward pass needs no weights).
    """
    x = 1.0 + values.clamp(0.0, 1.0) * (bins - 3)
    # Why the clamp at bins - 3: at I = 1 (x = bins - 2) the window then covers bins
    # bins - 4 .. bins - 1 with fraction 1 instead of reaching a bin past the end with weight 0.
    lower = torch.floor(x).clamp(1, bins - 3)
    t = x - lower
    s = 1.0 - t
    t2 = t * t
    first = lower.long() - 1
    if derivative:
        # d beta / dI = d beta / dt * dx / dI; clamped values have no intensity derivative.
        inside = ((values >= 0.0) & (values <= 1.0)).to(values.dtype) * (bins - 3)
        return first, torch.stack([-0.5 * s * s, 1.5 * t2 - 2.0 * t, -1.5 * t2 + t + 0.5, 0.5 * t2]) * inside
    return first, torch.stack([s * s * s / 6.0, (3.0 * t2 * t - 6.0 * t2 + 4.0) / 6.0,
                               (-3.0 * t2 * t + 3.0 * t2 + 3.0 * t + 1.0) / 6.0, t2 * t / 6.0])


class _JointHistogram(torch.autograd.Function):
    """Parzen joint histogram of ``warped`` against fixed target bins, with a sparse backward.

    Why hand-written: autograd through 16 scatters would keep 16 index (int64) and 16 value
    tensors per call (~200 MB on a 100^3 volume); the backward here recomputes the window from ``warped``
    and gathers the histogram's gradient at the same 16 bins, O(voxels) memory.

    ``h[a + da, b + db] += w_da(I) * v_db`` for each voxel, ``a``, ``w`` from ``warped``
    (first bin, window weights) and ``b``, ``v`` given (target bins and weights times the voxel
    weight), so ``dL/dI = sum_{da, db} G[a + da, b + db] w'_da(I) v_db``.
    """

    @staticmethod
    def forward(ctx, warped, base_t, weights_t, bins):
        first_w, weights_w = _parzen_bins(warped.detach(), bins)
        base = base_t + first_w * bins
        hist = warped.new_zeros(warped.shape[0] * bins * bins)
        for da in range(4):
            for db in range(4):
                hist.index_add_(0, (base + (da * bins + db)).view(-1), (weights_w[da] * weights_t[db]).view(-1))
        ctx.save_for_backward(warped, base_t, weights_t)
        ctx.bins = bins
        return hist

    @staticmethod
    def backward(ctx, grad_hist):
        warped, base_t, weights_t = ctx.saved_tensors
        bins = ctx.bins
        first_w, slopes_w = _parzen_bins(warped, bins, derivative=True)
        base = base_t + first_w * bins
        grad_hist = grad_hist.contiguous()
        grad = torch.zeros_like(warped)
        for da in range(4):
            inner = torch.zeros_like(warped)
            for db in range(4):
                inner += grad_hist.take(base + (da * bins + db)) * weights_t[db]
            grad += inner * slopes_w[da]
        return grad, None, None, None


# ------------------------------------------------------------------------------ gradient fields
#: NGF's edge scale: a gradient weaker than this fraction of the image's mean gradient magnitude
#: counts as noise, not as an edge direction (Haber and Modersitzki's epsilon, made relative so
#: it needs no intensity units). Development cross-sequence pairs (seeds 200-202, T1/T2 and
#: T1/FLAIR, MSE+NCC+NGF at 0.34/0.33/0.33): 0.25 gave 1.73 mm, 0.5 1.74 mm with fewer folding
#: warnings, 1.0 1.79 mm.
NGF_EDGE_FRACTION = 0.5


def _half_steps(spacing) -> tuple[float, float, float]:
    """Central-difference factors ``1 / (2 h)`` per tensor axis (z, y, x); ``spacing`` is ITK's (x, y, z)."""
    if spacing is None:
        return 0.5, 0.5, 0.5
    sx, sy, sz = (float(s) for s in spacing)
    if min(sx, sy, sz) <= 0:
        raise ValueError(f"spacing must be positive, got {tuple(spacing)}")
    return 0.5 / sz, 0.5 / sy, 0.5 / sx


def _differences(image: torch.Tensor) -> list[torch.Tensor]:
    """``I[k+1] - I[k-1]`` along z, y and x on the interior voxels (not yet divided by ``2 h``)."""
    return [image[:, :, 2:, 1:-1, 1:-1] - image[:, :, :-2, 1:-1, 1:-1],
            image[:, :, 1:-1, 2:, 1:-1] - image[:, :, 1:-1, :-2, 1:-1],
            image[:, :, 1:-1, 1:-1, 2:] - image[:, :, 1:-1, 1:-1, :-2]]


def _relative_squared_norm(diffs: list[torch.Tensor], steps) -> torch.Tensor:
    """``(|g|^2 + eps^2) / f_z^2`` with ``g_k = f_k D_k`` and ``eps = NGF_EDGE_FRACTION * mean |g|``.

    Divided by ``f_z^2`` so that on the usual isotropic grid no pass multiplies by the step.
    """
    ratios = [(f / steps[0]) ** 2 for f in steps]
    squared = diffs[0] * diffs[0]
    squared.addcmul_(diffs[1], diffs[1], value=ratios[1]).addcmul_(diffs[2], diffs[2], value=ratios[2])
    eps = NGF_EDGE_FRACTION * squared.sqrt().mean(dim=(2, 3, 4), keepdim=True)
    return squared.add_(eps * eps)


def gradient_directions(image: torch.Tensor, spacing=None) -> tuple:
    """The fixed image's half of :func:`normalised_gradient_fields`, computed once per level.

    Returns
    -------
    tuple
        For ``target_gradients`` (its contents are an implementation detail): the gradient on
        the interior voxels in intensity per mm, each component times ``1 / (2 h)``, and
        ``|gradient|^2 + eps^2``.
    """
    steps = _half_steps(spacing)
    with torch.no_grad():
        diffs = _differences(image.detach())
        squared_norm = _relative_squared_norm(diffs, steps).mul_(steps[0] ** 2)
        return [d.mul_(f * f) for d, f in zip(diffs, steps)], squared_norm


def normalised_gradient_fields(warped: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, *,
                               spacing=None, target_gradients: tuple | None = None, **_) -> torch.Tensor:
    """``1 - mean(cos^2)`` of the angle between the two images' gradients (normalised gradient fields).

    ``cos^2 = (grad I . grad J)^2 / ((|grad I|^2 + eps_I^2) (|grad J|^2 + eps_J^2))`` at every
    interior voxel (Haber and Modersitzki, 2006): 0 where every edge of one image runs parallel
    to an edge of the other, whichever side is brighter. So it aligns a T1 against a T2 or
    FLAIR-like image by their edges, where MSE compares intensities that do not correspond and
    local NCC's window spans several edges. ``eps`` (per image and channel,
    :data:`NGF_EDGE_FRACTION` of its mean gradient magnitude) keeps noise in flat regions from
    counting as edges; it is a constant of the current images, not differentiated.

    Parameters
    ----------
    warped, target : Tensor, (N, C, Z, Y, X)
        Gradients flow to ``warped`` only.
    mask : Tensor, optional
        Voxel weights broadcastable to ``warped``. The border voxels, which have no central
        difference, are left out with or without one.
    spacing : sequence of 3 float, optional
        The grid's spacing in mm, ITK order (x, y, z), so that an anisotropic grid does not tilt
        the gradient directions. Without it, voxel units.
    target_gradients : tuple, optional
        :func:`gradient_directions` of ``target`` with the same ``spacing``; the target does not
        move during optimisation, so its gradient needs computing only once per level.

    Returns
    -------
    Tensor
        Scalar in [0, 1]; channels averaged. On a grid with fewer than 3 voxels along an axis
        (a coarse level of a small or thin image) no voxel has a central difference: the value is
        then the constant 1 (nothing measured) and moves nothing, and the other metrics carry
        that level.
    """
    if warped.dim() != 5:
        raise ValueError(f"NGF needs (N, C, Z, Y, X) tensors, got shape {tuple(warped.shape)}")
    if min(warped.shape[2:]) < 3:
        return warped.new_ones(())
    if target_gradients is None:
        target_gradients = gradient_directions(target, spacing)
    gradient, squared_norm = target_gradients
    weight = None if mask is None else mask.detach().expand_as(warped)[:, :, 1:-1, 1:-1, 1:-1]
    return _NormalisedGradientFields.apply(warped, _half_steps(spacing), squared_norm, weight, *gradient)


class _NormalisedGradientFields(torch.autograd.Function):
    """NGF with a closed-form backward pass (2.4x faster than autograd, and fewer intermediates).

    With ``D_k`` the warped image's central differences, ``f_k = 1 / (2 h_k)``, ``B_k = f_k b_k``
    (``b`` the target's gradient), ``d = sum D_k B_k``, ``n = sum f_k^2 D_k^2 + eps_I^2``,
    ``m = |b|^2 + eps_J^2`` and ``v = d^2 / (n m)``::

        dv/dD_k = 2 d / (n m) (B_k - (d / n) f_k^2 D_k),

    and the adjoint of ``D_k`` scatters each value to the two neighbours it was taken from.
    ``n`` is kept divided by ``f_z^2`` (``n_z``), which spares a pass on isotropic grids.
    """

    @staticmethod
    def forward(ctx, warped, steps, m, weight, b0, b1, b2):
        diffs = _differences(warped)
        d = diffs[0] * b0
        d.addcmul_(diffs[1], b1).addcmul_(diffs[2], b2)
        n_z = _relative_squared_norm(diffs, steps)
        cos2 = d * d
        cos2.div_(n_z).div_(m)
        ctx.steps, ctx.shape = steps, warped.shape
        ctx.save_for_backward(*diffs, b0, b1, b2, d, n_z, m, weight)
        scale = 1.0 / steps[0] ** 2
        if weight is None:
            ctx.total = float(cos2.numel())
            return 1.0 - cos2.mean() * scale
        ctx.total = weight.sum().clamp_min(1.0)
        return 1.0 - (cos2 * weight).sum() * (scale / ctx.total)

    @staticmethod
    def backward(ctx, grad_output):
        d0, d1, d2, b0, b1, b2, d, n_z, m, weight = ctx.saved_tensors
        f_z = ctx.steps[0]
        q_z = d / n_z  # d / n = q_z / f_z^2
        # dL/dD_k = -(go / total) dv/dD_k = c (B_k - q_z (f_k / f_z)^2 D_k), c = -2 q_z go / (total f_z^2 m).
        c = q_z * (-2.0 * grad_output / (ctx.total * f_z * f_z))
        c.div_(m)
        if weight is not None:
            c.mul_(weight)
        grad = torch.zeros(ctx.shape, dtype=d.dtype, device=d.device)
        for axis, (diff, b) in enumerate(((d0, b0), (d1, b1), (d2, b2))):
            g = q_z * diff
            torch.sub(b, g, alpha=(ctx.steps[axis] / f_z) ** 2, out=g)
            g.mul_(c)
            plus = [slice(None), slice(None)] + [slice(1, -1)] * 3
            minus = list(plus)
            plus[2 + axis], minus[2 + axis] = slice(2, None), slice(None, -2)
            grad[tuple(plus)] += g
            grad[tuple(minus)] -= g
        return grad, None, None, None, None, None, None


SIMILARITIES: dict[str, Callable[..., torch.Tensor]] = {
    "MSE": mse,
    "NCC": local_ncc,
    "GlobalNCC": global_ncc,
    "MI": mutual_information,
    "NGF": normalised_gradient_fields,
}


def weighted_similarity(warped: torch.Tensor, target: torch.Tensor, metrics: Sequence[str],
                        weights: Sequence[float], *, window: int, target_stats=None,
                        mask: torch.Tensor | None = None, bins: int = MI_BINS,
                        spacing=None, target_gradients=None) -> tuple[torch.Tensor, dict]:
    """``sum_n w_n * Sim_n(warped, target)``; also returns each term's value (floats) by name.

    ``window`` and ``target_stats`` are for local NCC, ``bins`` for MI, ``spacing`` (the grid's,
    mm, ITK order) and ``target_gradients`` for NGF; each term ignores the others.
    """
    total = warped.new_zeros(())
    terms = {}
    for name, weight in zip(metrics, weights):
        value = SIMILARITIES[name](warped, target, mask, window=window, target_stats=target_stats, bins=bins,
                                   spacing=spacing, target_gradients=target_gradients)
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
    return regularisers(displacement, scale, None, 1.0, 0.0)[0]


def bending_regulariser(displacement: torch.Tensor, scale: torch.Tensor, spacing) -> torch.Tensor:
    """Mean squared second derivatives of a displacement field along each grid axis.

    ``sum_a sum_c mean((d^2 u_c / dx_a^2)^2)`` in 1 / mm^2: the diagonal of the Hessian's
    bending energy. The mixed derivatives are left out: with them (beta 0.5, 1 and 2), measured on
    the varied development pairs, the default was less accurate than before it had a bending term
    (1.12-1.16 against 1.09 mm), most across sequences. It is zero for every affine field, so unlike :func:`gradient_regulariser` it
    does not resist a large, smooth compression or expansion (a tumour's mass effect, a cavity's
    collapse), only bending; elastix's B-spline baseline uses a bending penalty for the same reason.

    Parameters
    ----------
    displacement : Tensor, (N, 3, Z, Y, X)
        Components ordered (x, y, z), in the units ``scale`` converts.
    scale : Tensor, (3, 3)
        As for :func:`gradient_regulariser` (:func:`~combireg.warp.gradient_scale`).
    spacing : sequence of 3 float
        Grid spacing (x, y, z) in mm: a second difference along axis a is divided by ``spacing_a``
        once more.

    Returns
    -------
    Tensor, ()
    """
    return regularisers(displacement, scale, spacing, 0.0, 1.0)[0]


def regularisers(displacement: torch.Tensor, scale: torch.Tensor, spacing, first_weight: float,
                 second_weight: float) -> tuple[torch.Tensor, float, float]:
    """``lambda * |grad u|^2 + beta * bending`` in one pass, and the two terms' values.

    The second differences are differences of the first ones, and one adjoint difference per
    axis carries both terms' gradients back: 18 ms per iteration for both on a 97 x 115 x 97
    field with two threads, against 17 ms for the first-order term alone before.

    Parameters
    ----------
    displacement, scale
        As for :func:`gradient_regulariser`.
    spacing : sequence of 3 float or None
        As for :func:`bending_regulariser`; None when ``second_weight`` is 0.
    first_weight, second_weight : float
        lambda of :func:`gradient_regulariser` and beta of :func:`bending_regulariser`.

    Returns
    -------
    tuple
        The weighted sum (differentiable), then the unweighted values of the two terms (floats).
    """
    values = displacement.new_zeros(2)
    total = _Regularisers.apply(displacement, scale.to(displacement),
                                None if spacing is None else tuple(float(v) for v in spacing),
                                float(first_weight), float(second_weight), values)
    first, second = values.tolist()
    return total, first, second


_AXIS_DIMS = (4, 3, 2)  # grid axes x, y, z are the last, middle and first spatial dims


def _weighted_squares(diff: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``3 * sum_c weights[c] * mean(diff_c^2)`` through per-component norms: a weighted copy of
    ``diff`` made the first-order term take 17 instead of 11.7 ms on a 97 x 115 x 97 field."""
    if diff.numel() == 0:
        return diff.new_zeros(())
    squares = torch.linalg.vector_norm(diff, dim=(0, 2, 3, 4)).square()
    return (squares * weights).sum() * (3.0 / diff.numel())


class _Regularisers(torch.autograd.Function):
    """``lambda |grad u|^2 + beta |d^2 u / dx_a^2|^2`` with a closed-form backward pass.

    Why: autograd keeps the difference images and runs ~10 elementwise kernels on each; the
    adjoint of a forward difference ``D`` is a backward difference, so the gradient
    ``2 D^T (lambda w1 D u + D'^T (beta w2 D' D u))`` is formed here from the differences the
    value needs (about 3x faster on a CPU than autograd). With beta = 0 and lambda = 1 it does
    exactly the arithmetic of the former first-order-only function.
    """

    @staticmethod
    def forward(ctx, displacement, scale, spacing, first_weight, second_weight, values):
        first_total = displacement.new_zeros(())
        second_total = displacement.new_zeros(())
        grad = torch.zeros_like(displacement) if ctx.needs_input_grad[0] else None
        for axis, dim in enumerate(_AXIS_DIMS):
            n = displacement.shape[dim]
            diff = torch.diff(displacement, dim=dim)
            first_total = first_total + _weighted_squares(diff, scale[axis] ** 2)
            second = None
            if second_weight and n >= 3:
                second = torch.diff(diff, dim=dim)
                weights2 = (scale[axis] / spacing[axis]) ** 2
                second_total = second_total + _weighted_squares(second, weights2)
            if grad is None or n < 2:
                continue
            # d/du of sum(w * (u[i+1] - u[i])^2) = 2w (d[i-1] - d[i]) with d[-1] = d[n-1] = 0
            # In place: the differences are not needed again once the values are summed.
            inner = diff.mul_((scale[axis] ** 2).view(1, 3, 1, 1, 1) * (6.0 / diff.numel()) * first_weight)
            if second is not None:
                second.mul_((weights2 * (6.0 / second.numel() * second_weight)).view(1, 3, 1, 1, 1))
                inner.narrow(dim, 1, n - 2).add_(second)
                inner.narrow(dim, 0, n - 2).sub_(second)
            grad.narrow(dim, 1, n - 1).add_(inner)
            grad.narrow(dim, 0, n - 1).sub_(inner)
        values[0], values[1] = first_total, second_total
        ctx.save_for_backward(grad)
        return first_total * first_weight + second_total * second_weight

    @staticmethod
    def backward(ctx, grad_output):
        grad, = ctx.saved_tensors
        return grad * grad_output, None, None, None, None, None
