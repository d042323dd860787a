"""The parameter schemas: which keys a registration file and a DRN training file take, and the
settings they resolve into.

Both schemas are tables of :class:`~combireg.paramfile.KeySpec` (:data:`SCHEMA` and
:data:`TRAINING_SCHEMA`, each with its count rules in a :class:`~combireg.paramfile.Schema`:
:data:`REGISTRATION`, :data:`TRAINING`); the syntax (``(Key value ...)`` lines) and the one
key-by-key validation of any schema are :mod:`combireg.paramfile`'s. What each schema adds here
is its cross-key rules and its settings: :func:`settings_from_map` returns typed, fully resolved
:class:`Settings`, :func:`training_settings_from_map` :class:`TrainingSettings`.

Keys marked *per resolution* follow elastix's fallback rule: the key holds one to
``NumberOfResolutions`` values, and a level without its own value takes the *first* value
(``(MaximumNumberOfIterations 200 100)`` with three levels gives 200 100 200).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .paramfile import (
    CheckedMap,
    KeySpec,
    ParamMap,
    Schema,
    check_map,
    format_parameter_text,
    read_parameter_file,
)

__all__ = [
    "SCHEMA",
    "REGISTRATION",
    "METRICS",
    "OPTIMIZERS",
    "MAX_METRICS",
    "TRANSFORMS",
    "Settings",
    "format_parameter_map",
    "settings_from_map",
    "load_settings",
    "default_settings",
    "default_parameter_map",
    "default_parameter_text",
]

#: Similarity metrics the ``Metric`` key accepts. Adding one here is all the schema needs.
METRICS: tuple[str, ...] = ("MSE", "NCC", "GlobalNCC", "MI", "NGF")
#: Optimisers the ``Optimizer`` key accepts.
OPTIMIZERS: tuple[str, ...] = ("Adam",)
#: Pre-alignment before the deformable optimisation (itk-elastix), composed into the field.
PRE_ALIGNMENTS: tuple[str, ...] = ("none", "rigid", "affine")
#: How the metric weights are set: the Metric<n>Weight values, or balanced by gradient norms.
METRIC_WEIGHTINGS: tuple[str, ...] = ("fixed", "adaptive")
#: The transformation model: a dense displacement, or the exponential of a stationary velocity.
TRANSFORMS: tuple[str, ...] = ("Displacement", "Diffeomorphic")
#: Most squaring steps of the Diffeomorphic model (mirrors combireg.warp.MAX_SQUARING_STEPS;
#: params is a lower layer than warp, and test_params checks the two agree).
MAX_SQUARING_STEPS = 20
#: Keys written into a resolved parameter file only when the transform is not "Displacement",
#: so that every file written before they existed reads back unchanged.
TRANSFORM_KEYS: tuple[str, ...] = ("Transform", "NumberOfSquaringSteps")


def _orientation_codes() -> tuple[str, ...]:
    """The 48 three-letter codes (nibabel style: the directions the i, j, k axes point to)."""
    import itertools

    pairs = ("LR", "PA", "IS")
    codes = []
    for order in itertools.permutations(range(3)):
        for letters in itertools.product(*(pairs[a] for a in order)):
            codes.append("".join(letters))
    return tuple(sorted(codes))


#: Working-grid orientations: "none" keeps the target's voxel axes.
ORIENTATIONS: tuple[str, ...] = ("none",) + _orientation_codes()
#: Most metrics one run may combine.
MAX_METRICS = 4
#: How far the metric weights may sum away from 1 (they are usually written as decimals).
WEIGHT_SUM_TOLERANCE = 1e-6

WEIGHT_KEY = "Metric<n>Weight"

SCHEMA: tuple[KeySpec, ...] = (
    KeySpec(
        "Metric", "str", "metrics", ("MSE", "NCC"),
        f"Similarity metrics optimised simultaneously: 1 to {MAX_METRICS} of "
        f"{', '.join(METRICS)}, no duplicates.",
        choices=METRICS, distinct=True,
    ),
    KeySpec(
        WEIGHT_KEY, "float", "1", None,
        "Weight of metric n (n = 0, 1, ... in Metric order), >= 0; the weights must sum to 1 "
        "(default: equal weights).",
        minimum=0.0,
    ),
    KeySpec(
        "NCCWindowWidth", "float", "per-level", ("30", "14", "9"),
        "Width in mm of the local NCC window along every axis, > 0, per resolution: on each axis the "
        "window spans the odd number (>= 3) of that level's voxels closest to it. Used unless "
        "NCCWindowSize is given (not both).",
        minimum=0.0, minimum_exclusive=True,
    ),
    KeySpec(
        "NCCWindowSize", "int", "per-level", None,
        "Side length in voxels of the cubic local NCC window, odd and >= 3, per resolution (elastix-style, "
        "in voxels of each level; instead of NCCWindowWidth).",
        minimum=3, odd=True,
    ),
    KeySpec(
        "NumberOfHistogramBins", "int", "per-level", ("32",),
        "Joint-histogram bins per image of the MI metric (cubic B-spline Parzen window spanning 4 bins, "
        "so more bins also means a narrower window), >= 4, per resolution.",
        minimum=4,
    ),
    KeySpec(
        "RegularizationWeight", "float", "per-level", ("0.3", "0.1", "0.05"),
        "lambda of the diffusion regulariser lambda * |grad u|^2, >= 0, per resolution.",
        minimum=0.0,
    ),
    KeySpec(
        "BendingEnergyWeight", "float", "per-level", ("2",),
        "beta in mm^2 of the bending regulariser beta * sum_a |d^2 u / dx_a^2|^2 (mean squared second "
        "derivatives of the field along each grid axis, in 1/mm): zero for any affine field, so it smooths "
        "without resisting a large, smooth compression or expansion such as a tumour's mass effect, which "
        "lets RegularizationWeight be lower; >= 0, per resolution.",
        minimum=0.0,
    ),
    KeySpec(
        "NumberOfResolutions", "int", "1", ("3",),
        "Number of image pyramid levels, optimised coarse to fine.",
        minimum=1,
    ),
    KeySpec(
        "PyramidSpacing", "float", "per-level", ("8", "4", "2"),
        "Grid spacing in mm of each level, coarsest first (NumberOfResolutions values, non-increasing, > 0): "
        "on each axis the level keeps the image's spacing times max(1, PyramidSpacing / that spacing), so "
        "no level is finer than the image along an axis (a thick-slice axis is not shrunk further) and the "
        "field is optimised on the last level's grid and up-sampled. Used unless ImagePyramidSchedule is "
        "given (not both).",
        minimum=0.0, minimum_exclusive=True,
    ),
    KeySpec(
        "ImagePyramidSchedule", "int", "xyz-per-level", None,
        "Shrink factors x y z in voxels for each level, coarsest first (3 * NumberOfResolutions values, "
        "non-increasing; elastix's meaning, instead of PyramidSpacing); the last level need not be 1 1 1 "
        "(the field is then optimised on a coarser grid and up-sampled).",
        minimum=1,
    ),
    KeySpec(
        "MaximumNumberOfIterations", "int", "per-level", ("150", "80", "30"),
        "Optimiser iterations per resolution, >= 0.",
        minimum=0,
    ),
    KeySpec(
        "LearningRate", "float", "per-level", ("0.02", "0.01", "0.005"),
        "Adam step size per resolution, > 0, in normalised grid units (the [-1, 1] PyTorch "
        "grid_sample convention over the target's field of view).",
        minimum=0.0, minimum_exclusive=True,
    ),
    KeySpec(
        "WarmUpIterations", "int", "1", ("10",),
        "Iterations at the start of every resolution over which Adam's step rises linearly to LearningRate "
        "(iteration k of W uses (k + 1) / W of it), >= 0; 0 = the full step from the first iteration. Why: "
        "Adam's first steps move every voxel by about the full step whatever its gradient, noise that the "
        "finest level's 30 iterations spent a third of their time undoing; on the 21 varied development pairs "
        "10 lowered the TRE of every pair, by 2-13 % (7 % on average), at no cost.",
        minimum=0,
    ),
    KeySpec(
        "Optimizer", "str", "1", ("Adam",),
        f"Optimiser: {', '.join(OPTIMIZERS)}.",
        choices=OPTIMIZERS,
    ),
    KeySpec(
        "Transform", "str", "1", ("Displacement",),
        "Transformation model: \"Displacement\" (a dense displacement field u; target x -> source x + u(x)) or "
        "\"Diffeomorphic\" (a stationary velocity field v per level, the map is its exponential exp(v) by scaling "
        "and squaring, invertible by construction, and the written inverse is exactly exp(-v); "
        "RegularizationWeight and LearningRate then act on v). The written fields are displacements either way.",
        choices=TRANSFORMS,
    ),
    KeySpec(
        "NumberOfSquaringSteps", "int", "1", ("0",),
        f"Squaring steps N of the Diffeomorphic model, 0 to {MAX_SQUARING_STEPS}: exp(v) = (id + v / 2^N)^(2^N); "
        "0 = automatic, the smallest N >= 1 whose first step v / 2^N is at most a quarter voxel of the level "
        "everywhere, as a vector and as a Jacobian row sum (re-chosen every iteration; the numbers used are in "
        "report.json). Used when Transform is \"Diffeomorphic\".",
        minimum=0, maximum=MAX_SQUARING_STEPS,
    ),
    KeySpec(
        "Bidirectional", "bool", "1", ("false",),
        "Optimise the forward and the backward transform together, the paper's Eq. 1 (\"true\" or "
        "\"false\"); with \"false\" the backward field is the numerical inverse of the forward one.",
    ),
    KeySpec(
        "InverseConsistencyWeight", "float", "1", ("0",),
        "Weight of the penalty that couples the forward and backward transforms, >= 0 "
        "(used when Bidirectional is true).",
        minimum=0.0,
    ),
    KeySpec(
        "MetricWeighting", "str", "1", ("fixed",),
        "How the metrics are weighted: \"fixed\" (the Metric<n>Weight values) or \"adaptive\" (every "
        "MetricWeightingInterval iterations each weight is set proportional to Metric<n>Weight / |dSim_n/du|, "
        "the norm of that metric's gradient with respect to the fields, normalised to sum 1 and averaged with "
        "the previous weights, so that every metric moves the field about equally much; the mixed similarity "
        "is scaled so that its gradient keeps the size it has with the fixed weights, which keeps the meaning "
        "of RegularizationWeight; needs 2 or more metrics; the final weights of each level are in report.json).",
        choices=METRIC_WEIGHTINGS,
    ),
    KeySpec(
        "MetricWeightingInterval", "int", "1", ("10",),
        "Iterations between updates of the adaptive metric weights, >= 1 (used when MetricWeighting is "
        "\"adaptive\").",
        minimum=1,
    ),
    KeySpec(
        "CorrespondenceWeighting", "bool", "1", ("false",),
        "Missing-correspondence handling without a segmentation (\"true\" or \"false\"; needs Bidirectional "
        "\"true\"): where the forward and backward fields are not inverse to each other (forward-backward "
        "error e(x) = |u(x) + v(x + u(x))| mm, Gaussian-smoothed; e.g. a resection cavity) the similarity "
        "weight drops to w = exp(-(e / CorrespondenceErrorScale)^4), updated every CorrespondenceUpdateInterval "
        "iterations; empty background (normalised intensity <= 0.05) keeps w = 1; the final weight on the "
        "target grid is written as correspondence_weight.nii.gz.",
    ),
    KeySpec(
        "CorrespondenceErrorScale", "float", "1", ("2",),
        "Forward-backward error in mm at which the correspondence weight falls to exp(-1) = 0.37 (about 1 "
        "below half of it, about 0 above 1.5 times it), > 0.",
        minimum=0.0, minimum_exclusive=True,
    ),
    KeySpec(
        "CorrespondenceSmoothing", "float", "1", ("2",),
        "Standard deviation in mm of the Gaussian smoothing of the forward-backward error before it becomes "
        "a weight, >= 0.",
        minimum=0.0,
    ),
    KeySpec(
        "CorrespondenceMaximumExclusion", "float", "1", ("0.1",),
        "Cap on the excluded share of the image, mean(1 - w) over the voxels with content, > 0 and <= 0.5: "
        "when the errors would exclude more, the error scale is raised until exactly this share is excluded "
        "(only the largest errors then count), so the weight can never switch off most of the similarity.",
        minimum=0.0, minimum_exclusive=True, maximum=0.5,
    ),
    KeySpec(
        "CorrespondenceUpdateInterval", "int", "1", ("10",),
        "Iterations between updates of the correspondence weight, >= 1 (also updated at the start of each "
        "level and at the end).",
        minimum=1,
    ),
    KeySpec(
        "PreAlignment", "str", "1", ("rigid",),
        "Rigid or affine pre-alignment of the source to the target before the deformable optimisation: "
        "\"none\", \"rigid\" (default: centre-of-gravity start, then Mattes MI on 8 and 4 mm copies, in torch, "
        "about 1 s; measured on the varied benchmark it fixes large pose differences and never hurt) or "
        "\"affine\" (itk-elastix's affine map on 3 mm copies). Composed into the written fields (still one "
        "field on the target grid, target x -> source x + u(x)); skipped when an initial field is given.",
        choices=PRE_ALIGNMENTS,
    ),
    KeySpec(
        "SequenceChangeDetection", "bool", "1", ("true",),
        "Whether the run checks, after the pre-alignment, if source and target carry different sequences "
        "(\"true\" or \"false\"), by two statistics, each a mean over channel pairs: a score (the share of "
        "16 mm windows where the two images are anti-correlated plus how far their intensity relation is from "
        "linear, 1 - r^2 / correlation ratio) and the tissue order (the Spearman correlation of the other image "
        "over one image's brightest 30 % of head blocks, the larger of both directions; a T2 or FLAIR reverses "
        "white against grey matter). Where the score is above 0.35 or the tissue order below 0.28 (on the "
        "varied pairs: one sequence scored at most 0.30 with an order of at least 0.39; T1 against T2 or FLAIR "
        "an order of at most 0.18) the similarity settings of params/cross_sequence.txt replace the default's. "
        "Only when Metric, its weights, the NCC windows and MaximumNumberOfIterations are the built-in "
        "defaults: a file that sets its own is followed as written. report.json's \"sequences\" says what "
        "was measured and done.",
    ),
    KeySpec(
        "BiasFieldCorrection", "bool", "1", ("false",),
        "N4 bias-field correction (ITK) of both images before registration (\"true\" or \"false\"); "
        "warped outputs keep the original intensities.",
    ),
    KeySpec(
        "WorkingSpacing", "float", "1", ("0",),
        "Isotropic spacing in mm of the grid the field is optimised on (covering the target); 0 = the "
        "target's own grid. The fields are resampled onto the target grid at the end.",
        minimum=0.0,
    ),
    KeySpec(
        "WorkingOrientation", "str", "1", ("none",),
        "Orientation of the working grid's voxel axes, a code such as \"RAS\" or \"LPS\" (the directions "
        "the axes point to), or \"none\" for the target's own; matters for anisotropic NCC windows and "
        "pyramid factors, never for the world-space result's convention.",
        choices=ORIENTATIONS,
    ),
    KeySpec(
        "Seed", "int", "1", ("0",),
        "Random seed, for reproducible runs (0 to 2^32 - 1).",
        # Why the cap: numpy's legacy seeding rejects larger values.
        minimum=0, maximum=2**32 - 1,
    ),
    KeySpec(
        "NormalizationPercentiles", "float", "2", ("0.5", "99.5"),
        "Per-channel robust intensity normalisation: percentiles lo < hi (0..100) mapped to 0 "
        "and 1.",
        minimum=0.0, maximum=100.0, increasing=True,
    ),
    KeySpec(
        "NumberOfThreads", "int", "1", ("0",),
        "CPU threads for torch; 0 = all cores.",
        minimum=0,
    ),
)

_SPECS: dict[str, KeySpec] = {spec.name: spec for spec in SCHEMA}

#: Count rules of the registration keys: (fewest, most or None, wording). "metrics" is one value
#: per metric; per-level keys hold 1 to NumberOfResolutions values (checked across keys).
_COUNTS = {
    "1": (1, 1, "exactly 1 value"),
    "2": (2, 2, "exactly 2 values"),
    "metrics": (1, MAX_METRICS, f"1 to {MAX_METRICS} values"),
    "per-level": (1, None, "at least 1 value"),
    "xyz-per-level": (1, None, "at least 1 value"),
}
#: The registration schema: what :func:`settings_from_map` validates a map against.
REGISTRATION = Schema(SCHEMA, _COUNTS, indexed=MAX_METRICS)

# Only canonical indices: "Metric01Weight" is not Metric1Weight.
_WEIGHT_RE = re.compile(r"Metric(0|[1-9][0-9]*)Weight\Z")


def _weight_key(index: int) -> str:
    return f"Metric{index}Weight"


def format_parameter_map(pm: Mapping[str, Sequence[str]], *, comments: bool = False) -> str:
    """Write a registration parameter map as elastix parameter-file text.

    :func:`combireg.paramfile.format_parameter_text` with the registration schema: string and
    bool keys are written quoted, and ``comments`` puts each known key's description as a
    ``//`` comment above it. ``parse_text(format_parameter_map(pm)) == pm``.

    Raises
    ------
    CombiregError
        If a key or value cannot be written (bad key name, value with a quote or line break).
    """
    return format_parameter_text(pm, REGISTRATION, comments=comments)


# --------------------------------------------------------------------------------------------
# Settings and validation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Validated, fully resolved registration settings (one value per resolution level).

    ``source`` (the file name, or ``"<defaults>"``) does not take part in comparisons.
    """

    metrics: tuple[str, ...]
    metric_weights: tuple[float, ...]
    #: NCC window per level in voxels (NCCWindowSize); empty when ``ncc_window_mm`` rules.
    ncc_window: tuple[int, ...]
    regularization_weight: tuple[float, ...]
    num_levels: int
    #: Shrink factors x y z per level in voxels (ImagePyramidSchedule); empty when ``pyramid_spacing`` rules.
    pyramid_schedule: tuple[tuple[int, int, int], ...]
    iterations: tuple[int, ...]
    learning_rate: tuple[float, ...]
    optimizer: str
    bidirectional: bool
    inverse_consistency_weight: float
    seed: int
    normalization_percentiles: tuple[float, float]
    num_threads: int
    pre_alignment: str = "none"
    bias_field_correction: bool = False
    working_spacing: float = 0.0
    working_orientation: str = "none"
    metric_weighting: str = "fixed"
    metric_weighting_interval: int = 10
    correspondence_weighting: bool = False
    correspondence_error_scale: float = 2.0
    correspondence_smoothing: float = 2.0
    correspondence_max_exclusion: float = 0.1
    correspondence_interval: int = 10
    # Why a default: fields added after the first release keep direct construction working;
    # settings_from_map always gives one value per level.
    histogram_bins: tuple[int, ...] = (32,)
    #: beta of the bending-energy term per level (BendingEnergyWeight).
    bending_weight: tuple[float, ...] = (0.0,)
    #: Level spacing in mm per level (PyramidSpacing); empty: ``pyramid_schedule`` (voxels) rules.
    pyramid_spacing: tuple[float, ...] = ()
    #: Local NCC window width in mm per level (NCCWindowWidth); empty: ``ncc_window`` (voxels) rules.
    ncc_window_mm: tuple[float, ...] = ()
    #: "Displacement" or "Diffeomorphic" (Transform).
    transform: str = "Displacement"
    #: Squaring steps of the Diffeomorphic model, 0 = automatic (NumberOfSquaringSteps).
    squaring_steps: int = 0
    #: Iterations of the linear rise of Adam's step at the start of every level (WarmUpIterations).
    warm_up_iterations: int = 10
    #: Switch to the cross-sequence similarity when the sides differ (SequenceChangeDetection).
    sequence_change_detection: bool = False
    source: str = field(default="<defaults>", compare=False)

    @property
    def diffeomorphic(self) -> bool:
        """Whether the optimised fields are stationary velocities (``Transform "Diffeomorphic"``)."""
        return self.transform == "Diffeomorphic"

    def to_parameter_map(self) -> ParamMap:
        """Every key, resolved (per-level keys with one value per level): reproduces the run."""
        pm: ParamMap = {"Metric": tuple(self.metrics)}
        for i, weight in enumerate(self.metric_weights):
            pm[_weight_key(i)] = (_fmt_float(weight),)
        if self.ncc_window_mm:
            pm["NCCWindowWidth"] = tuple(_fmt_float(v) for v in self.ncc_window_mm)
        else:
            pm["NCCWindowSize"] = tuple(str(int(v)) for v in self.ncc_window)
        pm["NumberOfHistogramBins"] = tuple(str(int(v)) for v in self.histogram_bins)
        pm["RegularizationWeight"] = tuple(_fmt_float(v) for v in self.regularization_weight)
        pm["BendingEnergyWeight"] = tuple(_fmt_float(v) for v in self.bending_weight)
        pm["NumberOfResolutions"] = (str(int(self.num_levels)),)
        if self.pyramid_spacing:
            pm["PyramidSpacing"] = tuple(_fmt_float(v) for v in self.pyramid_spacing)
        else:
            pm["ImagePyramidSchedule"] = tuple(str(int(f)) for lvl in self.pyramid_schedule for f in lvl)
        pm["MaximumNumberOfIterations"] = tuple(str(int(v)) for v in self.iterations)
        pm["LearningRate"] = tuple(_fmt_float(v) for v in self.learning_rate)
        pm["WarmUpIterations"] = (str(int(self.warm_up_iterations)),)
        pm["Optimizer"] = (self.optimizer,)
        if self.transform != "Displacement":
            pm["Transform"] = (self.transform,)
            pm["NumberOfSquaringSteps"] = (str(int(self.squaring_steps)),)
        pm["Bidirectional"] = ("true" if self.bidirectional else "false",)
        pm["InverseConsistencyWeight"] = (_fmt_float(self.inverse_consistency_weight),)
        pm["MetricWeighting"] = (self.metric_weighting,)
        pm["MetricWeightingInterval"] = (str(int(self.metric_weighting_interval)),)
        pm["CorrespondenceWeighting"] = ("true" if self.correspondence_weighting else "false",)
        pm["CorrespondenceErrorScale"] = (_fmt_float(self.correspondence_error_scale),)
        pm["CorrespondenceSmoothing"] = (_fmt_float(self.correspondence_smoothing),)
        pm["CorrespondenceMaximumExclusion"] = (_fmt_float(self.correspondence_max_exclusion),)
        pm["CorrespondenceUpdateInterval"] = (str(int(self.correspondence_interval)),)
        pm["PreAlignment"] = (self.pre_alignment,)
        pm["SequenceChangeDetection"] = ("true" if self.sequence_change_detection else "false",)
        pm["BiasFieldCorrection"] = ("true" if self.bias_field_correction else "false",)
        pm["WorkingSpacing"] = (_fmt_float(self.working_spacing),)
        pm["WorkingOrientation"] = (self.working_orientation,)
        pm["Seed"] = (str(int(self.seed)),)
        pm["NormalizationPercentiles"] = tuple(_fmt_float(v) for v in self.normalization_percentiles)
        pm["NumberOfThreads"] = (str(int(self.num_threads)),)
        return pm

    def replace(self, **changes) -> "Settings":
        """A copy with some fields changed, validated like a parameter file.

        Per-level tuples shorter than ``num_levels`` are filled by the first-value fallback.
        When ``num_levels`` changes, per-level fields not given are cut to the new number of
        levels (and filled by the fallback), and an unspecified pyramid becomes the default
        for that many levels. A pyramid or NCC window given in voxels (``pyramid_schedule``,
        ``ncc_window``) replaces the one in mm (``pyramid_spacing``, ``ncc_window_mm``) and vice
        versa. When ``metrics`` changes without
        ``metric_weights``, the weights become equal.

        Raises
        ------
        CombiregError
            If the result is not valid (message prefixed with ``Settings.replace``).
        """
        # A pyramid or NCC window given one way replaces the other way of giving it.
        for voxels, mm in (("pyramid_schedule", "pyramid_spacing"), ("ncc_window", "ncc_window_mm")):
            if voxels in changes and mm not in changes:
                changes = {**changes, mm: ()}
            elif mm in changes and voxels not in changes:
                changes = {**changes, voxels: ()}
        changed = dataclasses.replace(self, **changes)
        pm = changed.to_parameter_map()
        if changed.num_levels != self.num_levels:
            _refit_levels(pm, changed.num_levels, given=changes)
        if changed.metrics != self.metrics and "metric_weights" not in changes:
            # Old weights belong to the old metrics; fall back to equal weights.
            for i in range(len(self.metric_weights)):
                pm.pop(_weight_key(i), None)
        validated = settings_from_map(pm, source="Settings.replace")
        return dataclasses.replace(validated, source=changed.source)


