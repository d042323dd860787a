"""Symmetric normalisation (SyN) with ITK's own ``SyNImageRegistrationMethod``, in combireg's conventions.

:func:`register_syn` registers the source to the target (ITK's *fixed* image) with ITK's SyN and
the ANTs neighbourhood cross-correlation metric, the algorithm behind ANTs' ``SyN[...]`` with
``CC[...]``, and saves exactly the files of ``combireg run``:

* ``field.nii.gz``: forward field on the target grid, LPS mm, target point x -> source point
  x + u(x);
* ``field_inverse.nii.gz``: SyN's own inverse (no numerical inversion) on the source grid;
* ``warped_<k>.nii.gz``: every source channel warped into target space by combireg's warper;
* ``params.txt``: the SyN settings, elastix-style ``(Key value ...)`` lines;
  ``combireg baseline syn SRC TGT -p params.txt`` reproduces the run;
* ``report.json``: the pre-alignment's matrix, per-level grids, iterations and metric values,
  times, memory, Jacobian statistics.

Rigid/affine first, levels in millimetres
-----------------------------------------
As ANTs users run ``antsRegistration`` (rigid + affine + SyN), an affine pre-alignment comes
first by default (``PreAlignment "affine"``: :func:`combireg.preprocess.prealign`, elastix with a
centre-of-gravity start, on 3 mm copies as ``combireg run``'s own pre-alignment); SyN then
registers the source pulled back through that affine onto the target grid, and the written
fields include the affine (:func:`combireg.warp.undo_prealignment`, as ``combireg run`` does).
The pyramid levels are stated in millimetres (``ShrinkSpacing``, default 8 4 2 mm): each image
is shrunk per axis by :func:`combireg.pyramid.shrink_factors` (never finer than itself along an
axis), so a 2 mm image gets the same physical levels as a 1 mm one and a thick-slice axis is not
shrunk further. ``ShrinkFactors`` states them in voxels instead (the same on every axis).

How the multi-resolution schedule is run, and why
-------------------------------------------------
ITK's SyN keeps two displacement fields on a *virtual* (middle) domain: fixed -> middle and
moving -> middle, each with its inverse, and optimises them symmetrically. Going from one
pyramid level to the next, ITK resamples them with a ``TransformParametersAdaptor``; no concrete
adaptor is wrapped in ITK's Python wheels (5.4), and without one a multi-level run (or ITK's
"state restoration") dereferences a null adaptor and crashes. So each level is a separate
single-level SyN run on images that combireg smooths and shrinks itself (sigma = factor / 2
voxels, as elastix's and combireg's pyramids; ANTs' ``8x4x2`` / ``3x2x1vox`` is about the same),
and the state is carried over in the *initial transforms*: level k starts with the
fixed-initial transform = (fixed -> middle so far)^-1 and the moving-initial transform =
(moving -> middle so far)^-1, upsampled to its grid. SyN then optimises the remaining
middle-to-middle fields from the identity, symmetrically. With the total-field smoothing at 0
(ANTs' ``SyN[step, 3, 0]``) this is the same iteration as one ITK/ANTs multi-level run; only the
upsampling interpolation differs.

Direction of SyN's transforms (checked numerically, see ``tests/test_adapters_syn.py``)
-----------------------------------------------------------------------------------------
In ``SyNImageRegistrationMethod`` the fixed image enters the metric through
``FixedInitial o (FixedToMiddle)^-1`` and the moving image through
``MovingInitial o (MovingToMiddle)^-1``, and the output transform's displacement field is
``(MovingToMiddle)^-1 o FixedToMiddle`` (``ComposeDisplacementFieldsImageFilter`` with the
fixed-to-middle field as the *warping* field, i.e. applied first), stored on the virtual grid:
a fixed point x goes to the moving point x + u(x), which is our convention with fixed = target,
moving = source. The inverse displacement field of the output transform is
``(FixedToMiddle)^-1 o MovingToMiddle``: source point y -> target point y + v(y), also stored on the
virtual (target) grid; it is put on the source grid by world-coordinate resampling. This adapter
composes the per-level fields the same way (so the output = the composition of every level), and
the test checks that ITK's own ``ResampleImageFilter`` with ``field.nii.gz`` reproduces
``warped_0`` and that a known displacement is recovered with its sign.

Cost, and why the default stops at 2 mm (shrink 2 on a 1 mm brain)
------------------------------------------------------------------
ANTs' neighbourhood-CC metric (evaluated twice per iteration, once per direction) and SyN's four
field inversions per iteration dominate: about 1 s per iteration on a 49x58x49 grid on 2 cores,
growing with the number of voxels. Defaults (shrink 8 4 2, at most 100 70 20 iterations, ANTs'
usual counts with the finest level dropped): 57 s on the 2 mm sample case (97x115x97, T1 TRE
4.72 -> 0.85 mm) and 7 min on a 1 mm brain (193x229x193, ``bench_data/case0100``, TRE 7.25 ->
1.00 mm, median 0.37 mm), both measured with another job loading the 2 cores. A full-resolution
level on a 1 mm brain would cost about 8x the shrink-2 level per iteration (~15 min for 20
iterations), hence the field is optimised on a half-resolution grid and up-sampled, as
``combireg run``'s default does. ``--shrink-mm 8,4,2,1 --iterations 100,70,50,20`` is ANTs' own
brain schedule (on a 1 mm brain) for whoever has the time. (These timings are of the SyN stage
on shrink factors 8 4 2; the affine pre-alignment adds about a second.)

Channels
--------
ITK's SyN takes one metric, and the multi-metric class (``ObjectToObjectMultiMetricv4``) is not
wrapped in ITK's Python wheels, so one channel pair drives the registration
(``metric_channel``, default 0: the T1 in ``combireg run``'s sample data); every channel is
warped with the result. The report says which channel was used.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..elastix_driver import PoolThreader, itk_image, itk_message
from ..errors import CombiregError
from ..geometry import Geometry
from ..image import Image
from ..pyramid import shrink_factors as mm_shrink_factors
from .elastix import ImageLike
from ..version import __version__
from ..warp import sample_field_at

__all__ = ["register_syn", "SynResult", "SynSettings", "read_syn_settings", "METHOD"]

METHOD = "itk_syn"


# ------------------------------------------------------------------------------ settings
#: What ``PreAlignment`` may say.
PRE_ALIGNMENTS = ("affine", "rigid", "none")
#: Levels in mm when neither ``shrink_factors`` nor ``shrink_spacing`` is given.
DEFAULT_SHRINK_SPACING_MM = (8.0, 4.0, 2.0)


@dataclass(frozen=True)
class SynSettings:
    """The settings of one SyN registration (ANTs' ``SyN[learning_rate, update, total]``).

    Attributes
    ----------
    shrink_factors : tuple of int or None
        Pyramid levels in voxels, coarsest first: the images are smoothed (sigma = factor / 2
        voxels) and shrunk by this factor along every axis. Give this or ``shrink_spacing``.
    shrink_spacing : tuple of float or None
        Pyramid levels in mm, coarsest first (default 8 4 2 when neither is given): along each
        axis of each image the factor is max(1, mm / spacing) (:func:`combireg.pyramid.shrink_factors`),
        then the level is smoothed and shrunk as above. The last level need not be the image's
        own resolution: the field is then optimised on a coarser grid and up-sampled (as
        ``combireg run``'s default does).
    iterations : tuple of int
        Maximum SyN iterations per level (a level may stop earlier on convergence).
    cc_radius : int
        Radius (voxels of the level) of the neighbourhood cross-correlation window (ANTs' CC
        radius; the window is ``2 r + 1`` voxels wide).
    learning_rate : float
        SyN's gradient step: the largest update per iteration, in voxels of the level.
    update_field_variance : float
        Variance (voxels^2 of the level) of the Gaussian smoothing of each update field.
    total_field_variance : float
        Variance (voxels^2) of the Gaussian smoothing of the accumulated fields (0 = none, ANTs'
        usual choice; a level-by-level run is only equivalent to ITK's multi-level run when it is 0).
    convergence_threshold : float
        A level stops when the slope of the normalised metric over the last
        ``convergence_window`` iterations falls below this (ITK's and ANTs' ``1e-6``).
    convergence_window : int
    metric_channel : int
        Which channel pair (0-based) drives the registration (and the pre-alignment); all
        channels are warped.
    pre_alignment : {"affine", "rigid", "none"}
        The linear stage before SyN (:func:`combireg.preprocess.prealign` on the metric channel).
    """

    shrink_factors: tuple[int, ...] | None = None
    shrink_spacing: tuple[float, ...] | None = None
    iterations: tuple[int, ...] = (100, 70, 20)
    cc_radius: int = 2
    learning_rate: float = 0.25
    update_field_variance: float = 3.0
    total_field_variance: float = 0.0
    convergence_threshold: float = 1e-6
    convergence_window: int = 10
    metric_channel: int = 0
    pre_alignment: str = "affine"

    def __post_init__(self):
        if self.shrink_factors is not None and self.shrink_spacing is not None:
            raise CombiregError("shrink_factors and shrink_spacing: give the levels in voxels or in mm, not both")
        if self.shrink_factors is not None:
            levels = _int_tuple(self.shrink_factors, "shrink_factors", minimum=1)
            object.__setattr__(self, "shrink_factors", levels)
            name = "shrink_factors"
        else:
            levels = _positive_tuple(DEFAULT_SHRINK_SPACING_MM if self.shrink_spacing is None else self.shrink_spacing,
                                     "shrink_spacing")
            object.__setattr__(self, "shrink_spacing", levels)
            name = "shrink_spacing"
        iterations = _int_tuple(self.iterations, "iterations", minimum=0)
        if not levels:
            raise CombiregError(f"{name}: give at least one level")
        if len(iterations) != len(levels):
            raise CombiregError(f"iterations: {len(iterations)} value(s) for {len(levels)} level(s) "
                                f"({name} {' '.join(_format_number(v) for v in levels)}); give one per level")
        object.__setattr__(self, "iterations", iterations)
        if self.pre_alignment not in PRE_ALIGNMENTS:
            raise CombiregError(f"pre_alignment: expected one of {', '.join(PRE_ALIGNMENTS)}, got {self.pre_alignment!r}")
        for name, minimum in (("cc_radius", 1), ("convergence_window", 2), ("metric_channel", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise CombiregError(f"{name}: expected an integer >= {minimum}, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name, positive in (("learning_rate", True), ("update_field_variance", False),
                               ("total_field_variance", False), ("convergence_threshold", None)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                    or not np.isfinite(value):
                raise CombiregError(f"{name}: expected a finite number, got {value!r}")
            if positive is True and value <= 0:
                raise CombiregError(f"{name}: expected a number > 0, got {value!r}")
            if positive is False and value < 0:
                raise CombiregError(f"{name}: expected a number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))

    @property
    def num_levels(self) -> int:
        return len(self.iterations)

    def level_factors(self, level: int, geometry: Geometry) -> tuple[float, float, float]:
        """Shrink factors along x, y, z of ``geometry`` at ``level`` (voxels, or from the level's mm)."""
        if self.shrink_factors is not None:
            return (float(self.shrink_factors[level]),) * 3
        return mm_shrink_factors(self.shrink_spacing[level], geometry)

    def with_changes(self, **changes) -> "SynSettings":
        """``dataclasses.replace``, where giving the levels one way clears the other."""
        if changes.get("shrink_factors") is not None:
            changes.setdefault("shrink_spacing", None)
        if changes.get("shrink_spacing") is not None:
            changes.setdefault("shrink_factors", None)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    def to_parameter_map(self) -> dict[str, tuple[str, ...]]:
        """The settings as elastix-style keys (what ``params.txt`` holds); unset levels are left out."""
        return {key: tuple(_format_value(v) for v in _as_values(getattr(self, name)))
                for key, (name, _) in _KEYS.items() if getattr(self, name) is not None}

    def to_text(self) -> str:
        """``params.txt``: a comment header, then one ``(Key value ...)`` line per setting."""
        lines = [f"// combireg {__version__}: ITK SyN settings of this run ({METHOD}).",
                 "// `combireg baseline syn SRC TGT -p params.txt` reproduces it.",
                 "// PreAlignment first (elastix, on the metric channel); then per level: images smoothed",
                 "// with sigma = factor/2 voxels, then shrunk (ShrinkSpacing: levels in mm, factors per axis;",
                 "// ShrinkFactors: in voxels); metric ANTs neighbourhood cross-correlation on channel",
                 "// MetricChannel; variances in voxels^2."]
        lines += [f"({key} {' '.join(values)})" for key, values in self.to_parameter_map().items()]
        return "\n".join(lines) + "\n"


#: params.txt key -> (SynSettings field, per level?)
_KEYS = {
    "PreAlignment": ("pre_alignment", False),
    "ShrinkSpacing": ("shrink_spacing", True),
    "ShrinkFactors": ("shrink_factors", True),
    "MaximumNumberOfIterations": ("iterations", True),
    "CCRadius": ("cc_radius", False),
    "LearningRate": ("learning_rate", False),
    "UpdateFieldVariance": ("update_field_variance", False),
    "TotalFieldVariance": ("total_field_variance", False),
    "ConvergenceThreshold": ("convergence_threshold", False),
    "ConvergenceWindowSize": ("convergence_window", False),
    "MetricChannel": ("metric_channel", False),
}
_INT_FIELDS = {"shrink_factors", "iterations", "cc_radius", "convergence_window", "metric_channel"}
_STR_FIELDS = {"pre_alignment"}


def _number_tuple(values, name: str, *, integer: bool, minimum: float) -> tuple:
    """``values`` (one number or a sequence) as a tuple of ints (``integer``: >= ``minimum``) or
    of finite floats (> ``minimum``), else a :class:`CombiregError` naming ``name``."""
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(values, kinds) and not isinstance(values, bool):
        values = (values,)
    what = "integers" if integer else "numbers"
    try:
        items = tuple(values)
    except TypeError:
        raise CombiregError(f"{name}: expected a sequence of {what}, got {values!r}") from None
    for v in items:
        if isinstance(v, bool) or not isinstance(v, kinds) or not np.isfinite(v) \
                or (v < minimum if integer else v <= minimum):
            raise CombiregError(f"{name}: expected {what} {'>=' if integer else '>'} {minimum}, got {v!r}")
    return tuple(int(v) if integer else float(v) for v in items)


def _int_tuple(values, name: str, *, minimum: int) -> tuple[int, ...]:
    return _number_tuple(values, name, integer=True, minimum=minimum)


def _positive_tuple(values, name: str) -> tuple[float, ...]:
    return _number_tuple(values, name, integer=False, minimum=0)


def _as_values(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _format_number(value) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def _format_value(value) -> str:
    return f'"{value}"' if isinstance(value, str) else _format_number(value)


def settings_from_map(pm: Mapping[str, Sequence[str]], *, source: str = "<parameters>",
                      lines: Mapping[str, int] | None = None) -> SynSettings:
    """:class:`SynSettings` from elastix-style keys (missing keys keep their defaults).

    Raises
    ------
    CombiregError
        ``SOURCE:LINE: ...`` for an unknown key or a value of the wrong type or range.
    """
    lines = dict(lines or {})
    where = lambda key: f"{source}:{lines[key]}" if key in lines else source  # noqa: E731
    given: dict[str, object] = {}
    for key, raw in pm.items():
        if key not in _KEYS:
            raise CombiregError(f"{where(key)}: unknown SyN key {key!r} (known: {', '.join(_KEYS)})")
        name, per_level = _KEYS[key]
        if not raw or (not per_level and len(raw) != 1):
            raise CombiregError(f"{where(key)}: {key} takes {'one or more values' if per_level else 'one value'}, "
                                f"got {len(raw)}")
        try:
            values = tuple(v if name in _STR_FIELDS else int(v) if name in _INT_FIELDS else float(v) for v in raw)
        except ValueError:
            kind = "integers" if name in _INT_FIELDS else "numbers"
            raise CombiregError(f"{where(key)}: {key} expects {kind}, got {' '.join(raw)}") from None
        given[name] = values if per_level else values[0]
    try:
        return SynSettings(**given)
    except CombiregError as exc:
        # name the file (and the line of the offending key where there is one)
        field_name = str(exc).split(":", 1)[0]
        key = next((k for k, (n, _) in _KEYS.items() if n == field_name and k in pm), None)
        raise CombiregError(f"{where(key) if key else source}: {exc}") from None


def read_syn_settings(path: str | os.PathLike) -> SynSettings:
    """Read a SyN parameter file (such as the ``params.txt`` of a ``baseline syn`` run).

    Raises
    ------
    CombiregError
        Missing file, a syntax error, an unknown key or a bad value (naming file and line).
    """
    from ..paramfile import read_parameter_file

    pm = read_parameter_file(path)
    return settings_from_map(pm, source=pm.source, lines=pm.lines)


# ------------------------------------------------------------------------------ result
@dataclass
class SynResult:
    """What :func:`register_syn` produced; the fields mean what they mean in
    :class:`combireg.api.Result`, with :class:`SynSettings` as the settings."""

    displacement_lps_mm: np.ndarray
    target_geometry: Geometry
    inverse_displacement_lps_mm: np.ndarray
    source_geometry: Geometry
    warped: Image
    settings: SynSettings
    report: dict = field(default_factory=dict)

    def params_text(self) -> str:
        return self.settings.to_text()

    def save(self, outdir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the outputs of ``combireg run`` into ``outdir``, whole or not at all."""
        from ..outputs import write_outputs

        return write_outputs(outdir, self, self.params_text(), overwrite=overwrite)


# ------------------------------------------------------------------------------ ITK helpers
def _itk():
    import itk  # lazy: about a second or more to import

    return itk


def _vector_image(displacement: np.ndarray, geometry: Geometry):
    """(Z, Y, X, 3) LPS-mm array -> ``itk.Image[itk.Vector[itk.D, 3], 3]`` on ``geometry``.

    Why not ``itk.image_from_array(..., is_vector=True)``: that makes an ``itk.VectorImage``,
    which ``DisplacementFieldTransform.SetInverseDisplacementField`` rejects; the buffer of an
    allocated ``Image[Vector]`` is filled through a numpy view instead.
    """
    from ..io import _apply_geometry

    itk = _itk()
    image = itk.Image[itk.Vector[itk.D, 3], 3].New()
    image.SetRegions([int(v) for v in geometry.size])
    image.Allocate()
    itk.array_view_from_image(image)[...] = displacement
    _apply_geometry(image, geometry)
    return image


def _field_transform(displacement: np.ndarray, geometry: Geometry):
    itk = _itk()
    transform = itk.DisplacementFieldTransform[itk.D, 3].New()
    transform.SetDisplacementField(_vector_image(displacement, geometry))
    return transform


def _field_array(itk_field) -> np.ndarray:
    return np.array(_itk().array_view_from_image(itk_field), dtype=np.float32)


def _compose(first: np.ndarray, second: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Displacement of ``x -> second(first(x))``, both fields on ``geometry``.

    Border values outside the grid: SyN's fields are zero on the grid's boundary (ITK zeroes it
    when smoothing), so this equals ITK's zero displacement outside a field.
    """
    return first + sample_field_at(second, geometry, geometry, first)


def _level_image(image: Image, k: int, factors: Sequence[float]):
    """Channel ``k`` smoothed (sigma = factor / 2 voxels per axis) and shrunk on its own grid.

    ``factors`` are per axis, x y z (a factor of 1 leaves an axis as it is).
    """
    from ..optimize import level_image

    factors = tuple(float(f) for f in factors)
    geometry = image.geometry.shrink(factors)
    data = level_image(image.data[k:k + 1][None], factors, geometry.shape)[0]
    return itk_image(Image(data, geometry).numpy()[0], geometry), geometry


def _level_label(settings: SynSettings, level: int, factors: Sequence[float]):
    """How report.json and the callback name a level's shrink: the voxel factor as given, or the
    per-axis factors (x y z) that the level's mm gave."""
    if settings.shrink_factors is not None:
        return settings.shrink_factors[level]
    return [round(f, 4) for f in factors]


def _run_level(fixed, moving, settings: SynSettings, level: int, shrink, fixed_initial, moving_initial,
               notify: Callable[[dict], None]) -> tuple[dict, dict]:
    """One single-level SyN run; returns its four middle fields (LPS mm arrays) and a report."""
    itk = _itk()
    image_type = type(fixed)
    syn = itk.SyNImageRegistrationMethod[image_type, image_type].New()
    syn.SetFixedImage(fixed)
    syn.SetMovingImage(moving)
    metric = itk.ANTSNeighborhoodCorrelationImageToImageMetricv4[image_type, image_type].New()
    metric.SetRadius([settings.cc_radius] * 3)
    syn.SetMetric(metric)
    # One level on images already smoothed and shrunk here (see the module docstring).
    syn.SetNumberOfLevels(1)
    syn.SetShrinkFactorsPerLevel([1])
    syn.SetSmoothingSigmasPerLevel([0.0])
    syn.SetNumberOfIterationsPerLevel([settings.iterations[level]])
    syn.SetLearningRate(settings.learning_rate)
    syn.SetGaussianSmoothingVarianceForTheUpdateField(settings.update_field_variance)
    syn.SetGaussianSmoothingVarianceForTheTotalField(settings.total_field_variance)
    syn.SetConvergenceThreshold(settings.convergence_threshold)
    syn.SetConvergenceWindowSize(settings.convergence_window)
    if fixed_initial is not None:
        syn.SetFixedInitialTransform(fixed_initial)
        syn.SetMovingInitialTransform(moving_initial)
    values: list[float] = []

    def on_iteration():
        # IterationEvent also fires when the level starts (iteration 0, no metric yet).
        iteration = int(syn.GetCurrentIteration())
        if iteration > 0:
            values.append(float(syn.GetCurrentMetricValue()))
            notify({"stage": "syn", "level": level, "shrink": shrink, "iteration": iteration, "metric": values[-1]})

    syn.AddObserver(itk.IterationEvent(), on_iteration)
    start = time.perf_counter()
    try:
        syn.Update()
    except Exception as exc:
        raise CombiregError(f"ITK SyN failed at level {level + 1}: {itk_message(exc)}") from None
    f2m, m2m = syn.GetFixedToMiddleTransform(), syn.GetMovingToMiddleTransform()
    fields = {"fixed_to_middle": _field_array(f2m.GetDisplacementField()),
              "middle_to_fixed": _field_array(f2m.GetInverseDisplacementField()),
              "moving_to_middle": _field_array(m2m.GetDisplacementField()),
              "middle_to_moving": _field_array(m2m.GetInverseDisplacementField())}
    report = {"shrink": shrink,
              "iterations": len(values),
              "max_iterations": settings.iterations[level],
              "converged": bool(syn.GetIsConverged()),
              "metric_first": values[0] if values else None,
              "metric_last": values[-1] if values else None,
              "metric": [round(v, 6) for v in values],
              "seconds": round(time.perf_counter() - start, 3)}
    return fields, report


# ------------------------------------------------------------------------------ registration
def _prealign(source: Image, target: Image, k: int, kind: str) -> np.ndarray:
    """The pre-alignment matrix (target LPS mm -> source LPS mm) of channel ``k``, as ``combireg run``'s."""
    from ..api import PREALIGNMENT_RESOLUTIONS, PREALIGNMENT_SPACING_MM
    from ..preprocess import prealign

    return prealign(Image(source.data[k:k + 1], source.geometry), Image(target.data[k:k + 1], target.geometry),
                    kind=kind, working_spacing_mm=PREALIGNMENT_SPACING_MM, resolutions=PREALIGNMENT_RESOLUTIONS)


def register_syn(source: ImageLike, target: ImageLike, *, settings: SynSettings | str | os.PathLike | None = None,
                 shrink_factors: Sequence[int] | None = None, shrink_spacing: Sequence[float] | None = None,
                 iterations: Sequence[int] | None = None, cc_radius: int | None = None,
                 learning_rate: float | None = None, metric_channel: int | None = None,
                 pre_alignment: str | None = None, callback: Callable[[dict], None] | None = None) -> SynResult:
    """Register ``source`` to ``target`` with an affine pre-alignment, then ITK's SyN and neighbourhood cross-correlation.

    Parameters
    ----------
    source, target : Image, path, comma-separated paths or list of paths
        The two subjects, the same number of channels on both sides (channels of one side share
        a grid; the two sides may lie on different grids: SyN works in world coordinates).
        The target is ITK's fixed image.
    settings : SynSettings, path to a SyN parameter file, or None
        Defaults: :class:`SynSettings` (affine pre-alignment, levels 8 4 2 mm, at most 100 70 20
        iterations, CC radius 2, step 0.25, update/total variances 3/0).
    shrink_factors, shrink_spacing, iterations, cc_radius, learning_rate, metric_channel, pre_alignment : optional
        Override these fields of ``settings`` (levels given one way replace levels given the other).
    callback : callable, optional
        Receives ``{"stage": "syn", "level", "shrink", "iteration", "metric"}`` after every
        iteration, and ``{"stage": name}`` when the stages ``"pre_alignment"``, ``"field"`` and
        ``"warp"`` start.

    Returns
    -------
    SynResult
        ``.save(outdir)`` writes the outputs of ``combireg run``.

    Raises
    ------
    CombiregError
        Bad input or settings, or ITK or elastix failed (its message on one line).
    """
    itk = _itk()
    start = time.perf_counter()
    notify = callback or (lambda event: None)
    if settings is None:
        settings = SynSettings()
    elif not isinstance(settings, SynSettings):
        settings = read_syn_settings(settings)
    overrides = {name: value for name, value in (("shrink_factors", shrink_factors), ("shrink_spacing", shrink_spacing),
                                                 ("iterations", iterations), ("cc_radius", cc_radius),
                                                 ("learning_rate", learning_rate), ("metric_channel", metric_channel),
                                                 ("pre_alignment", pre_alignment)) if value is not None}
    new_levels = overrides.get("shrink_factors", overrides.get("shrink_spacing"))
    if new_levels is not None and "iterations" not in overrides and len(tuple(new_levels)) != settings.num_levels:
        raise CombiregError(f"{len(tuple(new_levels))} pyramid level(s) but {settings.num_levels} iteration "
                            f"count(s); give iterations per level too")
    settings = settings.with_changes(**overrides)
    from ..api import as_image_pair

    source_img, target_img = as_image_pair(source, target)
    channels = target_img.num_channels
    k = settings.metric_channel
    if k >= channels:
        raise CombiregError(f"metric_channel {k} does not exist: the images have {channels} channel(s)")
    t_prep = time.perf_counter() - start

    affine = None
    moving_img = source_img
    if settings.pre_alignment != "none":
        notify({"stage": "pre_alignment"})
        affine = _prealign(source_img, target_img, k, settings.pre_alignment)
        # SyN registers the source pulled back through the affine onto the target grid.
        from ..preprocess import warp_affine

        moving_img = warp_affine(Image(source_img.data[k:k + 1], source_img.geometry), affine, target_img.geometry)
    moving_k = 0 if affine is not None else k
    t_pre = time.perf_counter() - start - t_prep

    # state: the four accumulated fields (LPS mm) on the current level's target grid
    state: dict[str, np.ndarray] | None = None
    grid: Geometry | None = None
    levels = []
    with PoolThreader() as threader:
        for level in range(settings.num_levels):
            target_factors = settings.level_factors(level, target_img.geometry)
            source_factors = settings.level_factors(level, moving_img.geometry)
            fixed, level_grid = _level_image(target_img, k, target_factors)
            moving, _ = _level_image(moving_img, moving_k, source_factors)
            fixed_initial = moving_initial = None
            if state is not None:
                from ..warp import resample_field

                state = {name: resample_field(f, grid, level_grid) for name, f in state.items()}
                # Level k resumes from the middle space reached so far (module docstring).
                fixed_initial = _field_transform(state["middle_to_fixed"], level_grid)
                moving_initial = _field_transform(state["middle_to_moving"], level_grid)
            grid = level_grid
            new, report = _run_level(fixed, moving, settings, level, _level_label(settings, level, target_factors),
                                     fixed_initial, moving_initial, notify)
            if settings.shrink_spacing is not None:
                report["shrink_spacing_mm"] = settings.shrink_spacing[level]
            report["target_factors_xyz"] = [round(f, 4) for f in target_factors]
            report["source_factors_xyz"] = [round(f, 4) for f in source_factors]
            report["grid_size"] = list(level_grid.size)
            report["grid_spacing"] = [round(s, 6) for s in level_grid.spacing]
            levels.append(report)
            if state is None:
                state = new
            else:
                # to the middle: the old map first, then this level's; from the middle: the reverse
                state = {"fixed_to_middle": _compose(state["fixed_to_middle"], new["fixed_to_middle"], grid),
                         "moving_to_middle": _compose(state["moving_to_middle"], new["moving_to_middle"], grid),
                         "middle_to_fixed": _compose(new["middle_to_fixed"], state["middle_to_fixed"], grid),
                         "middle_to_moving": _compose(new["middle_to_moving"], state["middle_to_moving"], grid)}
    t_syn = time.perf_counter() - start - t_prep - t_pre

    notify({"stage": "field"})
    from ..warp import resample_field, undo_prealignment, warp_image

    # target x -> middle -> source, and source y -> middle -> target, as SyN's output transform
    u_grid = _compose(state["fixed_to_middle"], state["middle_to_moving"], grid)
    v_grid = _compose(state["moving_to_middle"], state["middle_to_fixed"], grid)
    del state
    u_mm = resample_field(u_grid, grid, target_img.geometry)
    if affine is None:
        # v is a field over source points stored on the (target) virtual grid: resampling it in
        # world coordinates puts it on the source grid (border values beyond the target's extent).
        v_mm = resample_field(v_grid, grid, source_img.geometry)
    else:
        # SyN's source was the source pulled back through A (see undo_prealignment).
        u_mm, v_mm = undo_prealignment(affine, u_mm, target_img.geometry, v_grid, grid, source_img.geometry)
    t_field = time.perf_counter() - start - t_prep - t_pre - t_syn
    notify({"stage": "warp"})
    warped = warp_image(source_img, target_img.geometry, u_mm)
    result = SynResult(u_mm, target_img.geometry, v_mm, source_img.geometry, warped, settings)
    total = time.perf_counter() - start
    result.report = _report(result, source_img, target_img, levels, threader.name, itk, affine,
                            {"preparation": t_prep, "pre_alignment": t_pre, "syn": t_syn, "field": t_field,
                             "warp": total - t_prep - t_pre - t_syn - t_field, "total": total})
    return result


def _report(result: SynResult, source: Image, target: Image, levels: list, threader: str, itk,
            affine: np.ndarray | None, seconds: dict) -> dict:
    from ..warp import field_statistics

    # |u(x) + v(x + u(x))|: how well the written inverse undoes the forward field (mm)
    back = sample_field_at(result.inverse_displacement_lps_mm, result.source_geometry, result.target_geometry,
                     result.displacement_lps_mm)
    residual = np.linalg.norm(result.displacement_lps_mm + back, axis=-1)
    return {
        "method": METHOD,
        "combireg_version": __version__,
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "itk": itk.Version.GetITKVersion()},
        "threader": threader,
        "threads": int(itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads()),
        "settings": result.settings.to_dict(),
        "metric": f"ANTSNeighborhoodCorrelation (radius {result.settings.cc_radius})",
        "metric_channel": result.settings.metric_channel,
        "channels_note": ("ITK's SyN takes one metric (no multi-metric in ITK's Python wheels): channel "
                          f"{result.settings.metric_channel} drives the registration, all channels are warped"),
        "pre_alignment": {"kind": result.settings.pre_alignment,
                          "affine_target_to_source_lps_mm": None if affine is None else affine.tolist()},
        "inverse": "SyN's own inverse (composition of the inverse middle fields), resampled onto the source grid"
                   + ("" if affine is None else ", composed with the pre-alignment's inverse"),
        "target": {"channels": target.num_channels, **target.geometry.to_dict()},
        "source": {"channels": source.num_channels, **source.geometry.to_dict()},
        "levels": levels,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "wall_time_s": round(seconds["total"], 3),
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        **field_statistics(result.displacement_lps_mm, result.target_geometry),
        "inverse_consistency_mm": {"mean": float(residual.mean()), "p99": float(np.percentile(residual, 99)),
                                   "max": float(residual.max())},
    }
