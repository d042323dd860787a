"""B-spline registration with itk-elastix, written in combireg's output conventions.

:func:`register_elastix` registers all channels at once through elastix's multi-image
registration: the image metric of the parameter map is repeated once per channel pair (weight
divided by the number of channels, so the summed image term keeps its scale against penalty
terms such as the bending energy). The result saves exactly the files of ``combireg run``:

* ``field.nii.gz``: forward field on the target grid, LPS mm, target point x -> source point
  x + u(x) (what transformix computes on elastix's fixed grid);
* ``field_inverse.nii.gz``: its numerical inverse on the source grid;
* ``warped_<k>.nii.gz``: source channel k warped into target space by combireg's own warper;
* ``params.txt``: the elastix parameter map as used (channels expanded), elastix text format;
  ``combireg baseline elastix ... -p params.txt`` reproduces the run;
* ``report.json``: wall time, peak memory, Jacobian statistics, versions.

Naming: source/target throughout, except where elastix calls them moving/fixed.
"""
from __future__ import annotations

import os
import platform
import re
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np

from ..elastix_driver import ParameterMap, PoolThreader, itk_image, itk_message, run_elastix, sync_elastix_clock
from ..errors import CombiregError
from ..geometry import Geometry
from ..image import Image
from ..version import __version__

__all__ = ["register_elastix", "ElastixResult", "default_parameter_map", "read_parameter_map", "expand_for_channels",
           "format_elastix_map", "METHOD"]

METHOD = "elastix_bspline"

ImageLike = Union[Image, str, os.PathLike, Sequence[Union[str, os.PathLike]]]

#: Metrics that take no image intensities (penalties on the transform, point distances): they
#: stay single when the image metric is repeated per channel.
_NON_IMAGE_METRICS = ("TransformBendingEnergyPenalty", "TransformRigidityPenalty",
                      "DisplacementMagnitudePenalty", "DistancePreservingRigidityPenalty",
                      "CorrespondingPointsEuclideanDistanceMetric", "StatisticalShapePenalty",
                      "PolydataDummyPenalty")
#: Components elastix wants once per metric in a multi-metric, multi-image registration.
_PER_METRIC_COMPONENTS = ("FixedImagePyramid", "MovingImagePyramid", "Interpolator", "ImageSampler")
_PER_METRIC_KEY = re.compile(r"Metric(0|[1-9][0-9]*)([A-Za-z_]\w*)\Z")


# ------------------------------------------------------------------------------ parameter maps
def _itk():
    import itk  # lazy: about a second or more to import

    return itk


def default_parameter_map() -> ParameterMap:
    """itk-elastix's default ``bspline`` parameter map (what ``params/elastix_bspline.txt`` holds)."""
    itk = _itk()
    po = itk.ParameterObject.New()
    return {k: list(v) for k, v in po.GetDefaultParameterMap("bspline").items()}


def read_parameter_map(path: str | os.PathLike) -> ParameterMap:
    """Read one elastix parameter file with elastix's own parser.

    Raises
    ------
    CombiregError
        Missing file or a syntax error (elastix's message, on one line).
    """
    itk = _itk()
    path = Path(path)
    if not path.is_file():
        raise CombiregError(f"{path}: no such parameter file")
    po = itk.ParameterObject.New()
    try:
        po.ReadParameterFile(str(path))
    except Exception as exc:  # ITK raises RuntimeError with multi-line text
        raise CombiregError(f"{path}: {itk_message(exc)}") from None
    if po.GetNumberOfParameterMaps() != 1:
        raise CombiregError(f"{path}: expected one elastix parameter map, got {po.GetNumberOfParameterMaps()}")
    pm = {k: list(v) for k, v in po.GetParameterMap(0).items()}
    if not pm.get("Transform"):
        raise CombiregError(f"{path}: not an elastix parameter file (no (Transform ...) entry)")
    return pm


def _is_image_metric(name: str) -> bool:
    return name not in _NON_IMAGE_METRICS