# Field name in Settings -> key in a parameter file, for per-level fields.
_PER_LEVEL_FIELDS = {
    "histogram_bins": "NumberOfHistogramBins",
    "regularization_weight": "RegularizationWeight",
    "bending_weight": "BendingEnergyWeight",
    "iterations": "MaximumNumberOfIterations",
    "learning_rate": "LearningRate",
}


def _refit_levels(pm: ParamMap, num_levels: int, given: Mapping[str, object]) -> None:
    """Adapt per-level entries the caller did not set to a new number of levels, in place."""
    for name, key in {**_PER_LEVEL_FIELDS, "ncc_window": "NCCWindowSize", "ncc_window_mm": "NCCWindowWidth"}.items():
        if name not in given and key in pm:
            pm[key] = pm[key][:num_levels]
    if "pyramid_schedule" not in given:
        pm.pop("ImagePyramidSchedule", None)
    if "pyramid_spacing" not in given:
        pm.pop("PyramidSpacing", None)


def _fmt_float(value: float) -> str:
    # repr is the shortest text that reads back as the same float: exact round trips.
    return repr(float(value))


def _per_level(key: str, checked: CheckedMap, num_levels: int, levels_note: str) -> tuple:
    """Per-level values of ``key`` with the first-value fallback."""
    if checked.given(key):
        values = checked.typed[key]
        if len(values) > num_levels:
            raise checked.error(
                key,
                f"{key} expects 1 to {num_levels} values (one per resolution; "
                f"NumberOfResolutions is {num_levels}{levels_note}), got {len(values)}",
            )
    else:
        # Defaults follow the same rule, cut to the number of levels.
        values = checked.values(key, limit=num_levels)
    return values + (values[0],) * (num_levels - len(values))


