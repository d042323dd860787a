"""``combireg.register``: the one-call Python API, and its :class:`Result`."""
from __future__ import annotations

import json
import logging
import os
import platform
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch

from . import __version__
from .errors import CombiregError
from .geometry import Geometry
from .image import Image
from .outputs import atomic_output_dir, prepare_output_dir
from .optimize import FieldPair, normalise_intensities, optimise_fields
from .params import ParamMap, Settings, format_parameter_map, load_settings, settings_from_map
from .warp import (
    invert_normalised,
    jacobian_determinant,
    lps_mm_to_normalised,
    normalised_to_lps_mm,
    resample_field,
    resample_image,
    upsample_normalised,
    warp_image,
)

__all__ = ["register", "Result", "write_outputs", "as_image", "estimate_memory_bytes", "available_memory_bytes",
           "prepare_output_dir"]

log = logging.getLogger(__name__)

ImageLike = Union[Image, str, os.PathLike, Sequence[Union[str, os.PathLike]]]

#: Output file names are a contract read by other tools and by ``combireg evaluate``.
FIELD_NAME = "field.nii.gz"
INVERSE_FIELD_NAME = "field_inverse.nii.gz"
PARAMS_NAME = "params.txt"
REPORT_NAME = "report.json"


def warped_name(k: int) -> str:
    return f"warped_{k}.nii.gz"


