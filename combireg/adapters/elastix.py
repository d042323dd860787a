"""elastix registration (rigid -> affine -> B-spline by default), written in combireg's output conventions.

:func:`register_elastix` runs a chain of elastix parameter maps in one
``ElastixRegistrationMethod`` (elastix's own convention: each map starts from the transform of
the maps before it). The default chain is what elastix users normally run: itk-elastix's default
rigid map (centre-of-gravity initialisation added), its default affine map and its default
B-spline map (``params/elastix_rigid.txt``, ``params/elastix_affine.txt``,
``params/elastix_bspline.txt``). A single B-spline map alone is
``parameter_file="params/elastix_bspline.txt"``.

Pyramids in millimetres: every map whose parameter file sets no schedule of its own gets
``FixedImagePyramidSchedule`` and ``MovingImagePyramidSchedule`` from physical levels
(:func:`mm_pyramid_schedule`: with ``NumberOfResolutions`` n the levels are 2^(n-1), ..., 2, 1 mm,
turned into per-axis integer factors of each image's own spacing, never below 1). A 1 mm image
gets exactly elastix's default schedule (8 4 2 1 voxels); a 2 mm image 4 2 1 1; a 1x1x4 mm image
(8,8,2) (4,4,1) (2,2,1) (1,1,1) instead of shrinking its 4 mm slice axis to 32 mm.

All channels are registered at once through elastix's multi-image registration: the image
metric of each map is repeated once per channel pair (weight divided by the number of channels,
so the summed image term keeps its scale against penalty terms such as the bending energy), and
maps with fewer metrics than the chain's largest are padded with unused ones, since every map of
a chain gets the same image pairs (see :func:`pad_metrics`). The result saves exactly the files
of ``combireg run``:

* ``field.nii.gz``: forward field of the whole chain on the target grid, LPS mm, target point x
  -> source point x + u(x) (what transformix computes on elastix's fixed grid);
* ``field_inverse.nii.gz``: its numerical inverse on the source grid;
* ``warped_<k>.nii.gz``: source channel k warped into target space by combireg's own warper;
* ``params.txt``: the elastix parameter maps as used (channels expanded, schedules written out),
  elastix text format, one map after the other; ``combireg baseline elastix ... -p params.txt``
  reproduces the run;
* ``report.json``: wall time, peak memory, Jacobian statistics, the maps' transforms and
  pyramid schedules, versions.

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
from ..pyramid import shrink_factors
from ..version import __version__

__all__ = ["register_elastix", "ElastixResult", "default_parameter_map", "default_parameter_maps",
           "read_parameter_map", "read_parameter_maps", "expand_for_channels", "pad_metrics", "mm_pyramid_schedule",
           "format_elastix_map", "format_elastix_maps", "method_name", "METHOD"]

#: The method name of the default chain in report.json (a run's name follows its maps' transforms,
#: see :func:`method_name`: one B-spline map is ``elastix_bspline``).
METHOD = "elastix_rigid_affine_bspline"
#: The default chain's parameter files (in the repository's ``params/`` folder), in order.
DEFAULT_PARAMETER_FILES = ("params/elastix_rigid.txt", "params/elastix_affine.txt", "params/elastix_bspline.txt")
#: Short names of elastix transforms in method names.
_TRANSFORM_NAMES = {"EulerTransform": "rigid", "AffineTransform": "affine", "BSplineTransform": "bspline",
                    "SimilarityTransform": "similarity", "TranslationTransform": "translation"}
#: A comment line between the maps of a multi-map parameter file (such as a chain's params.txt).
_MAP_SEPARATOR = re.compile(r"^//\s*=+\s*elastix parameter map (\d+) of (\d+)\s*=+\s*$", re.MULTILINE)
#: Schedule keys elastix reads for its pyramids: a map that sets one keeps its own schedule.
_FIXED_SCHEDULE_KEYS = ("ImagePyramidSchedule", "FixedImagePyramidSchedule")
_MOVING_SCHEDULE_KEYS = ("ImagePyramidSchedule", "MovingImagePyramidSchedule")

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


def default_parameter_maps() -> list[ParameterMap]:
    """The default chain: itk-elastix's default rigid, affine and B-spline maps, in this order.

    The rigid map gets ``AutomaticTransformInitialization "true"`` with
    ``AutomaticTransformInitializationMethod "CenterOfGravity"`` (elastix's default rigid map
    starts from the identity, which fails on a source shifted by a few centimetres); the affine
    and B-spline maps start from the transform before them. These are what
    ``params/elastix_rigid.txt``, ``params/elastix_affine.txt`` and ``params/elastix_bspline.txt`` hold.
    """
    itk = _itk()
    po = itk.ParameterObject.New()
    rigid, affine = ({k: list(v) for k, v in po.GetDefaultParameterMap(name).items()} for name in ("rigid", "affine"))
    rigid["AutomaticTransformInitialization"] = ["true"]
    rigid["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
    return [rigid, affine, default_parameter_map()]


def _parse_map_file(path: Path, where: str) -> ParameterMap:
    """The one map of an elastix parameter file, parsed by elastix's own parser."""
    itk = _itk()
    po = itk.ParameterObject.New()
    try:
        po.ReadParameterFile(str(path))
    except Exception as exc:  # ITK raises RuntimeError with multi-line text
        raise CombiregError(f"{where}: {itk_message(exc).replace(str(path), where)}") from None
    pm = {k: list(v) for k, v in po.GetParameterMap(0).items()}
    if not pm.get("Transform"):
        raise CombiregError(f"{where}: not an elastix parameter file (no (Transform ...) entry)")
    return pm