def _default_schedule(num_levels: int) -> tuple[tuple[int, int, int], ...]:
    return tuple((2 ** (num_levels - lvl),) * 3 for lvl in range(num_levels))


def _schedule(checked: CheckedMap, num_levels: int, levels_note: str) -> tuple[tuple[int, int, int], ...]:
    key = "ImagePyramidSchedule"
    if not checked.given(key):
        return _default_schedule(num_levels)
    flat = checked.typed[key]
    if len(flat) != 3 * num_levels:
        raise checked.error(
            key,
            f"{key} expects {3 * num_levels} values (x y z for each of {num_levels} "
            f"resolution{'s' if num_levels != 1 else ''}; NumberOfResolutions is "
            f"{num_levels}{levels_note}), got {len(flat)}",
        )
    levels = tuple(tuple(flat[3 * i:3 * i + 3]) for i in range(num_levels))
    for lvl in range(1, num_levels):
        if any(f > c for f, c in zip(levels[lvl], levels[lvl - 1])):
            raise checked.error(
                key,
                f"{key}: level {lvl} factors {' '.join(map(str, levels[lvl]))} are larger than "
                f"level {lvl - 1} factors {' '.join(map(str, levels[lvl - 1]))} "
                "(levels go coarse to fine; factors must not increase)",
            )
    return levels