@dataclass
class Result:
    """What a registration produced.

    Attributes
    ----------
    displacement_lps_mm : ndarray, (Z, Y, X, 3)
        Forward field on the target grid: target point x maps to source point x + u(x).
    target_geometry : Geometry
    inverse_displacement_lps_mm : ndarray, (Z', Y', X', 3)
        Backward field on the source grid: source point y maps to target point y + v(y).
    source_geometry : Geometry
    warped : Image
        Source channels warped into target space, original intensities.
    settings : Settings
    report : dict
    """

    displacement_lps_mm: np.ndarray
    target_geometry: Geometry
    inverse_displacement_lps_mm: np.ndarray
    source_geometry: Geometry
    warped: Image
    settings: Settings
    report: dict = field(default_factory=dict)

    def save(self, outdir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write every output into ``outdir`` atomically (temporary folder beside it, then rename)."""
        params_text = _params_header(self.settings) + format_parameter_map(self.settings.to_parameter_map())
        return write_outputs(outdir, self, params_text, overwrite=overwrite)


def write_outputs(outdir: str | os.PathLike, result, params_text: str, *, overwrite: bool = False) -> Path:
    """Write the output files of a registration method (the contract of ``combireg run``).

    ``result`` has ``displacement_lps_mm``, ``target_geometry``, ``inverse_displacement_lps_mm``,
    ``source_geometry``, ``warped`` and ``report`` (a :class:`Result` or a baseline's result), so
    every method writes the same files the same way. Written whole or not at all.
    """
    from . import io

    with atomic_output_dir(outdir, overwrite=overwrite) as tmp:
        jobs = [(io.write_displacement, tmp / FIELD_NAME, result.displacement_lps_mm, result.target_geometry),
                (io.write_displacement, tmp / INVERSE_FIELD_NAME, result.inverse_displacement_lps_mm,
                 result.source_geometry)]
        jobs += [(io.write_image, tmp / warped_name(k), result.warped.channel(k), None)
                 for k in range(result.warped.num_channels)]
        # Why threads: gzip dominates writing a 1 mm field and zlib releases the GIL, so the
        # files compress in parallel.
        with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
            for future in [pool.submit(fn, path, data, geometry) for fn, path, data, geometry in jobs]:
                future.result()
        (tmp / PARAMS_NAME).write_text(params_text)
        (tmp / REPORT_NAME).write_text(json.dumps(result.report, indent=2, default=_json_default) + "\n")
    return Path(outdir).absolute()


def _params_header(settings: Settings) -> str:
    return (f"// combireg {__version__}: fully resolved parameters of this run (source: {settings.source}).\n"
            f"// `combireg run SRC TGT -p params.txt` reproduces it.\n")


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


# ---------------------------------------------------------------------------------- memory
def available_memory_bytes() -> int:
    """Memory the OS says is available now (MemAvailable), or physical memory as a fallback."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def estimate_memory_bytes(target_geometry: Geometry, source_geometry: Geometry, channels: int,
                          settings: Settings) -> int:
    """An estimate of the peak memory of :func:`register` (bytes), calibrated on 1 mm brains.

    Full-resolution work (images, resampling grids in float64, fields, Jacobian) costs about
    ``120 + 24 C`` bytes per target voxel; each pyramid level keeps about ``10 C + 25`` float32
    values per voxel and direction (the NCC and regulariser backward passes are hand-written,
    so autograd stores little). Measured peaks, 193x229x193 T1+T2: default preset 2.3-2.5 GB
    (estimate 2.4 GB), paper_io (full resolution, bidirectional) 4.4 GB (estimate 4.8 GB).
    """
    n_target = target_geometry.num_voxels
    n_source = source_geometry.num_voxels
    full = n_target * (120 + 24 * channels) + n_source * (40 + 8 * channels)
    directions = 2 if settings.bidirectional else 1
    level_peak = max(target_geometry.shrink(f).num_voxels for f in settings.pyramid_schedule)
    optimisation = level_peak * 4 * (10 * channels + 25) * directions
    return int(full + optimisation + 300e6)  # + interpreter, torch and ITK themselves


# ---------------------------------------------------------------------------------- register
def as_image(value: ImageLike, role: str) -> Image:
    """An :class:`Image` as is, or read from a path, comma-joined paths or a list of channel paths."""
    if isinstance(value, Image):
        return value
    from . import io

    if isinstance(value, (str, os.PathLike)):
        paths = [p for p in str(value).split(",") if p]
    else:
        paths = [str(p) for p in value]
    return io.read_channels(paths, role=role)


def _as_settings(params) -> Settings:
    if params is None or isinstance(params, (str, os.PathLike)):
        return load_settings(params)
    if isinstance(params, Settings):
        return params
    if isinstance(params, dict):
        return settings_from_map(params)
    raise TypeError(f"params must be None, a path, a parameter map or Settings, got {type(params).__name__}")


def _init_fields(init, target: Image, source: Image, settings: Settings, device) -> tuple:
    """Forward/backward normalised fields on the first level's grid from a user field."""
    if init is None:
        return None, None
    from . import io

    if isinstance(init, (str, os.PathLike)):
        init = io.read_displacement(init)
    displacement, geometry = init
    u_mm = resample_field(displacement, geometry, target.geometry)
    forward = lps_mm_to_normalised(u_mm, target.geometry, device)
    first = target.geometry.shrink(settings.pyramid_schedule[0])
    forward = upsample_normalised(forward, first.shape)
    return forward, (invert_normalised(forward) if settings.bidirectional else None)


def register(source: ImageLike, target: ImageLike, params: Settings | ParamMap | str | os.PathLike | None = None,
             init=None, *, device: str = "cpu", callback: Callable[[dict], None] | None = None,
             max_memory_bytes: int | None = None) -> Result:
    """Register ``source`` to ``target`` by instance optimisation of the paper's loss.

    Parameters
    ----------
    source, target : Image, path, comma-separated paths or list of paths
        The two subjects; the same number of channels on both sides. The source may lie on
        another grid or orientation: it is resampled into target space in world coordinates.
    params : Settings, parameter map, path to an elastix-syntax file, or None (defaults)
    init : path to a displacement field, or (displacement_lps_mm, Geometry), optional
        Initial forward field (our convention); the backward field starts as its inverse.
    device : str
        ``"cpu"`` (default) or ``"cuda"``.
    callback : callable, optional
        Receives a dict after every iteration (for progress bars).
    max_memory_bytes : int, optional
        Refuse to start if the estimated peak exceeds this (default: available memory).

    Returns
    -------
    Result

    Raises
    ------
    CombiregError
        Bad input, parameters, a problem too big for memory, or divergence.
    """
    start = time.perf_counter()
    settings = _as_settings(params)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CombiregError("--device cuda requested but no CUDA device is available")
    target_img = as_image(target, "target")
    source_img = as_image(source, "source")
    if source_img.num_channels != target_img.num_channels:
        raise CombiregError(f"source has {source_img.num_channels} channel(s) but target has "
                            f"{target_img.num_channels}; give the same count on both sides")
    needed = estimate_memory_bytes(target_img.geometry, source_img.geometry, target_img.num_channels, settings)
    limit = available_memory_bytes() if max_memory_bytes is None else int(max_memory_bytes)
    if needed > limit:
        raise CombiregError(f"this registration needs about {needed / 2**30:.1f} GiB but only "
                            f"{limit / 2**30:.1f} GiB is available; use a coarser ImagePyramidSchedule "
                            f"or smaller images")
    if settings.num_threads > 0:
        torch.set_num_threads(settings.num_threads)
    source_norm = normalise_intensities(source_img, settings.normalization_percentiles, role="source")
    target_norm = normalise_intensities(target_img, settings.normalization_percentiles, role="target")
    source_in_target = resample_image(source_norm, target_img.geometry)
    init_f, init_b = _init_fields(init, target_img, source_img, settings, device)
    t_prep = time.perf_counter() - start

    fields = optimise_fields(source_in_target.data[None].to(device), target_norm.data[None].to(device),
                             target_img.geometry, settings, init_forward=init_f, init_backward=init_b,
                             callback=callback)
    t_opt = time.perf_counter() - start - t_prep
    result = _finish(fields, source_img, target_img, settings)
    result.report = _report(result, fields, settings, device, source_img, target_img,
                            {"preparation": t_prep, "optimisation": t_opt,
                             "total": time.perf_counter() - start})
    return result


def _finish(fields: FieldPair, source: Image, target: Image, settings: Settings) -> Result:
    full_shape = target.geometry.shape
    forward = upsample_normalised(fields.forward, full_shape)
    backward = upsample_normalised(fields.backward, full_shape)
    u_mm = normalised_to_lps_mm(forward, target.geometry)
    v_mm_target_grid = normalised_to_lps_mm(backward, target.geometry)
    # The backward field was optimised in target space; its points are world points, so putting
    # it on the source grid is a plain world-coordinate resampling of the vectors.
    v_mm = resample_field(v_mm_target_grid, target.geometry, source.geometry)
    warped = warp_image(source, target.geometry, u_mm)
    return Result(u_mm, target.geometry, v_mm, source.geometry, warped, settings)


def _package_version(name: str) -> str:
    # Why metadata, not `import itk`: a Python-API run on in-memory images never needs ITK, and
    # importing it only to read a version cost ~2 s.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _report(result: Result, fields: FieldPair, settings: Settings, device: str, source: Image, target: Image,
            seconds: dict) -> dict:

    jac = jacobian_determinant(result.displacement_lps_mm, result.target_geometry)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {
        "combireg_version": __version__,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__, "itk": _package_version("itk")},
        "device": device,
        "threads": torch.get_num_threads(),
        "seed": settings.seed,
        "parameters_source": settings.source,
        "target": {"channels": target.num_channels, **target.geometry.to_dict()},
        "source": {"channels": source.num_channels, **source.geometry.to_dict()},
        "levels": [lvl.to_dict() for lvl in fields.levels],
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "wall_time_s": round(seconds["total"], 3),
        "peak_memory_mb": round(peak_mb, 1),
        "jacobian": {
            "min": float(jac.min()),
            "max": float(jac.max()),
            "percent_nonpositive": float(100.0 * np.count_nonzero(jac <= 0) / jac.size),
        },
        "displacement_mm": {
            "max": float(np.linalg.norm(result.displacement_lps_mm, axis=-1).max()),
            "mean": float(np.linalg.norm(result.displacement_lps_mm, axis=-1).mean()),
        },
    }
