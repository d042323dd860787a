"""``combireg.register``: the one-call Python API, and its :class:`Result`."""
from __future__ import annotations

import logging
import os
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch

from .errors import CombiregError
from .geometry import Geometry
from .image import Image
from .outputs import CORRESPONDENCE_WEIGHT_NAME, OUTPUT_KINDS, OutputWriter, output_kinds, write_outputs
from .optimize import FieldPair, normalise_intensities, optimise_fields
from .paramfile import ParamMap
from .params import Settings, format_parameter_map, load_settings, settings_from_map
from .pyramid import pyramid_levels
from .quality import self_check
from .rigid import rigid_align
from .sequences import settings_for_sequences
from .version import __version__
from .warp import (
    compose_affine,
    field_statistics,
    invert_normalised,
    lps_mm_to_normalised,
    normalised_to_lps_mm,
    resample_field,
    resample_image,
    undo_prealignment_inverse,
    upsample_normalised,
    warp_image,
    warp_image_affine,
)

__all__ = ["register", "Result", "as_image", "as_image_pair", "estimate_memory_bytes", "available_memory_bytes"]

log = logging.getLogger(__name__)

ImageLike = Union[Image, str, os.PathLike, Sequence[Union[str, os.PathLike]]]

@dataclass
class Result:
    """What a registration produced.

    Attributes
    ----------
    displacement_lps_mm : ndarray, (Z, Y, X, 3)
        Forward field on the target grid: target point x maps to source point x + u(x).
    target_geometry : Geometry
    inverse_displacement_lps_mm : ndarray, (Z', Y', X', 3), or None
        Backward field on the source grid: source point y maps to target point y + v(y); None
        when ``register(..., outputs=...)`` did not ask for ``"inverse"``.
    source_geometry : Geometry
    warped : Image or None
        Source channels warped into target space, original intensities; None when ``outputs``
        did not ask for ``"warped"``.
    settings : Settings
    report : dict
    correspondence_weight : Image or None
        With ``(CorrespondenceWeighting "true")``: the final similarity weight in [0, 1] on the
        target grid, low where the forward and backward fields disagree (missing
        correspondence, e.g. a resection cavity); None otherwise.
    """

    displacement_lps_mm: np.ndarray
    target_geometry: Geometry
    inverse_displacement_lps_mm: np.ndarray | None
    source_geometry: Geometry
    warped: Image | None
    settings: Settings
    report: dict = field(default_factory=dict)
    correspondence_weight: Image | None = None

    def save(self, outdir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write every output it holds into ``outdir`` atomically (temporary folder beside it, then rename)."""
        return write_outputs(outdir, self, self.params_text(), overwrite=overwrite,
                             outputs=self.report.get("outputs"))

    def params_text(self) -> str:
        """The fully resolved parameter file of this run (``params.txt``)."""
        return _params_header(self.settings) + format_parameter_map(self.settings.to_parameter_map())


def _params_header(settings: Settings) -> str:
    return (f"// combireg {__version__}: fully resolved parameters of this run (source: {settings.source}).\n"
            f"// `combireg run SRC TGT -p params.txt` reproduces it.\n")


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
    ``Transform "Diffeomorphic"`` adds what scaling and squaring keeps for the backward pass, about
    9 float32 values per voxel, squaring step and direction (7 steps assumed when automatic):
    +0.27 GB for the default pyramid, whose measured peak on a 1 mm case barely moved (2.25 GB
    against 2.17 GB; the full-resolution work outside the optimiser dominates).
    """
    n_target = target_geometry.num_voxels
    n_source = source_geometry.num_voxels
    full = n_target * (120 + 24 * channels) + n_source * (40 + 8 * channels)
    directions = 2 if settings.bidirectional else 1
    level_peak = max(level.geometry.num_voxels for level in pyramid_levels(settings, target_geometry))
    optimisation = level_peak * 4 * (10 * channels + 25) * directions
    if settings.diffeomorphic:
        optimisation += level_peak * 4 * 9 * (settings.squaring_steps or 7) * directions
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


def as_image_pair(source: ImageLike, target: ImageLike) -> tuple[Image, Image]:
    """``(source, target)`` as Images (see :func:`as_image`), checked for equal channel counts.

    Raises
    ------
    CombiregError
        Unreadable input, or channel counts that differ.
    """
    target_img = as_image(target, "target")
    source_img = as_image(source, "source")
    if source_img.num_channels != target_img.num_channels:
        raise CombiregError(f"source has {source_img.num_channels} channel(s) but target has "
                            f"{target_img.num_channels}; give the same count on both sides")
    return source_img, target_img


def _as_settings(params) -> Settings:
    if params is None or isinstance(params, (str, os.PathLike)):
        return load_settings(params)
    if isinstance(params, Settings):
        return params
    if isinstance(params, dict):
        return settings_from_map(params)
    raise TypeError(f"params must be None, a path, a parameter map or Settings, got {type(params).__name__}")


def is_model_init(init) -> bool:
    """Whether ``init`` names a DRN (a model file ``*.pt``, ``"drn"`` or a loaded model)."""
    from .network import DrnModel

    if isinstance(init, DrnModel):
        return True
    return isinstance(init, (str, os.PathLike)) and (str(init) == "drn" or str(init).endswith(".pt"))


def _init_fields(init, source: Image, target: Image, work_geometry: Geometry, settings: Settings,
                 device) -> tuple:
    """Forward/backward normalised fields on the first level's grid, and a note for the report.

    ``init`` is a DRN (model file, ``"drn"`` or a loaded model: its two predicted fields), or
    a forward field (path or ``(displacement_lps_mm, Geometry)``: the backward field starts as
    its numerical inverse).
    """
    if init is None:
        return None, None, None
    first = pyramid_levels(settings, work_geometry)[0].geometry
    if is_model_init(init):
        from .network import DrnModel, load_model

        clock = time.perf_counter()
        model = init if isinstance(init, DrnModel) else load_model(init)
        forward_n, backward_n, grid = model.predict_normalised(source, target)
        # Through LPS mm: the working grid may have another orientation or field of view than
        # the DRN's internal grid (which spans the target's).
        on_first = [lps_mm_to_normalised(resample_field(normalised_to_lps_mm(f, grid), grid, first), first, device)
                    for f in (forward_n, backward_n)]
        note = {"kind": "drn", "model": str(getattr(model, "path", None) or init),
                "seconds": round(time.perf_counter() - clock, 3)}
        return on_first[0], (on_first[1] if settings.bidirectional else None), note
    from . import io

    note = {"kind": "field", "field": str(init) if isinstance(init, (str, os.PathLike)) else "in memory"}
    if isinstance(init, (str, os.PathLike)):
        init = io.read_displacement(init)
    displacement, geometry = init
    u_mm = resample_field(displacement, geometry, work_geometry)
    forward = lps_mm_to_normalised(u_mm, work_geometry, device)
    forward = upsample_normalised(forward, first.shape)
    return forward, (invert_normalised(forward) if settings.bidirectional else None), note


MaskLike = Union[Image, str, os.PathLike, None]

#: The elastix (affine) pre-alignment runs on copies at least this coarse (mm), with this many
#: elastix levels (12, 6, 3 mm). Measured on a 1 mm pair: 1.1 s instead of 11.5 s at full resolution with four
#: levels, and the same landmark error after the rigid step (7.79 vs 7.80 mm).
PREALIGNMENT_SPACING_MM = 3.0
PREALIGNMENT_RESOLUTIONS = 3


def _mask(value: MaskLike, image: Image, role: str) -> Image | None:
    """A validated {0, 1} mask on ``image``'s grid (see :func:`combireg.preprocess.check_mask`)."""
    if value is None:
        return None
    from .preprocess import load_mask

    return load_mask(value, image.geometry, role=role)


def working_geometry(target_geometry: Geometry, settings: Settings) -> Geometry:
    """The grid the field is optimised on: the target's, reoriented and/or resampled as asked."""
    if settings.working_orientation == "none" and settings.working_spacing <= 0:
        return target_geometry
    from .preprocess import reorient_geometry, spacing_geometry

    geometry = target_geometry
    if settings.working_orientation != "none":
        geometry = reorient_geometry(geometry, settings.working_orientation)
    if settings.working_spacing > 0:
        geometry = spacing_geometry(geometry, settings.working_spacing)
    return geometry


@dataclass
class _Prepared:
    """Inputs of the optimiser in working space, and how they got there."""

    source: torch.Tensor  # (1, C, Z, Y, X) normalised source in working space
    target: torch.Tensor  # (1, C, Z, Y, X) normalised target on the working grid
    target_mask: torch.Tensor | None
    source_mask: torch.Tensor | None
    geometry: Geometry  # the working grid
    affine: np.ndarray | None  # 4x4, target LPS mm -> source LPS mm (pre-alignment)
    seconds: dict
    notes: dict


def _prepare(source: Image, target: Image, source_mask: Image | None, target_mask: Image | None,
             settings: Settings, device: str) -> _Prepared:
    """Preprocessing inside ``register``: N4, pre-alignment, working grid, normalisation, masks."""
    seconds: dict[str, float] = {}
    notes: dict = {"bias_field_correction": settings.bias_field_correction, "pre_alignment": settings.pre_alignment,
                   "working_orientation": settings.working_orientation, "working_spacing": settings.working_spacing,
                   "target_mask": target_mask is not None, "source_mask": source_mask is not None}
    clock = time.perf_counter()
    if settings.bias_field_correction:
        from .preprocess import n4_bias_correction

        # Intensities for the similarity only: the warped outputs keep the original ones.
        source = n4_bias_correction(source, mask=source_mask)
        target = n4_bias_correction(target, mask=target_mask)
        seconds["bias_field_correction"] = time.perf_counter() - clock
        clock = time.perf_counter()
    # Normalised first: it also refuses a constant channel before any elastix work.
    source_norm = normalise_intensities(source, settings.normalization_percentiles, role="source")
    target_norm = normalise_intensities(target, settings.normalization_percentiles, role="target")
    seconds["normalisation"] = time.perf_counter() - clock
    clock = time.perf_counter()
    affine = None
    if settings.pre_alignment == "rigid":
        # In torch (combireg.rigid): the same kind of map as elastix's EulerTransform, without
        # the ~7 s of CPU that loading the itk-elastix module costs.
        affine = rigid_align(source, target, source_mask=source_mask, target_mask=target_mask,
                             seed=settings.seed)
    elif settings.pre_alignment == "affine":
        from .preprocess import prealign

        affine = prealign(source, target, kind=settings.pre_alignment, source_mask=source_mask,
                          target_mask=target_mask, working_spacing_mm=PREALIGNMENT_SPACING_MM,
                          resolutions=PREALIGNMENT_RESOLUTIONS)
    if affine is not None:
        notes["affine_target_to_source_lps_mm"] = affine.tolist()
        seconds["pre_alignment"] = time.perf_counter() - clock
        clock = time.perf_counter()
    geometry = working_geometry(target.geometry, settings)
    notes["working_grid"] = geometry.to_dict()

    def into_working_space(image: Image | None, is_source: bool) -> torch.Tensor | None:
        if image is None:
            return None
        if is_source and affine is not None:
            moved = warp_image_affine(image, geometry, affine)
        else:
            moved = resample_image(image, geometry)
        return moved.data[None].to(device)

    prepared = _Prepared(into_working_space(source_norm, True), into_working_space(target_norm, False),
                         into_working_space(target_mask, False), into_working_space(source_mask, True),
                         geometry, affine, seconds, notes)
    seconds["resampling"] = time.perf_counter() - clock
    return prepared


def register(source: ImageLike, target: ImageLike, params: Settings | ParamMap | str | os.PathLike | None = None,
             init=None, *, device: str = "cpu", callback: Callable[[dict], None] | None = None,
             max_memory_bytes: int | None = None, target_mask: MaskLike = None,
             source_mask: MaskLike = None, outputs=None, writer: OutputWriter | None = None) -> Result:
    """Register ``source`` to ``target`` by instance optimisation of the paper's loss.

    Parameters
    ----------
    source, target : Image, path, comma-separated paths or list of paths
        The two subjects; the same number of channels on both sides. The source may lie on
        another grid or orientation: it is resampled into target space in world coordinates.
    params : Settings, parameter map, path to an elastix-syntax file, or None (defaults)
    init : optional
        A DRN (a model file ``*.pt`` from ``combireg train``, ``"drn"`` for the shipped model, or a
        loaded :class:`combireg.network.DrnModel`) whose predicted forward and backward fields
        start the optimisation (``MaximumNumberOfIterations 0``: the DRN alone); or an initial
        forward field (path to a displacement field in our convention, or
        ``(displacement_lps_mm, Geometry)``), the backward field starting as its inverse.
        With ``Transform "Diffeomorphic"`` these displacements are turned into velocities
        (``report["velocity"]["init_log_residual_mm"]`` says how closely ``exp(v)`` meets them).
    device : str
        ``"cpu"`` (default) or ``"cuda"``.
    callback : callable, optional
        Receives a dict after every iteration (for progress bars).
    max_memory_bytes : int, optional
        Refuse to start if the estimated peak exceeds this (default: available memory).
    target_mask, source_mask : Image or path, optional
        Binary masks on the grid of their image (brain or region of interest): only voxels
        inside both (the source's carried along by the field) count in the similarity. Used by
        the pre-alignment too.
    outputs : None, str or sequence of str
        The image outputs to compute (:data:`combireg.outputs.OUTPUT_KINDS`: ``"field"``,
        ``"inverse"``, ``"warped"``; default all). Without ``"inverse"`` (and without
        ``Bidirectional``) the numerical inverse is not computed and
        ``Result.inverse_displacement_lps_mm`` is None; without ``"warped"`` ``Result.warped`` is
        None. The forward field is always computed (the report's Jacobian and the TRE need it);
        :meth:`Result.save` writes the kinds asked for (``report["outputs"]``).
    writer : OutputWriter, optional
        An open :class:`combireg.outputs.OutputWriter`: each output file is handed to it as soon
        as it is computed, so the files are written while the run finishes (the caller then
        calls ``writer.finish(result.params_text(), result.report)``).

    Preprocessing follows the settings' ``BiasFieldCorrection`` (N4), ``PreAlignment``
    (rigid/affine with itk-elastix, composed into the result's fields), ``WorkingOrientation``
    and ``WorkingSpacing`` (the grid the field is optimised on); the result is always on the
    target's own grid.

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
    kinds = output_kinds(outputs)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CombiregError("--device cuda requested but no CUDA device is available")
    source_img, target_img = as_image_pair(source, target)
    target_mask_img = _mask(target_mask, target_img, "target")
    source_mask_img = _mask(source_mask, source_img, "source")
    if is_model_init(init):
        from .network import DrnModel, load_model

        # Load and check the model before any expensive preprocessing.
        init = init if isinstance(init, DrnModel) else load_model(init)
        if init.channels != target_img.num_channels:
            raise CombiregError(f"the images have {target_img.num_channels} channel(s) but the DRN model "
                                f"{init.path or ''} was trained on {init.channels}")
    skipped_prealignment = None
    if init is not None and not is_model_init(init) and settings.pre_alignment != "none":
        # An initial field already says where the source lies; aligning first would count it twice.
        log.info("PreAlignment %r skipped: an initial field was given", settings.pre_alignment)
        skipped_prealignment = settings.pre_alignment
        settings = settings.replace(pre_alignment="none")
    needed = estimate_memory_bytes(working_geometry(target_img.geometry, settings), source_img.geometry,
                                   target_img.num_channels, settings)
    limit = available_memory_bytes() if max_memory_bytes is None else int(max_memory_bytes)
    if needed > limit:
        raise CombiregError(f"this registration needs about {needed / 2**30:.1f} GiB but only "
                            f"{limit / 2**30:.1f} GiB is available; use a coarser ImagePyramidSchedule "
                            f"or smaller images")
    if settings.num_threads > 0:
        torch.set_num_threads(settings.num_threads)
    prepared = _prepare(source_img, target_img, source_mask_img, target_mask_img, settings, device)
    clock = time.perf_counter()
    settings, sequences_note = settings_for_sequences(settings, prepared.source, prepared.target,
                                                      prepared.geometry.spacing)
    if settings.sequence_change_detection:
        prepared.seconds["sequence_check"] = time.perf_counter() - clock
    if sequences_note["action"] == "cross-sequence similarity":
        log.info("source and target look like different sequences (%s): optimising with the "
                 "cross-sequence similarity of params/cross_sequence.txt", sequences_note["reason"])
    drn_source = source_img
    if is_model_init(init) and prepared.affine is not None:
        # The DRN sees the source after the pre-alignment (on the target grid), so it predicts
        # the deformable remainder, which is what the optimisation continues from.
        drn_source = warp_image_affine(source_img, target_img.geometry, prepared.affine)
    init_f, init_b, init_note = _init_fields(init, drn_source, target_img, prepared.geometry, settings, device)
    if skipped_prealignment is not None:
        init_note["pre_alignment_skipped"] = skipped_prealignment
    t_prep = time.perf_counter() - start

    fields = optimise_fields(prepared.source, prepared.target, prepared.geometry, settings,
                             init_forward=init_f, init_backward=init_b, target_mask=prepared.target_mask,
                             source_mask=prepared.source_mask, callback=callback, inverse="inverse" in kinds)
    t_opt = time.perf_counter() - start - t_prep
    result = _finish(fields, source_img, target_img, prepared, settings, kinds, writer)
    seconds = {**prepared.seconds, "preparation": t_prep, "optimisation": t_opt,
               "total": time.perf_counter() - start}
    result.report = _report(result, fields, settings, device, source_img, target_img, seconds)
    result.report["outputs"] = list(kinds)
    result.report["preprocessing"] = prepared.notes
    result.report["sequences"] = sequences_note
    result.report["init"] = init_note
    if settings.metric_weighting != "fixed":
        result.report["metric_weights"] = {"mode": settings.metric_weighting,
                                           "final": result.report["levels"][-1]["metric_weights"]
                                           if fields.levels else {}}
    if result.correspondence_weight is not None:
        result.report["correspondence"] = _correspondence_summary(result.correspondence_weight, fields.correspondence)
    result.report["quality"] = _self_check(fields, prepared, result.report, init_f,
                                           "initial field" if init is not None else
                                           "pre-alignment" if prepared.affine is not None else "identity")
    for warning in result.report["quality"]["warnings"]:
        log.warning(warning)
    return result


def _self_check(fields: FieldPair, prepared: "_Prepared", report: dict, start, start_name: str) -> dict:
    """The do-no-harm check (:func:`combireg.quality.self_check`) on the finest level's grid."""
    source, target = fields.level_images  # what the last level was optimised on
    return self_check(source, target, fields.forward, report["jacobian"]["percent_nonpositive"], start=start,
                      start_name=start_name, plain_name="pre-alignment" if prepared.affine is not None else "identity")


def _correspondence_summary(weight: Image, info: dict | None) -> dict:
    """report.json's summary of the final correspondence weight (on the target grid)."""
    values = weight.data
    return {"file": CORRESPONDENCE_WEIGHT_NAME,
            "fraction_below_0.5": round(float((values < 0.5).float().mean()), 6),
            "mean_weight": round(float(values.mean()), 6),
            "error_scale_mm": round(float(info["error_scale_mm"]), 6) if info else None,
            "capped": bool(info["capped"]) if info else False}


def _finish(fields: FieldPair, source: Image, target: Image, prepared: _Prepared, settings: Settings,
            kinds: tuple = OUTPUT_KINDS, writer: OutputWriter | None = None) -> Result:
    """Fields in LPS mm on the target grid (forward) and the source grid (inverse), and the warp
    (the inverse and the warp only where ``kinds`` asks for them), each handed to ``writer`` as
    soon as it is ready (the warped images first after the field: they take longest to write)."""
    work = prepared.geometry
    u_work = normalised_to_lps_mm(upsample_normalised(fields.forward, work.shape), work)
    u_mm = resample_field(u_work, work, target.geometry)
    if prepared.affine is not None:
        # Optimised space = target space with the source pulled back through A (see
        # undo_prealignment: forward x -> A(x + u(x)), backward s -> A^-1 s + w(A^-1 s)).
        u_mm = compose_affine(prepared.affine, u_mm, target.geometry)
    if writer is not None:
        writer.field(u_mm, target.geometry)
    warped = warp_image(source, target.geometry, u_mm) if "warped" in kinds else None
    if writer is not None:
        writer.warped(warped)
    v_mm = None
    if "inverse" in kinds and fields.backward is not None:
        w_work = normalised_to_lps_mm(upsample_normalised(fields.backward, work.shape), work)
        if prepared.affine is None:
            # The backward field was optimised in target space; its points are world points, so
            # putting it on the source grid is a plain world-coordinate resampling of the vectors.
            v_mm = resample_field(w_work, work, source.geometry)
        else:
            v_mm = undo_prealignment_inverse(prepared.affine, w_work, work, source.geometry)
        if writer is not None:
            writer.inverse(v_mm, source.geometry)
    weight = None
    if fields.correspondence_weight is not None:
        # Like the fields: up to the working grid, then onto the target grid in world coordinates.
        on_work = Image(upsample_normalised(fields.correspondence_weight.cpu(), work.shape)[0], work)
        weight = resample_image(on_work, target.geometry, padding_mode="border")
        weight = Image(weight.data.clamp(0.0, 1.0), target.geometry)
        if writer is not None:
            writer.correspondence_weight(weight)
    return Result(u_mm, target.geometry, v_mm, source.geometry, warped, settings, correspondence_weight=weight)


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
        **_transform_entries(fields.transform),
        **field_statistics(result.displacement_lps_mm, result.target_geometry),
    }


def _transform_entries(transform: dict) -> dict:
    """report.json's ``transform`` (the model), and for "Diffeomorphic" ``squaring_steps`` and
    ``velocity`` (how the exponential was taken: automatic or fixed steps, the first step's size
    in voxels, and how well an initial field became a velocity)."""
    entries = {"transform": transform["transform"]}
    if "squaring_steps" in transform:
        entries["squaring_steps"] = transform["squaring_steps"]
        entries["velocity"] = {k: v for k, v in transform.items() if k not in ("transform", "squaring_steps")}
    return entries