def _pyramid(checked: CheckedMap, num_levels: int, levels_note: str) -> dict:
    """``pyramid_schedule`` (voxels) and ``pyramid_spacing`` (mm; empty when the schedule rules)."""
    key = "PyramidSpacing"
    if checked.given("ImagePyramidSchedule"):
        if checked.given(key):
            raise checked.error(key, "give the pyramid either in mm (PyramidSpacing) or in voxels "
                                     f"(ImagePyramidSchedule{checked.line_note('ImagePyramidSchedule')}), not both")
        return {"pyramid_schedule": _schedule(checked, num_levels, levels_note), "pyramid_spacing": ()}
    if checked.given(key):
        spacing = checked.typed[key]
        if len(spacing) != num_levels:
            raise checked.error(key, f"{key} expects {num_levels} value{'s' if num_levels != 1 else ''} (one per "
                                     f"resolution, coarsest first; NumberOfResolutions is {num_levels}{levels_note}), "
                                     f"got {len(spacing)}")
        for lvl in range(1, num_levels):
            if spacing[lvl] > spacing[lvl - 1]:
                raise checked.error(key, f"{key}: level {lvl} ({spacing[lvl]:g} mm) is coarser than level {lvl - 1} "
                                         f"({spacing[lvl - 1]:g} mm); levels go coarse to fine")
    else:
        # The default halves per level down to 2 mm (for three levels: 8, 4, 2).
        spacing = tuple(float(2 ** (num_levels - lvl)) for lvl in range(num_levels))
    return {"pyramid_schedule": (), "pyramid_spacing": tuple(float(v) for v in spacing)}


