"""Separable linear filters on (N, C, Z, Y, X) tensors, written as small matrix products.

Why matrices: on a CPU, a box or Gaussian filter along one axis expressed as a product with
a banded (n, n) matrix runs on BLAS and is 2-3x faster, forward and backward, than
``avg_pool3d``/``conv3d`` (measured on a 97x115x97 volume, 2 cores). It is also exactly
linear and self-adjoint for symmetric kernels, so autograd's backward pass is the same cost.
"""
from __future__ import annotations

import functools
import math

import torch

__all__ = ["box_matrix", "gaussian_matrix", "resize_matrix", "separable_filter", "box_filter", "gaussian_blur", "smooth_and_resize"]


@functools.lru_cache(maxsize=64)
def _box_matrix_cached(n: int, window: int) -> torch.Tensor:
    i = torch.arange(n)
    band = ((i[:, None] - i[None, :]).abs() <= window // 2).to(torch.float32)
    # Row-normalised: near the border the mean is over the voxels that exist, so local
    # statistics (and NCC) are not biased by padding zeros.
    return band / band.sum(dim=1, keepdim=True)


def box_matrix(n: int, window: int, device=None) -> torch.Tensor:
    """(n, n) matrix of a centred moving average of odd length ``window`` (mean over existing voxels)."""
    return _box_matrix_cached(int(n), int(window)).to(device)


@functools.lru_cache(maxsize=64)
def _gaussian_matrix_cached(n: int, sigma: float) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    weights = torch.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    weights[(i[:, None] - i[None, :]).abs() > math.ceil(3 * sigma)] = 0
    # Row-normalised so that a constant image stays constant up to the border
    # (a renormalised, "nearest"-like edge handling that keeps edges unbiased).
    return (weights / weights.sum(dim=1, keepdim=True)).to(torch.float32)


def gaussian_matrix(n: int, sigma: float, device=None) -> torch.Tensor:
    """(n, n) row-normalised Gaussian smoothing matrix with standard deviation ``sigma`` voxels."""
    return _gaussian_matrix_cached(int(n), float(sigma)).to(device)


def separable_filter(x: torch.Tensor, mz: torch.Tensor, my: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
    """Apply ``mz``, ``my``, ``mx`` along Z, Y and X of ``x`` (N, C, Z, Y, X).

    Each matrix ``m`` of shape (n_out, n_in) maps ``out[i] = sum_j m[i, j] * in[j]`` along its
    axis, so non-square matrices resample as they filter.
    """
    n, c = x.shape[:2]
    out = torch.matmul(x, mx.T)  # along X
    out = torch.matmul(my, out)  # along Y: (Y', Y) @ (..., Y, X')
    z_out, y_out, x_out = mz.shape[0], out.shape[3], out.shape[4]
    out = torch.matmul(mz, out.reshape(n, c, out.shape[2], y_out * x_out)).reshape(n, c, z_out, y_out, x_out)
    return out


def box_filter(x: torch.Tensor, window: int | tuple, *, transpose: bool = False) -> torch.Tensor:
    """Local mean over a box of ``window`` voxels (odd; one size, or one per axis z, y, x),
    truncated at the image border.

    ``transpose=True`` applies the adjoint filter (rows are normalised, so near the border the
    filter is not symmetric); used by hand-written backward passes.
    """
    _, _, z, y, xs = x.shape
    windows = (window,) * 3 if isinstance(window, int) else tuple(window)
    mats = [box_matrix(n, w, x.device).to(x.dtype) for n, w in zip((z, y, xs), windows)]
    if transpose:
        mats = [m.T for m in mats]
    return separable_filter(x, *mats)


def gaussian_blur(x: torch.Tensor, sigma_zyx) -> torch.Tensor:
    """Gaussian smoothing with per-axis standard deviations ``(sz, sy, sx)`` in voxels (0 = none)."""
    _, _, z, y, xs = x.shape
    mats = []
    for n, s in zip((z, y, xs), sigma_zyx):
        mats.append(gaussian_matrix(n, s, x.device).to(x.dtype) if s > 0 else torch.eye(n, device=x.device, dtype=x.dtype))
    return separable_filter(x, *mats)


@functools.lru_cache(maxsize=64)
def _resize_matrix_cached(n_in: int, n_out: int, sigma: float) -> torch.Tensor:
    # linear interpolation with the end points fixed (align_corners=True) ...
    pos = torch.linspace(0, n_in - 1, n_out, dtype=torch.float64) if n_out > 1 else torch.zeros(1, dtype=torch.float64)
    lo = pos.floor().clamp(max=max(n_in - 2, 0)).long()
    frac = pos - lo
    interp = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    interp[rows, lo] += 1 - frac
    if n_in > 1:
        interp[rows, lo + 1] += frac
    # ... after Gaussian smoothing: one (n_out, n_in) matrix does both
    if sigma > 0:
        interp = interp @ _gaussian_matrix_cached(n_in, sigma).to(torch.float64)
    return interp.to(torch.float32)


def resize_matrix(n_in: int, n_out: int, sigma: float = 0.0, device=None) -> torch.Tensor:
    """(n_out, n_in) matrix: Gaussian smoothing (``sigma`` voxels) then linear resampling to ``n_out``
    points spanning the same extent (first and last samples fixed)."""
    return _resize_matrix_cached(int(n_in), int(n_out), float(sigma)).to(device)


def smooth_and_resize(x: torch.Tensor, sigma_zyx, shape_zyx) -> torch.Tensor:
    """Gaussian smoothing and trilinear resampling to ``shape_zyx`` in one separable pass.

    Why one pass: smoothing the full-resolution volume first costs n^2 per line per axis; the
    combined (n_out, n_in) matrices cost n_out * n_in (8x less for a shrink factor of 8).
    """
    mats = [resize_matrix(n_in, n_out, s, x.device).to(x.dtype)
            for n_in, n_out, s in zip(x.shape[2:], shape_zyx, sigma_zyx)]
    return separable_filter(x, *mats)
