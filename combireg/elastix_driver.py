"""The one driver of itk-elastix: running a registration, ITK's threader, elastix's clock.

Every elastix run in combireg goes through :func:`run_elastix` (the pre-alignment of
:mod:`combireg.preprocess` and the B-spline baseline of :mod:`combireg.adapters.elastix`), so
each one logs to a file instead of the console, gets elastix's last log error as a one-line
:class:`~combireg.errors.CombiregError`, and starts with :func:`sync_elastix_clock`.
:class:`PoolThreader` selects ITK's Pool threader around a run (ITK's SyN uses it too), and
:func:`itk_image` makes the ITK image of an array on a :class:`~combireg.geometry.Geometry`.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import CombiregError
from .geometry import Geometry

__all__ = ["ParameterMap", "run_elastix", "sync_elastix_clock", "PoolThreader", "itk_image", "itk_message"]

log = logging.getLogger(__name__)

ParameterMap = dict  # str -> list[str], elastix's own representation


def _itk() -> Any:
    import itk  # lazy: about a second or more to import

    return itk


def itk_image(array: np.ndarray, geometry: Geometry, pixel: type | None = None) -> Any:
    """An ITK image of a (Z, Y, X) array on ``geometry`` (a copy, so numpy may free its buffer).

    Parameters
    ----------
    array : ndarray, (Z, Y, X)
    geometry : Geometry
        Origin, spacing and direction of the image.
    pixel : numpy dtype, optional
        Voxel type of the ITK image (default float32).
    """
    itk = _itk()
    out = itk.image_from_array(np.ascontiguousarray(array, dtype=pixel or np.float32))
    out.SetOrigin([float(v) for v in geometry.origin])
    out.SetSpacing([float(v) for v in geometry.spacing])
    out.SetDirection(itk.matrix_from_array(geometry.direction_matrix.copy()))
    return out


def itk_message(exc: BaseException) -> str:
    """ITK's exception text (file:line, ``ITK ERROR: ...``, continuation lines) as one line."""
    text = str(exc)
    if "ITK ERROR:" in text:
        text = text.split("ITK ERROR:", 1)[1]
    text = " ".join(text.split())
    text = re.sub(r"^(\w+\(0x[0-9a-f]+\): )", "", text)
    text = re.sub(r"^ERROR: ", "", text)
    return text.replace(" Please correct you parameter file!", "") or type(exc).__name__


def _last_log_error(log_path: Path) -> str | None:
    """elastix's last error in its log, on one line (an 'Internal elastix error' says no more).

    The last exception ``Description:`` line is the most specific; else the last ``ERROR`` line.
    """
    try:
        lines = [" ".join(ln.split()) for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    for pattern in (r"^Description:", r"^(ITK )?ERROR\b"):
        for line in reversed(lines):
            if re.match(pattern, line, re.IGNORECASE):
                text = re.sub(r"^Description:\s*", "", line)
                text = re.sub(r"^(ITK )?ERROR:\s*", "", text, flags=re.IGNORECASE)
                text = re.sub(r"^\w+\(0x[0-9a-f]+\):\s*", "", text)
                if text:
                    return text
    return None


class PoolThreader:
    """ITK's Pool threader for elastix (and ITK's SyN) unless ``ITK_GLOBAL_DEFAULT_THREADER`` says otherwise.

    Why: on the 2-core benchmark machine Pool was 11-15 % faster than ITK's default (TBB) for
    elastix (see benchmarks/bench_core.py). The previous global default is restored after.
    """

    def __enter__(self) -> "PoolThreader":
        self.previous = None
        self.name = os.environ.get("ITK_GLOBAL_DEFAULT_THREADER") or "(ITK default)"
        if os.environ.get("ITK_GLOBAL_DEFAULT_THREADER"):
            return self
        mtb = _itk().MultiThreaderBase
        if hasattr(mtb, "SetGlobalDefaultThreader"):
            self.previous = mtb.GetGlobalDefaultThreader()
            mtb.SetGlobalDefaultThreader(mtb.ThreaderTypeFromString("Pool"))
            self.name = "Pool"
        return self

    def __exit__(self, *exc: object) -> bool:
        if self.previous is not None:
            _itk().MultiThreaderBase.SetGlobalDefaultThreader(self.previous)
        return False


def sync_elastix_clock() -> int:
    """Advance itk-elastix's modification-time counter past ITK's own; call before elastix runs.

    Why: the itk-elastix module carries its own copy of ITK's global modification-time counter.
    Images made by the rest of ITK (reading files, N4, ``image_from_array``) are stamped by the
    main counter, which after some work is far ahead of elastix's; elastix's internal pipeline
    then sees its inputs as always newer than its own outputs and re-runs its image pyramids
    (recursive Gaussian smoothing) at every iteration until its own counter catches up.
    Measured: a rigid registration of a 2 mm brain right after N4 took 118 s instead of 1.6 s
    (N4 had advanced the main counter by 38,000, elastix's stood at 91). Each ``Modified()``
    on an elastix object advances elastix's counter by one (about 0.4 us each).

    Returns
    -------
    int
        How many steps elastix's counter was advanced (0 when it was already 1000 ahead).
    """
    itk = _itk()
    probe = itk.Image[itk.F, 3].New()  # an object of the main ITK modules
    probe.Modified()
    clock = itk.ParameterObject.New()  # an object of the elastix module
    clock.Modified()
    # The margin covers the ITK objects made between this call and elastix's Update() (making
    # one ITK object from Python advances ITK's clock by up to about a hundred).
    steps = max(0, int(probe.GetMTime()) - int(clock.GetMTime()) + 1000)
    bump = clock.Modified
    for _ in range(steps):
        bump()
    if steps:
        log.debug("advanced the elastix modification clock by %d", steps)
    return steps


def run_elastix(pairs: Sequence[tuple[Any, Any]], parameter_map: ParameterMap | Sequence[ParameterMap],
                workdir: str | os.PathLike, *, what: str = "elastix", fixed_mask: Any = None,
                moving_mask: Any = None) -> Any:
    """Run an itk-elastix registration in ``workdir`` (logging to a file there) and return it.

    ``pairs`` are (fixed, moving) ITK images, one per metric. ``parameter_map`` is one map or a
    list of maps run in order as one chain (each starts from the transforms before it). The
    caller holds ``workdir`` (a temporary folder) for as long as it reads results: ITK pipelines
    are lazy.

    Raises
    ------
    CombiregError
        ``"<what> failed: <elastix's last log error>"``, not a stack trace.
    """
    itk = _itk()
    parameters = itk.ParameterObject.New()
    for pm in [parameter_map] if isinstance(parameter_map, dict) else parameter_map:
        parameters.AddParameterMap(pm)
    reg = itk.ElastixRegistrationMethod[type(pairs[0][0]), type(pairs[0][1])].New()
    for fixed, moving in pairs:
        reg.AddFixedImage(fixed)
        reg.AddMovingImage(moving)
    if fixed_mask is not None:
        reg.SetFixedMask(fixed_mask)
    if moving_mask is not None:
        reg.SetMovingMask(moving_mask)
    reg.SetParameterObject(parameters)
    reg.SetOutputDirectory(str(workdir))
    reg.SetLogToConsole(False)
    reg.SetLogToFile(True)
    reg.SetLogFileName("elastix.log")
    sync_elastix_clock()
    try:
        reg.Update()
    except Exception as exc:
        detail = _last_log_error(Path(workdir) / "elastix.log") or itk_message(exc)
        raise CombiregError(f"{what} failed: {detail}") from None
    return reg