def _ncc_windows(checked: CheckedMap, num_levels: int, levels_note: str) -> dict:
    """``ncc_window`` (voxels) and ``ncc_window_mm`` (mm; empty when the voxel sizes rule)."""
    if checked.given("NCCWindowSize"):
        if checked.given("NCCWindowWidth"):
            raise checked.error("NCCWindowWidth", "give the NCC window either in mm (NCCWindowWidth) or in voxels "
                                                  f"(NCCWindowSize{checked.line_note('NCCWindowSize')}), not both")
        return {"ncc_window": _per_level("NCCWindowSize", checked, num_levels, levels_note), "ncc_window_mm": ()}
    widths = _per_level("NCCWindowWidth", checked, num_levels, levels_note)
    return {"ncc_window": (), "ncc_window_mm": tuple(float(w) for w in widths)}


def _metric_weights(checked: CheckedMap, metrics: tuple[str, ...]) -> tuple[float, ...]:
    """Weights per metric (given or equal), checked for count and sum."""
    for key in sorted((k for k in checked.typed if _WEIGHT_RE.match(k)), key=checked.line):
        index = int(_WEIGHT_RE.match(key).group(1))
        if index >= len(metrics):
            raise checked.error(
                key,
                f"{key} has no metric: Metric lists {len(metrics)}{checked.line_note('Metric')}, "
                f"so the weight keys are Metric0Weight to {_weight_key(len(metrics) - 1)}",
            )
    weights = tuple(
        checked.typed[_weight_key(i)][0] if checked.given(_weight_key(i)) else 1.0 / len(metrics)
        for i in range(len(metrics))
    )
    total = math.fsum(weights)
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        given = [_weight_key(i) for i in range(len(metrics)) if checked.given(_weight_key(i))]
        blame = max(given, key=checked.line) if given else "Metric"
        parts = ", ".join(
            f"{_weight_key(i)} {w:g}" + ("" if checked.given(_weight_key(i)) else " (default)")
            for i, w in enumerate(weights)
        )
        raise checked.error(blame, f"metric weights must sum to 1, got {total:g} ({parts})")
    return weights