def _parse_map_text(text: str, where: str) -> ParameterMap:
    with tempfile.TemporaryDirectory(prefix="combireg-params-") as folder:
        path = Path(folder) / "map.txt"
        path.write_text(text)
        return _parse_map_file(path, where)


def read_parameter_maps(path: str | os.PathLike) -> list[ParameterMap]:
    """Read an elastix parameter file with one map, or several one after the other.

    Several maps are separated by comment lines ``// ==== elastix parameter map I of N ====``
    (as in the ``params.txt`` of a chain run); elastix's own parser reads each map.

    Raises
    ------
    CombiregError
        Missing file, a syntax error (elastix's message, on one line) or a map without a transform.
    """
    path = Path(path)
    if not path.is_file():
        raise CombiregError(f"{path}: no such parameter file")
    text = path.read_text(errors="replace")
    marks = list(_MAP_SEPARATOR.finditer(text))
    if not marks:
        return [_parse_map_file(path, str(path))]
    chunks = [text[m.end():(marks[i + 1].start() if i + 1 < len(marks) else len(text))] for i, m in enumerate(marks)]
    return [_parse_map_text(chunk, f"{path} (map {i + 1} of {len(chunks)})") for i, chunk in enumerate(chunks)]


def read_parameter_map(path: str | os.PathLike) -> ParameterMap:
    """Read one elastix parameter file with elastix's own parser.

    Raises
    ------
    CombiregError
        Missing file, a syntax error (elastix's message, on one line), or a file of several maps
        (read those with :func:`read_parameter_maps`).
    """
    maps = read_parameter_maps(path)
    if len(maps) != 1:
        raise CombiregError(f"{path}: expected one elastix parameter map, got {len(maps)}")
    return maps[0]


def read_chain(parameter_files: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[ParameterMap], list[str]]:
    """The maps of one or more parameter files, in order (a file may hold several maps).

    Returns
    -------
    (list of dict, list of str)
        The maps, and where each came from (``FILE`` or ``FILE (map I of N)``) for messages.

    Raises
    ------
    CombiregError
        As :func:`read_parameter_maps`, or no file given.
    """
    if isinstance(parameter_files, (str, os.PathLike)):
        parameter_files = [parameter_files]
    maps, names = [], []
    for path in parameter_files:
        found = read_parameter_maps(path)
        maps += found
        names += [str(path)] if len(found) == 1 else [f"{path} (map {i + 1} of {len(found)})" for i in range(len(found))]
    if not maps:
        raise CombiregError("no elastix parameter file given")
    return maps, names


