"""A registration's check of itself, without ground truth ("do no harm").

The optimised loss nearly always goes down, so it says little about whether the images got
closer: a metric that does not fit the data (MSE across sequences, MI with too little
regularisation) can lower its own loss while misaligning anatomy. The check measures the
alignment with a similarity the run did not optimise as such, the windowed squared local
correlation of structure (invariant to each window's contrast and its sign, so it reads T1
against T2 as well as T1 against T1), at the start (identity, or the pre-alignment) and at the
end, and counts folded voxels. A result that is less similar than its start, or that folds
more than :data:`MAX_FOLDING_PERCENT` of its voxels, gets a warning.
"""
from __future__ import annotations

import torch

from .filters import box_filter
from .optimize import CONTENT_THRESHOLD
from .warp import upsample_normalised, warp_normalised

__all__ = ["structural_similarity", "self_check", "MAX_FOLDING_PERCENT", "CHECK_WINDOW"]

#: Folded voxels (Jacobian determinant <= 0) above this share of the target grid are reported.
MAX_FOLDING_PERCENT = 0.1
#: Window of the check's local correlation, in voxels of the level it is measured on.
CHECK_WINDOW = 5
#: The final similarity must not fall below the start's by more than this (numerical noise).
TOLERANCE = 1e-4


def structural_similarity(moving: torch.Tensor, fixed: torch.Tensor, window: int = CHECK_WINDOW) -> float:
    """Mean squared local correlation ``cc^2`` of two images over the voxels with content.

    Parameters
    ----------
    moving, fixed : Tensor, (1, C, Z, Y, X)
        Normalised intensities (0..1) on one grid.
    window : int
        Odd window size in voxels.

    Returns
    -------
    float
        In [0, 1]; higher is more similar. Channels are averaged; voxels where both images are
        empty background do not count.
    """
    c = fixed.shape[1]
    moments = box_filter(torch.cat([moving, fixed, moving * moving, fixed * fixed, moving * fixed], dim=1), window)
    mm, mf, smm, sff, smf = (moments[:, k * c:(k + 1) * c] for k in range(5))
    var_m = (smm - mm * mm).clamp_min(0)
    var_f = (sff - mf * mf).clamp_min(0)
    cc2 = (smf - mm * mf) ** 2 / (var_m * var_f + 1e-8)
    content = ((moving > CONTENT_THRESHOLD) | (fixed > CONTENT_THRESHOLD)).float()
    return float((cc2 * content).sum() / content.sum().clamp_min(1.0))


def self_check(source: torch.Tensor, target: torch.Tensor, forward: torch.Tensor, folding_percent: float, *,
               start: torch.Tensor | None = None, start_name: str = "identity", plain_name: str | None = None) -> dict:
    """Compare the start and the result of a registration, and collect warnings.

    Parameters
    ----------
    source, target : Tensor, (1, C, Z, Y, X)
        Normalised images on one grid (the source already carried by any pre-alignment).
    forward : Tensor, (1, 3, Z, Y, X)
        The optimised forward field on that grid, normalised units.
    folding_percent : float
        Share of target voxels with a non-positive Jacobian determinant, in %.
    start : Tensor, (1, 3, z, y, x), optional
        The field the optimisation started from (an initialisation; any level of this grid's
        pyramid); None: the identity.
    start_name : str
        What the start is ("identity", "pre-alignment", "initial field"), for the messages.
    plain_name : str, optional
        With a ``start``: also hold the result against ``source`` itself, the start without the
        initial field ("identity" or "pre-alignment"), so an initialisation (a DRN's above all)
        that left the result worse than no initialisation is reported too.

    Returns
    -------
    dict
        ``similarity`` (``metric``, ``start``, ``final``, and ``without_initial_field`` with
        ``plain_name``), ``folding_percent`` and ``warnings`` (list of one-line messages; empty
        when the result looks fine).
    """
    with torch.no_grad():
        begin = source if start is None else warp_normalised(source, upsample_normalised(start, source.shape[2:]))
        start_value = structural_similarity(begin, target)
        final = structural_similarity(warp_normalised(source, forward), target)
        plain = structural_similarity(source, target) if start is not None and plain_name is not None else None

    def worse(name: str, value: float) -> list[str]:
        if final >= value - TOLERANCE:
            return []
        return [f"the result looks worse than the {name}: local structural similarity {final:.4f} after against "
                f"{value:.4f} before (check the metric, e.g. MSE alone across sequences, and the regularisation)"]

    warnings = worse(start_name, start_value)
    if folding_percent > MAX_FOLDING_PERCENT:
        warnings.append(f"the forward field folds {folding_percent:.2f} % of the target voxels (Jacobian "
                        f"determinant <= 0; more than {MAX_FOLDING_PERCENT} %): raise RegularizationWeight, or use "
                        f'(Transform "Diffeomorphic") (params/diffeomorphic.txt), which cannot fold')
    similarity = {"metric": f"mean local cc^2, {CHECK_WINDOW}-voxel windows on the finest level",
                  "start": round(start_value, 6), "final": round(final, 6), "start_is": start_name}
    if plain is not None:
        warnings += worse(f"{plain_name} (without the initial field)", plain)
        similarity["without_initial_field"] = round(plain, 6)
    return {"similarity": similarity, "folding_percent": round(float(folding_percent), 6), "warnings": warnings}