def _weighting_settings(checked: CheckedMap, metrics: tuple[str, ...]) -> dict:
    """Settings fields of the adaptive metric weights and the correspondence weighting, cross-checked."""
    weighting = checked.single("MetricWeighting")
    if weighting == "adaptive" and len(metrics) < 2:
        raise checked.error("MetricWeighting", f"MetricWeighting \"adaptive\" balances 2 or more metrics; "
                                           f"Metric lists {len(metrics)}{checked.line_note('Metric')}")
    correspondence = checked.single("CorrespondenceWeighting")
    if correspondence and not checked.single("Bidirectional"):
        raise checked.error("CorrespondenceWeighting", "CorrespondenceWeighting \"true\" compares the forward and "
                                                   "backward fields, so it needs (Bidirectional \"true\")")
    return dict(
        metric_weighting=weighting,
        metric_weighting_interval=checked.single("MetricWeightingInterval"),
        correspondence_weighting=correspondence,
        correspondence_error_scale=float(checked.single("CorrespondenceErrorScale")),
        correspondence_smoothing=float(checked.single("CorrespondenceSmoothing")),
        correspondence_max_exclusion=float(checked.single("CorrespondenceMaximumExclusion")),
        correspondence_interval=checked.single("CorrespondenceUpdateInterval"),
    )


def settings_from_map(pm: Mapping[str, Sequence[str]], *, source: str | None = None) -> Settings:
    """Validate a raw parameter map and resolve it into :class:`Settings`.

    Parameters
    ----------
    pm : ParamMap
        Raw map; missing keys take their defaults. A :class:`~combireg.paramfile.ParsedParamMap`
        (from :func:`~combireg.paramfile.parse_text` / :func:`~combireg.paramfile.read_parameter_file`)
        gives errors with line numbers.
    source : str, optional
        Name for messages and ``Settings.source``; default: ``pm.source`` if it has one,
        else ``"<string>"``.

    Returns
    -------
    Settings

    Raises
    ------
    CombiregError
        ``SOURCE:LINE: ...`` (``SOURCE: ...`` without line numbers) for an unknown key
        (with the nearest known key as a suggestion), a value of the wrong type, count or
        range, or keys that disagree with each other.
    """
    checked = check_map(pm, REGISTRATION, source=source)

    metrics = checked.values("Metric")
    weights = _metric_weights(checked, metrics)
    num_levels = checked.single("NumberOfResolutions")
    levels_note = checked.line_note("NumberOfResolutions")
    per_level = {
        name: _per_level(key, checked, num_levels, levels_note)
        for name, key in _PER_LEVEL_FIELDS.items()
    }
    return Settings(
        metrics=metrics,
        metric_weights=weights,
        num_levels=num_levels,
        **_pyramid(checked, num_levels, levels_note),
        **_ncc_windows(checked, num_levels, levels_note),
        optimizer=checked.single("Optimizer"),
        bidirectional=checked.single("Bidirectional"),
        inverse_consistency_weight=checked.single("InverseConsistencyWeight"),
        seed=checked.single("Seed"),
        normalization_percentiles=checked.values("NormalizationPercentiles"),
        num_threads=checked.single("NumberOfThreads"),
        pre_alignment=checked.single("PreAlignment"),
        sequence_change_detection=checked.single("SequenceChangeDetection"),
        bias_field_correction=checked.single("BiasFieldCorrection"),
        working_spacing=float(checked.single("WorkingSpacing")),
        working_orientation=checked.single("WorkingOrientation"),
        transform=checked.single("Transform"),
        squaring_steps=checked.single("NumberOfSquaringSteps"),
        warm_up_iterations=checked.single("WarmUpIterations"),
        **_weighting_settings(checked, metrics),
        source=checked.source,
        **per_level,
    )