def method_name(maps: Sequence[ParameterMap]) -> str:
    """``elastix_`` and the maps' transforms in order: ``elastix_rigid_affine_bspline``, ``elastix_bspline``."""
    names = []
    for pm in maps:
        transform = (pm.get("Transform") or ["unknown"])[0]
        names.append(_TRANSFORM_NAMES.get(transform, re.sub(r"Transform$", "", transform).lower() or "unknown"))
    return "elastix_" + "_".join(names)


def _is_image_metric(name: str) -> bool:
    return name not in _NON_IMAGE_METRICS


def expand_for_channels(pm: ParameterMap, channels: int) -> ParameterMap:
    """The map extended to ``channels`` image pairs for elastix's multi-image registration.

    One channel: the map unchanged. Otherwise the single image metric is repeated once per
    channel (its ``Metric<i>Weight`` divided by ``channels``), non-image metrics (penalties)
    follow, and every per-metric component is repeated once per metric: this elastix requires
    as many image pairs, pyramids, interpolators and samplers as metrics, penalties included
    (ITKElastix issue #293). A map that already has one image metric per channel (such as a
    ``params.txt`` written by this module) is kept as it is, less the unused metrics that
    :func:`pad_metrics` appended.

    Raises
    ------
    CombiregError
        If the map has neither one image metric nor one per channel.
    """
    pm = _without_padding(pm)
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


def _is_padding(pm: ParameterMap, index: int) -> bool:
    return (pm.get(f"Metric{index}Use") == ["false"]
            and float((pm.get(f"Metric{index}Weight") or ["1"])[0]) == 0.0)


def _without_padding(pm: ParameterMap) -> ParameterMap:
    """A copy of the map less the trailing unused metrics of :func:`pad_metrics`."""
    pm = {k: list(v) for k, v in pm.items()}
    metrics = pm.get("Metric", [])
    keep = len(metrics)
    while keep > 1 and _is_padding(pm, keep - 1):
        keep -= 1
    if keep == len(metrics):
        return pm
    for key in [k for k in pm if _PER_METRIC_KEY.match(k) and int(_PER_METRIC_KEY.match(k).group(1)) >= keep]:
        del pm[key]
    pm["Metric"] = metrics[:keep]
    for key in _PER_METRIC_COMPONENTS:
        if key in pm and len(pm[key]) > keep:
            pm[key] = pm[key][:keep]
    return pm


def pad_metrics(pm: ParameterMap, pairs: int) -> ParameterMap:
    """The map with unused image metrics appended up to ``pairs`` metrics.

    Why: every map of a chain gets the same image pairs, and with several pairs elastix wants
    as many metrics as pairs in each map (ITKElastix issue #293), so the rigid and affine maps
    before a B-spline map with a bending-energy penalty need one more. The added metrics repeat
    the first image metric with ``Metric<i>Use "false"`` and weight 0 (the recipe of
    ``benchmarks/bench_core.py``); :func:`expand_for_channels` removes them again.
    """
    pm = {k: list(v) for k, v in pm.items()}
    metrics = pm.get("Metric", [])
    if len(metrics) >= pairs:
        return pm
    image = next((m for m in metrics if _is_image_metric(m)), "AdvancedMattesMutualInformation")
    for index in range(len(metrics), pairs):
        pm[f"Metric{index}Weight"] = ["0.0"]
        pm[f"Metric{index}Use"] = ["false"]
    pm["Metric"] = metrics + [image] * (pairs - len(metrics))
    pm["Registration"] = ["MultiMetricMultiResolutionRegistration"]
    for key in _PER_METRIC_COMPONENTS:
        if key in pm:
            pm[key] = pm[key] + pm[key][:1] * (pairs - len(pm[key]))
    return pm