def expand_for_channels(pm: ParameterMap, channels: int) -> ParameterMap:
    """The map extended to ``channels`` image pairs for elastix's multi-image registration.

    One channel: the map unchanged. Otherwise the single image metric is repeated once per
    channel (its ``Metric<i>Weight`` divided by ``channels``), non-image metrics (penalties)
    follow, and every per-metric component is repeated once per metric: this elastix requires
    as many image pairs, pyramids, interpolators and samplers as metrics, penalties included
    (ITKElastix issue #293). A map that already has one image metric per channel (such as a
    ``params.txt`` written by this module) is kept as it is.

    Raises
    ------
    CombiregError
        If the map has neither one image metric nor one per channel.
    """
    pm = {k: list(v) for k, v in pm.items()}
    if channels == 1:
        return pm
    metrics = pm.get("Metric", [])
    image = [i for i, m in enumerate(metrics) if _is_image_metric(m)]
    others = [i for i, m in enumerate(metrics) if not _is_image_metric(m)]
    if len(image) == channels and image == list(range(channels)):
        order = list(range(len(metrics)))  # already one image metric per channel, first
        split = {}
    elif len(image) == 1:
        order = image * channels + others
        split = {image[0]}
    else:
        raise CombiregError(f"the elastix parameter map has {len(image)} image metric(s) "
                            f"({', '.join(metrics[i] for i in image) or 'none'}); give one (it is repeated "
                            f"per channel) or one per channel ({channels}), first")
    per_metric: dict[int, dict[str, list[str]]] = {}
    for key in [k for k in pm if _PER_METRIC_KEY.match(k)]:
        index, suffix = _PER_METRIC_KEY.match(key).groups()
        per_metric.setdefault(int(index), {})[suffix] = pm.pop(key)
    pm["Registration"] = ["MultiMetricMultiResolutionRegistration"]
    pm["Metric"] = [metrics[i] for i in order]
    for new, old in enumerate(order):
        for suffix, values in per_metric.get(old, {}).items():
            if suffix == "Weight" and old in split:
                values = [repr(float(v) / channels) for v in values]
            pm[f"Metric{new}{suffix}"] = list(values)
        if old in split and "Weight" not in per_metric.get(old, {}):
            pm[f"Metric{new}Weight"] = [repr(1.0 / channels)]
    for key in _PER_METRIC_COMPONENTS:
        if key in pm and len(pm[key]) != len(order):
            pm[key] = pm[key][:1] * len(order)
    return pm