def load_settings(path: str | os.PathLike | None = None) -> Settings:
    """Settings from a parameter file, or the defaults when ``path`` is None.

    Raises
    ------
    CombiregError
        If the file is missing, unreadable or invalid.
    """
    if path is None:
        return default_settings()
    return settings_from_map(read_parameter_file(path), source=os.fspath(path))


def default_settings() -> Settings:
    """The built-in defaults (``source == "<defaults>"``)."""
    return settings_from_map({}, source="<defaults>")


def default_parameter_map() -> ParamMap:
    """Every key with its default value, resolved per level."""
    return default_settings().to_parameter_map()


_DEFAULT_HEADER = """\
// combireg default parameters (elastix parameter-file syntax).
// One (Key value ...) entry per line; // starts a comment; strings are quoted.
// Keys marked "per resolution" take 1 to NumberOfResolutions values; a level
// without its own value uses the first one.
"""


_OPTIONAL_HEADER = """\
// Keys written only when set away from their defaults (shown commented out):
"""


def default_parameter_text() -> str:
    """The complete default parameter file, each key preceded by its description.

    This is what ``combireg params defaults`` prints; parsing it gives
    :func:`default_settings`. The :data:`TRANSFORM_KEYS` follow at the end, commented out
    with their defaults (a resolved file lists them only for a non-default transform).
    """
    optional = {key: _SPECS[key].default for key in TRANSFORM_KEYS}
    lines = format_parameter_map(optional, comments=True).splitlines()
    commented = "\n".join(line if not line or line.startswith("//") else "// " + line for line in lines)
    return (_DEFAULT_HEADER + "\n" + format_parameter_map(default_parameter_map(), comments=True) + "\n"
            + _OPTIONAL_HEADER + commented + "\n")


# --------------------------------------------------------------------------------------------
# Training parameters of the DRN (``combireg train -p params/drn_train.txt``)
# --------------------------------------------------------------------------------------------
# The same syntax, parser and error messages as the registration parameters, with a schema of
# its own: the loss keys of Eq. 1 (one value each, the network has no pyramid) plus the
# training keys. Two count rules exist only here: "xyz" (exactly 3 values) and "features"
# (1 to MAX_NETWORK_LEVELS values).

#: Most encoder levels of the DRN (``NetworkFeatures`` values).
MAX_NETWORK_LEVELS = 6

TRAINING_SCHEMA: tuple[KeySpec, ...] = (
    _SPECS["Metric"],
    _SPECS[WEIGHT_KEY],
    KeySpec(
        "NCCWindowSize", "int", "1", ("5",),
        "Side length in voxels (of the internal grid) of the cubic local NCC window, odd and >= 3.",
        minimum=3, odd=True,
    ),
    KeySpec(
        "RegularizationWeight", "float", "1", ("0.3",),
        "lambda of the diffusion regulariser lambda * (|grad u_st|^2 + |grad u_ts|^2), >= 0 (one value: "
        "the network predicts on one grid).",
        minimum=0.0,
    ),
    KeySpec(
        "LearningRate", "float", "1", ("0.0001",),
        "Adam learning rate, > 0 (the paper: 1e-4).",
        minimum=0.0, minimum_exclusive=True,
    ),
    _SPECS["Optimizer"],
    KeySpec(
        "NumberOfEpochs", "int", "1", ("50",),
        "Passes over the training cases, >= 1.",
        minimum=1,
    ),
    KeySpec(
        "BatchSize", "int", "1", ("1",),
        "Pairs per optimiser step, >= 1.",
        minimum=1,
    ),
    KeySpec(
        "ValidationFraction", "float", "1", ("0.1",),
        "Fraction of the cases held out for validation (the kept model has the lowest validation loss), "
        "0 to 0.5.",
        minimum=0.0, maximum=0.5,
    ),
    KeySpec(
        "TestFraction", "float", "1", ("0.1",),
        "Fraction of the cases held out as a test set (never trained or selected on; its loss is "
        "reported at the end), 0 to 0.5.",
        minimum=0.0, maximum=0.5,
    ),
    KeySpec(
        "InternalGridSize", "int", "xyz", ("48", "56", "48"),
        "Voxels x y z of the fixed grid the network sees: the target's field of view resampled (the "
        "source is resampled into target space first), each >= 8.",
        minimum=8, maximum=512,
    ),
    KeySpec(
        "NetworkFeatures", "int", "features", ("8", "16", "32", "32"),
        f"Feature channels of the U-Net's encoder levels, finest first (1 to {MAX_NETWORK_LEVELS} "
        "levels; each level halves the resolution).",
        minimum=1, maximum=256,
    ),
    KeySpec(
        "Augmentation", "bool", "1", ("true",),
        "Random left-right flips of the internal grid's x axis and small per-channel intensity gamma "
        "changes of the training pairs, drawn anew every epoch (\"true\" or \"false\").",
    ),
    KeySpec(
        "KeepBest", "bool", "1", ("true",),
        "Write the epoch with the lowest validation loss (\"true\") or the last epoch (\"false\").",
    ),
    _SPECS["Seed"],
    _SPECS["NormalizationPercentiles"],
    _SPECS["NumberOfThreads"],
)

#: The DRN training schema: the registration counts plus "xyz" (exactly 3 values) and "features".
TRAINING = Schema(TRAINING_SCHEMA, {**_COUNTS, "xyz": (3, 3, "exactly 3 values (x y z)"),
                                    "features": (1, MAX_NETWORK_LEVELS, f"1 to {MAX_NETWORK_LEVELS} values")},
                  indexed=MAX_METRICS, foreign=REGISTRATION,
                  foreign_note=" (a registration key; DRN training files take the training keys)")