# ------------------------------------------------------------------------------ pyramids in mm
def mm_pyramid_schedule(resolutions: int, geometry: Geometry) -> list[list[int]]:
    """elastix pyramid schedule (x y z per level, coarsest first) of levels stated in millimetres.

    Level i of n is ``2^(n-1-i)`` mm (8, 4, 2, 1 mm for elastix's default 4 levels); its
    factor along an axis is :func:`combireg.pyramid.shrink_factors` (spacing_mm / the image's
    spacing, never below 1) rounded to an integer, since elastix reads schedules as integers
    (ITK's ``MultiResolutionPyramidImageFilter::ScheduleType`` is ``Array2D<unsigned int>``).

    Parameters
    ----------
    resolutions : int
        elastix's ``NumberOfResolutions`` (>= 1).
    geometry : Geometry
        The image the pyramid is built of.

    Returns
    -------
    list of list of int
        ``resolutions`` rows of 3 factors, x y z. On a 1 mm grid: elastix's default schedule.
    """
    if resolutions < 1:
        raise CombiregError(f"NumberOfResolutions must be at least 1, got {resolutions}")
    return [[max(1, int(round(f))) for f in shrink_factors(2.0 ** (resolutions - 1 - i), geometry)]
            for i in range(resolutions)]


def _resolutions(pm: ParameterMap, where: str) -> int:
    try:
        return int((pm.get("NumberOfResolutions") or ["3"])[0])  # elastix's own default is 3
    except ValueError:
        raise CombiregError(f"{where}: NumberOfResolutions must be an integer, got "
                            f"{' '.join(pm['NumberOfResolutions'])}") from None


def with_mm_schedules(pm: ParameterMap, fixed: Geometry, moving: Geometry, *,
                      where: str = "elastix map") -> tuple[ParameterMap, dict]:
    """The map with millimetre pyramid schedules where it sets none of its own.

    ``FixedImagePyramidSchedule`` from the fixed (target) image's spacing and
    ``MovingImagePyramidSchedule`` from the moving (source) image's, each only when the map has
    neither that key nor ``ImagePyramidSchedule``: a schedule the user wrote wins.

    Returns
    -------
    (dict, dict)
        The new map, and what report.json records: ``{"number_of_resolutions", "fixed",
        "moving"}``, each side ``{"schedule_xyz": rows, "from": "mm levels ..." or "parameter file"}``.
    """
    pm = {k: list(v) for k, v in pm.items()}
    resolutions = _resolutions(pm, where)
    levels = " ".join(f"{2.0 ** (resolutions - 1 - i):g}" for i in range(resolutions))
    info: dict = {"transform": (pm.get("Transform") or ["?"])[0], "number_of_resolutions": resolutions}
    for side, keys, geometry in (("fixed", _FIXED_SCHEDULE_KEYS, fixed), ("moving", _MOVING_SCHEDULE_KEYS, moving)):
        given = next((k for k in keys if k in pm), None)
        if given is None:
            rows = mm_pyramid_schedule(resolutions, geometry)
            pm[keys[1]] = [str(v) for row in rows for v in row]
            info[side] = {"schedule_xyz": rows, "from": f"mm levels {levels}"}
        else:
            values = pm[given]
            rows = [values[i:i + 3] for i in range(0, len(values), 3)]
            info[side] = {"schedule_xyz": [[_number(v) for v in row] for row in rows], "from": f"parameter file ({given})"}
    return pm, info


def _number(value: str):
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() else number