def _format_value(value: str) -> str:
    if re.fullmatch(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", value):
        return value
    if '"' in value or "\n" in value:
        raise CombiregError(f"cannot write elastix parameter value {value!r}")
    return f'"{value}"'


def format_elastix_map(pm: ParameterMap) -> str:
    """elastix parameter-file text: one ``(Key value ...)`` line per key, numbers bare."""
    return "".join(f"({key} {' '.join(_format_value(v) for v in values)})\n" for key, values in sorted(pm.items()))


# ------------------------------------------------------------------------------ result
@dataclass
class ElastixResult:
    """What :func:`register_elastix` produced; the fields mean what they mean in
    :class:`combireg.api.Result`, with the elastix parameter map instead of combireg settings."""

    displacement_lps_mm: np.ndarray
    target_geometry: Geometry
    inverse_displacement_lps_mm: np.ndarray
    source_geometry: Geometry
    warped: Image
    parameter_map: ParameterMap
    parameters_source: str
    report: dict = field(default_factory=dict)

    def params_text(self) -> str:
        return (f"// combireg {__version__}: elastix parameter map of this run ({METHOD}, from "
                f"{self.parameters_source}),\n"
                f"// image metric repeated per channel. `combireg baseline elastix SRC TGT -p params.txt` "
                f"reproduces it.\n" + format_elastix_map(self.parameter_map))

    def save(self, outdir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the outputs of ``combireg run`` into ``outdir``, whole or not at all."""
        from ..outputs import write_outputs

        return write_outputs(outdir, self, self.params_text(), overwrite=overwrite)


# ------------------------------------------------------------------------------ registration
def register_elastix(source: ImageLike, target: ImageLike, *, parameter_file: str | os.PathLike | None = None,
                     callback: Callable[[dict], None] | None = None) -> ElastixResult:
    """Register ``source`` to ``target`` with elastix (B-spline by default), all channels at once.

    Parameters
    ----------
    source, target : Image, path, comma-separated paths or list of paths
        The two subjects, the same number of channels on both sides (channels of one side
        share a grid; the two sides may lie on different grids).
    parameter_file : path, optional
        Any elastix parameter file with one map (default: itk-elastix's default ``bspline``
        map, the same as ``params/elastix_bspline.txt``). Its image metric is repeated per
        channel (see :func:`expand_for_channels`).
    callback : callable, optional
        Receives ``{"stage": name}`` when each stage starts: ``"elastix"``, ``"field"``,
        ``"inverse"``, ``"warp"`` (elastix itself reports no iterations to Python).

    Returns
    -------
    ElastixResult
        ``.save(outdir)`` writes the outputs of ``combireg run``.

    Raises
    ------
    CombiregError
        Bad input or parameter file, or elastix failed (its last error line).
    """
    itk = _itk()
    start = time.perf_counter()
    notify = callback or (lambda event: None)
    pm_in = read_parameter_map(parameter_file) if parameter_file is not None else default_parameter_map()
    parameters_source = str(Path(parameter_file).absolute()) if parameter_file is not None else \
        "itk-elastix default bspline map"
    from ..api import as_image_pair

    source_img, target_img = as_image_pair(source, target)
    channels = target_img.num_channels
    pm = expand_for_channels(pm_in, channels)
    n_pairs = len(pm.get("Metric", [])) if channels > 1 else 1
    fixed = [itk_image(target_img.numpy()[k], target_img.geometry) for k in range(channels)]
    moving = [itk_image(source_img.numpy()[k], source_img.geometry) for k in range(channels)]
    t_prep = time.perf_counter() - start

    notify({"stage": "elastix"})
    with PoolThreader() as threader, tempfile.TemporaryDirectory(prefix="combireg-elastix-", ignore_cleanup_errors=True) as workdir:
        # penalties get the first pair again (only its domain is used)
        pairs = [(fixed[k], moving[k]) if k < channels else (fixed[0], moving[0]) for k in range(n_pairs)]
        reg = run_elastix(pairs, pm, workdir, what="elastix")
        t_reg = time.perf_counter() - start - t_prep
        notify({"stage": "field"})
        try:
            # An output directory, or transformix writes deformationField.nii into the cwd.
            transformix = itk.TransformixFilter[type(moving[0])].New()
            transformix.SetMovingImage(moving[0])
            transformix.SetTransformParameterObject(reg.GetTransformParameterObject())
            transformix.SetComputeDeformationField(True)
            transformix.SetOutputDirectory(workdir)
            transformix.SetLogToConsole(False)
            sync_elastix_clock()
            transformix.UpdateLargestPossibleRegion()
            # Copy to numpy while the work folder exists: ITK pipelines are lazy, and touching
            # the output later re-ran transformix after the folder was gone ("does not exist").
            u_mm = np.array(itk.array_from_image(transformix.GetOutputDeformationField()), dtype=np.float32)
        except Exception as exc:
            raise CombiregError(f"transformix failed: {itk_message(exc)}") from None
    if u_mm.shape != target_img.geometry.shape + (3,):
        raise CombiregError(f"transformix returned a field of shape {u_mm.shape[:3]}, not the target grid "
                            f"{target_img.geometry.shape}")
    t_field = time.perf_counter() - start - t_prep - t_reg

    notify({"stage": "inverse"})
    v_mm = _inverse_on_source_grid(u_mm, target_img.geometry, source_img.geometry)
    notify({"stage": "warp"})
    from ..warp import warp_image

    warped = warp_image(source_img, target_img.geometry, u_mm)
    result = ElastixResult(u_mm, target_img.geometry, v_mm, source_img.geometry, warped, pm, parameters_source)
    total = time.perf_counter() - start
    result.report = _report(result, source_img, target_img, n_pairs, threader.name,
                            {"preparation": t_prep, "elastix": t_reg, "field": t_field,
                             "inverse_and_warp": total - t_prep - t_reg - t_field, "total": total})
    return result


def _inverse_on_source_grid(u_mm: np.ndarray, target_geometry: Geometry, source_geometry: Geometry) -> np.ndarray:
    """Numerical inverse of the forward field, on the source grid (LPS mm).

    Inverted on the target grid by fixed-point iteration (``v(y) = -u(y + v(y))``), then put on
    the source grid by world-coordinate resampling, as :func:`combireg.api.register` does.
    """
    from ..warp import invert_normalised, lps_mm_to_normalised, normalised_to_lps_mm, resample_field

    v_norm = invert_normalised(lps_mm_to_normalised(u_mm, target_geometry))
    return resample_field(normalised_to_lps_mm(v_norm, target_geometry), target_geometry, source_geometry)


def _report(result: ElastixResult, source: Image, target: Image, n_pairs: int, threader: str,
            seconds: dict) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from ..warp import field_statistics

    itk = _itk()
    try:
        elastix_version = version("itk-elastix")
    except PackageNotFoundError:
        elastix_version = "unknown"
    mtb = itk.MultiThreaderBase
    return {
        "method": METHOD,
        "combireg_version": __version__,
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "itk": itk.Version.GetITKVersion(), "itk_elastix": elastix_version},
        "threader": threader,
        "threads": int(mtb.GetGlobalDefaultNumberOfThreads()),
        "parameters_source": result.parameters_source,
        "image_pairs": n_pairs,
        "target": {"channels": target.num_channels, **target.geometry.to_dict()},
        "source": {"channels": source.num_channels, **source.geometry.to_dict()},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "wall_time_s": round(seconds["total"], 3),
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        **field_statistics(result.displacement_lps_mm, result.target_geometry),
    }