@dataclass(frozen=True)
class TrainingSettings:
    """Validated DRN training parameters (see :data:`TRAINING_SCHEMA`).

    ``internal_size`` is x y z (ITK order, as written in the file); ``source`` does not take
    part in comparisons.
    """

    metrics: tuple[str, ...]
    metric_weights: tuple[float, ...]
    ncc_window: int
    regularization_weight: float
    learning_rate: float
    optimizer: str
    epochs: int
    batch_size: int
    validation_fraction: float
    test_fraction: float
    internal_size: tuple[int, int, int]
    features: tuple[int, ...]
    augmentation: bool
    keep_best: bool
    seed: int
    normalization_percentiles: tuple[float, float]
    num_threads: int
    source: str = field(default="<defaults>", compare=False)

    @property
    def internal_shape(self) -> tuple[int, int, int]:
        """The internal grid as an array shape (Z, Y, X)."""
        return tuple(reversed(self.internal_size))

    def to_parameter_map(self) -> ParamMap:
        """Every key, resolved: ``combireg train -p`` with this map reproduces the training."""
        pm: ParamMap = {"Metric": tuple(self.metrics)}
        for i, weight in enumerate(self.metric_weights):
            pm[_weight_key(i)] = (_fmt_float(weight),)
        pm["NCCWindowSize"] = (str(int(self.ncc_window)),)
        pm["RegularizationWeight"] = (_fmt_float(self.regularization_weight),)
        pm["LearningRate"] = (_fmt_float(self.learning_rate),)
        pm["Optimizer"] = (self.optimizer,)
        pm["NumberOfEpochs"] = (str(int(self.epochs)),)
        pm["BatchSize"] = (str(int(self.batch_size)),)
        pm["ValidationFraction"] = (_fmt_float(self.validation_fraction),)
        pm["TestFraction"] = (_fmt_float(self.test_fraction),)
        pm["InternalGridSize"] = tuple(str(int(v)) for v in self.internal_size)
        pm["NetworkFeatures"] = tuple(str(int(v)) for v in self.features)
        pm["Augmentation"] = ("true" if self.augmentation else "false",)
        pm["KeepBest"] = ("true" if self.keep_best else "false",)
        pm["Seed"] = (str(int(self.seed)),)
        pm["NormalizationPercentiles"] = tuple(_fmt_float(v) for v in self.normalization_percentiles)
        pm["NumberOfThreads"] = (str(int(self.num_threads)),)
        return pm

    def to_text(self) -> str:
        """The resolved parameter file (elastix syntax)."""
        return format_parameter_text(self.to_parameter_map(), TRAINING)

    def replace(self, **changes) -> "TrainingSettings":
        """A copy with some fields changed, validated like a parameter file.

        Raises
        ------
        CombiregError
            If the result is not valid (message prefixed with ``TrainingSettings.replace``).
        """
        # A pyramid or NCC window given one way replaces the other way of giving it.
        for voxels, mm in (("pyramid_schedule", "pyramid_spacing"), ("ncc_window", "ncc_window_mm")):
            if voxels in changes and mm not in changes:
                changes = {**changes, mm: ()}
            elif mm in changes and voxels not in changes:
                changes = {**changes, voxels: ()}
        changed = dataclasses.replace(self, **changes)
        pm = changed.to_parameter_map()
        if changed.metrics != self.metrics and "metric_weights" not in changes:
            for i in range(len(self.metric_weights)):
                pm.pop(_weight_key(i), None)
        validated = training_settings_from_map(pm, source="TrainingSettings.replace")
        return dataclasses.replace(validated, source=changed.source)


def training_settings_from_map(pm: Mapping[str, Sequence[str]], *, source: str | None = None) -> TrainingSettings:
    """Validate a raw DRN training parameter map (missing keys take their defaults).

    Raises
    ------
    CombiregError
        ``SOURCE:LINE: ...`` as :func:`settings_from_map`.
    """
    checked = check_map(pm, TRAINING, source=source)
    values = checked.values
    metrics = values("Metric")
    weights = _metric_weights(checked, metrics)
    validation, test = values("ValidationFraction")[0], values("TestFraction")[0]
    if validation + test >= 1.0:
        blame = max(("ValidationFraction", "TestFraction"), key=checked.line)
        raise checked.error(blame, f"ValidationFraction + TestFraction must be < 1, got {validation:g} + {test:g}")
    return TrainingSettings(
        metrics=metrics,
        metric_weights=weights,
        ncc_window=values("NCCWindowSize")[0],
        regularization_weight=float(values("RegularizationWeight")[0]),
        learning_rate=float(values("LearningRate")[0]),
        optimizer=values("Optimizer")[0],
        epochs=values("NumberOfEpochs")[0],
        batch_size=values("BatchSize")[0],
        validation_fraction=float(validation),
        test_fraction=float(test),
        internal_size=tuple(values("InternalGridSize")),
        features=tuple(values("NetworkFeatures")),
        augmentation=values("Augmentation")[0],
        keep_best=values("KeepBest")[0],
        seed=values("Seed")[0],
        normalization_percentiles=tuple(float(v) for v in values("NormalizationPercentiles")),
        num_threads=values("NumberOfThreads")[0],
        source=checked.source,
    )


def load_training_settings(path: str | os.PathLike | None = None) -> TrainingSettings:
    """DRN training settings from a parameter file, or the defaults when ``path`` is None.

    Raises
    ------
    CombiregError
        If the file is missing, unreadable or invalid.
    """
    if path is None:
        return default_training_settings()
    return training_settings_from_map(read_parameter_file(path), source=os.fspath(path))


def default_training_settings() -> TrainingSettings:
    """The built-in DRN training defaults (``source == "<defaults>"``)."""
    return training_settings_from_map({}, source="<defaults>")


__all__ += [
    "TRAINING_SCHEMA",
    "TRAINING",
    "TrainingSettings",
    "training_settings_from_map",
    "load_training_settings",
    "default_training_settings",
]