def _format_value(value: str) -> str:
    if re.fullmatch(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", value):
        return value
    if '"' in value or "\n" in value:
        raise CombiregError(f"cannot write elastix parameter value {value!r}")
    return f'"{value}"'


def format_elastix_map(pm: ParameterMap) -> str:
    """elastix parameter-file text: one ``(Key value ...)`` line per key, numbers bare."""
    return "".join(f"({key} {' '.join(_format_value(v) for v in values)})\n" for key, values in sorted(pm.items()))


def format_elastix_maps(maps: Sequence[ParameterMap]) -> str:
    """Text of several maps in one file, each after a ``// ==== elastix parameter map I of N ====``
    line (one map: no separator); :func:`read_parameter_maps` reads it back."""
    if len(maps) == 1:
        return format_elastix_map(maps[0])
    return "".join(f"// ==== elastix parameter map {i + 1} of {len(maps)} ====\n" + format_elastix_map(pm)
                   for i, pm in enumerate(maps))


# ------------------------------------------------------------------------------ result
@dataclass
class ElastixResult:
    """What :func:`register_elastix` produced; the fields mean what they mean in
    :class:`combireg.api.Result`, with the elastix parameter maps (in order, as run) instead of
    combireg settings."""

    displacement_lps_mm: np.ndarray
    target_geometry: Geometry
    inverse_displacement_lps_mm: np.ndarray
    source_geometry: Geometry
    warped: Image
    parameter_maps: list
    parameters_source: str
    report: dict = field(default_factory=dict)

    @property
    def parameter_map(self) -> ParameterMap:
        """The last map of the chain (the deformable one in the default chain)."""
        return self.parameter_maps[-1]

    def params_text(self) -> str:
        count = len(self.parameter_maps)
        what = "parameter map" if count == 1 else f"parameter maps ({count}, run in this order)"
        return (f"// combireg {__version__}: elastix {what} of this run ({method_name(self.parameter_maps)}),\n"
                f"// from {self.parameters_source};\n"
                f"// image metric repeated per channel, pyramid schedules written out. "
                f"`combireg baseline elastix SRC TGT -p params.txt` reproduces it.\n"
                + format_elastix_maps(self.parameter_maps))

    def save(self, outdir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the outputs of ``combireg run`` into ``outdir``, whole or not at all."""
        from ..outputs import write_outputs

        return write_outputs(outdir, self, self.params_text(), overwrite=overwrite)


# ------------------------------------------------------------------------------ registration
ParameterFiles = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], None]


def prepare_chain(maps: Sequence[ParameterMap], channels: int, fixed: Geometry, moving: Geometry,
                  names: Sequence[str] | None = None) -> tuple[list[ParameterMap], int, list[dict]]:
    """The maps as elastix runs them: channels expanded, padded to one pair count, mm schedules.

    Parameters
    ----------
    maps : list of dict
        elastix parameter maps, in order.
    channels : int
        Channel pairs registered at once.
    fixed, moving : Geometry
        The target's and the source's grids (for the millimetre pyramid schedules).
    names : list of str, optional
        Where each map came from, for error messages.

    Returns
    -------
    (list of dict, int, list of dict)
        The maps, the number of image pairs elastix gets (1 for one channel, else the largest
        number of metrics of any map: penalties get the first pair again), and per map what
        report.json records of its pyramid (see :func:`with_mm_schedules`).
    """
    names = list(names) if names is not None else [f"elastix map {i + 1}" for i in range(len(maps))]
    expanded = [expand_for_channels(pm, channels) for pm in maps]
    pairs = max(len(pm.get("Metric", [])) for pm in expanded) if channels > 1 else 1
    if channels > 1:
        expanded = [pad_metrics(pm, pairs) for pm in expanded]
    prepared, schedules = [], []
    for pm, name in zip(expanded, names):
        pm, info = with_mm_schedules(pm, fixed, moving, where=name)
        prepared.append(pm)
        schedules.append(info)
    return prepared, pairs, schedules


def register_elastix(source: ImageLike, target: ImageLike, *, parameter_file: ParameterFiles = None,
                     callback: Callable[[dict], None] | None = None) -> ElastixResult:
    """Register ``source`` to ``target`` with elastix (rigid -> affine -> B-spline by default), all channels at once.

    Parameters
    ----------
    source, target : Image, path, comma-separated paths or list of paths
        The two subjects, the same number of channels on both sides (channels of one side
        share a grid; the two sides may lie on different grids).
    parameter_file : path or list of paths, optional
        elastix parameter files, run in order as one chain (elastix's convention: each map starts
        from the transforms before it; a file may hold several maps, as a chain's
        ``params.txt``). Default: itk-elastix's default rigid (with centre-of-gravity
        initialisation), affine and B-spline maps, the same as ``params/elastix_rigid.txt``,
        ``params/elastix_affine.txt``, ``params/elastix_bspline.txt``. One file alone (such as
        ``params/elastix_bspline.txt``) runs that map alone. Image metrics are repeated per
        channel (see :func:`expand_for_channels`); maps without a pyramid schedule get one in
        millimetres (see :func:`with_mm_schedules`).
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
    if parameter_file is None:
        maps_in = default_parameter_maps()
        names = ["itk-elastix default rigid map", "itk-elastix default affine map", "itk-elastix default bspline map"]
        parameters_source = "itk-elastix default rigid, affine and bspline maps (" + \
            ", ".join(DEFAULT_PARAMETER_FILES) + ")"
    else:
        files = [parameter_file] if isinstance(parameter_file, (str, os.PathLike)) else list(parameter_file)
        maps_in, names = read_chain(files)
        parameters_source = ", ".join(str(Path(f).absolute()) for f in files)
    from ..api import as_image_pair

    source_img, target_img = as_image_pair(source, target)
    channels = target_img.num_channels
    maps, n_pairs, schedules = prepare_chain(maps_in, channels, target_img.geometry, source_img.geometry, names)
    fixed = [itk_image(target_img.numpy()[k], target_img.geometry) for k in range(channels)]
    moving = [itk_image(source_img.numpy()[k], source_img.geometry) for k in range(channels)]
    t_prep = time.perf_counter() - start

    notify({"stage": "elastix"})
    with PoolThreader() as threader, tempfile.TemporaryDirectory(prefix="combireg-elastix-", ignore_cleanup_errors=True) as workdir:
        # penalties (and the padding metrics) get the first pair again (only its domain is used)
        pairs = [(fixed[k], moving[k]) if k < channels else (fixed[0], moving[0]) for k in range(n_pairs)]
        reg = run_elastix(pairs, maps, workdir, what="elastix")
        t_reg = time.perf_counter() - start - t_prep
        notify({"stage": "field"})
        try:
            # An output directory, or transformix writes deformationField.nii into the cwd.
            # The transform parameter object holds the whole chain: the field is its composition.
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
    result = ElastixResult(u_mm, target_img.geometry, v_mm, source_img.geometry, warped, maps, parameters_source)
    total = time.perf_counter() - start
    result.report = _report(result, source_img, target_img, n_pairs, threader.name, schedules,
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
            schedules: list, seconds: dict) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from ..warp import field_statistics

    itk = _itk()
    try:
        elastix_version = version("itk-elastix")
    except PackageNotFoundError:
        elastix_version = "unknown"
    mtb = itk.MultiThreaderBase
    return {
        "method": method_name(result.parameter_maps),
        "combireg_version": __version__,
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "itk": itk.Version.GetITKVersion(), "itk_elastix": elastix_version},
        "threader": threader,
        "threads": int(mtb.GetGlobalDefaultNumberOfThreads()),
        "parameters_source": result.parameters_source,
        "image_pairs": n_pairs,
        "parameter_maps": schedules,
        "target": {"channels": target.num_channels, **target.geometry.to_dict()},
        "source": {"channels": source.num_channels, **source.geometry.to_dict()},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "wall_time_s": round(seconds["total"], 3),
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        **field_statistics(result.displacement_lps_mm, result.target_geometry),
    }
