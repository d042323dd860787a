"""ANTs registration through ANTsPy (``antspyx``, optional), in combireg's conventions.

:func:`register_ants` runs ``ants.registration`` (``type_of_transform="SyN"`` by default: affine
then SyN with mutual information, ANTsPy's defaults) and turns its result into the files of
``combireg run``. ``antspyx`` is *not* a dependency of combireg: without it every entry point
raises :class:`~combireg.errors.CombiregError` with one line saying how to install it.

Turning ANTs' transforms into our fields
----------------------------------------
``ants.registration`` returns ``fwdtransforms`` (warp + affine ``.mat`` files): applied by
``ants.apply_transforms(fixed, moving, fwdtransforms)`` they resample the moving image into the
fixed domain, i.e. as a point map they take a fixed point x to its moving point T(x), which is
our forward convention with fixed = target, moving = source. Rather than re-implementing the
order and inversion rules of ANTs' transform lists, this adapter lets ANTs apply them to
*coordinate images*: three images on a source-aligned grid (grown to cover the target) whose voxels hold their own world
coordinates. Linear interpolation reproduces a linear function exactly, so resampling them
through ``fwdtransforms`` onto the target grid yields T(x) itself, and u(x) = T(x) - x. The
inverse field is made the same way from ``invtransforms`` (affine matrices inverted, as ANTsPy
documents) on the source grid. ANTs images live in ITK's LPS physical space, like ours; images
are exchanged through MetaImage files (double-precision geometry), so no axis-order
conversion between numpy conventions is involved.

Channels: ``ants.registration`` takes one fixed/moving pair (multi-metric needs
``SyNOnly`` + ``multivariate_extras``), so one channel drives the registration and every channel
is warped with combireg's warper.

This module cannot be tested where ``antspyx`` is missing; its tests are skipped there.
"""
from __future__ import annotations

import os
import platform
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import CombiregError
from ..geometry import Geometry
from ..image import Image
from .elastix import ImageLike
from ..version import __version__

__all__ = ["register_ants", "AntsResult", "require_ants", "METHOD"]

METHOD = "ants"
MISSING_MESSAGE = "baseline ants needs the optional package antspyx (pip install antspyx)"


def require_ants():
    """The ``ants`` module of ANTsPy.

    Raises
    ------
    CombiregError
        If ``antspyx`` is not installed.
    """
    try:
        import ants
    except ImportError:
        raise CombiregError(MISSING_MESSAGE) from None
    return ants


@dataclass
class AntsResult:
    """What :func:`register_ants` produced; the fields mean what they mean in
    :class:`combireg.api.Result`."""

    displacement_lps_mm: np.ndarray
    target_geometry: Geometry
    inverse_displacement_lps_mm: np.ndarray
    source_geometry: Geometry
    warped: Image
    type_of_transform: str
    metric_channel: int
    seed: int | None
    registration_kwargs: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    def params_text(self) -> str:
        lines = [f"// combireg {__version__}: ANTsPy ants.registration settings of this run ({METHOD}).",
                 "// Other arguments were ANTsPy's defaults for this type_of_transform.",
                 f'(TypeOfTransform "{self.type_of_transform}")',
                 f"(MetricChannel {self.metric_channel})"]
        if self.seed is not None:
            lines.append(f"(RandomSeed {self.seed})")
        lines += [f"// ants.registration(..., {key}={value!r})" for key, value in self.registration_kwargs.items()]
        return "\n".join(lines) + "\n"

    def save(self, outdir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the outputs of ``combireg run`` into ``outdir``, whole or not at all."""
        from ..outputs import write_outputs

        return write_outputs(outdir, self, self.params_text(), overwrite=overwrite)


def _coordinate_domain(geometry: Geometry, other: Geometry) -> Geometry:
    """A grid with ``geometry``'s spacing and direction covering it and ``other`` (the grid the
    points come from), grown by a margin, so that mapped points land inside the coordinate images."""
    corners = np.array([[i, j, k] for i in (0, other.size[0] - 1) for j in (0, other.size[1] - 1)
                        for k in (0, other.size[2] - 1)], dtype=np.float64)
    index = geometry.world_to_index(other.index_to_world(corners))
    spacing = np.asarray(geometry.spacing)
    margin = np.ceil(np.maximum(20.0, 0.25 * np.asarray(geometry.extent_mm)) / spacing)
    lo = np.floor(np.minimum(index.min(0), 0)) - margin
    hi = np.ceil(np.maximum(index.max(0), np.asarray(geometry.size) - 1)) + margin
    origin = geometry.index_to_world(lo[None])[0]
    return Geometry(tuple(int(v) for v in hi - lo + 1), tuple(origin), geometry.spacing, geometry.direction)


#: Voxels mapped outside the padded coordinate images get this value (then 0 displacement).
_OUTSIDE = 1.0e30


def _mapped_points(ants, transforms: list[str], invert: list[bool], reference_path: Path, domain: Geometry,
                   reference: Geometry, workdir: Path, tag: str) -> tuple[np.ndarray, int]:
    """T(x) - x on ``reference`` for the point map T that ``transforms`` apply to images.

    Coordinate images on ``domain`` (padded) hold world coordinates minus a centre (smaller
    numbers, so float32 keeps ~1e-5 mm); ANTs resamples them onto ``reference``.
    """
    from .. import io
    import torch

    centre = reference.world_grid().reshape(-1, 3).mean(0)
    world = domain.world_grid() - centre
    fixed = ants.image_read(str(reference_path))
    mapped = []
    outside = np.zeros(reference.shape, dtype=bool)
    for c in range(3):
        coord_path = workdir / f"{tag}_coord{c}.mha"
        io.write_image(coord_path, Image(torch.from_numpy(world[..., c].astype(np.float32))[None], domain))
        out = ants.apply_transforms(fixed=fixed, moving=ants.image_read(str(coord_path)), transformlist=transforms,
                                    interpolator="linear", whichtoinvert=invert, defaultvalue=_OUTSIDE)
        out_path = workdir / f"{tag}_mapped{c}.mha"
        ants.image_write(out, str(out_path))
        image = io.read_image(out_path)
        if not image.geometry.same_grid(reference):
            raise CombiregError(f"ANTs returned a {tag} image on another grid ({image.geometry.size}) "
                                f"than expected ({reference.size})")
        values = image.numpy()[0].astype(np.float64)
        outside |= values > 0.5 * _OUTSIDE
        mapped.append(values)
    points = np.stack(mapped, axis=-1) + centre
    displacement = (points - reference.world_grid()).astype(np.float32)
    displacement[outside] = 0.0
    return displacement, int(outside.sum())


def register_ants(source: ImageLike, target: ImageLike, *, type_of_transform: str = "SyN", metric_channel: int = 0,
                  seed: int | None = None, registration_kwargs: Mapping[str, Any] | None = None,
                  callback: Callable[[dict], None] | None = None) -> AntsResult:
    """Register ``source`` to ``target`` with ANTsPy's ``ants.registration``.

    Parameters
    ----------
    source, target : Image, path, comma-separated paths or list of paths
        The two subjects, the same number of channels on both sides. The target is ANTs'
        fixed image.
    type_of_transform : str
        ANTsPy's ``type_of_transform`` (``"SyN"``: affine + SyN with mutual information;
        ``"SyNCC"``, ``"SyNRA"``, ``"SyNOnly"``, ``"ElasticSyN"``, ...).
    metric_channel : int
        The channel pair (0-based) given to ANTs; all channels are warped with the result.
    seed : int, optional
        ``random_seed`` of ``ants.registration``.
    registration_kwargs : mapping, optional
        More keyword arguments for ``ants.registration`` (``reg_iterations``, ``grad_step``, ...).
    callback : callable, optional
        Receives ``{"stage": name}`` when ``"ants"``, ``"field"``, ``"inverse"`` and ``"warp"`` start.

    Returns
    -------
    AntsResult
        ``.save(outdir)`` writes the outputs of ``combireg run``.

    Raises
    ------
    CombiregError
        ``antspyx`` missing, bad input, or ANTs failed.
    """
    ants = require_ants()
    start = time.perf_counter()
    notify = callback or (lambda event: None)
    from .. import io
    from ..api import as_image_pair
    from ..warp import field_statistics, warp_image

    source_img, target_img = as_image_pair(source, target)
    channels = target_img.num_channels
    if isinstance(metric_channel, bool) or not isinstance(metric_channel, int) or not 0 <= metric_channel < channels:
        raise CombiregError(f"metric_channel {metric_channel!r} does not exist: the images have {channels} channel(s)")
    kwargs = dict(registration_kwargs or {})
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="combireg-ants-", ignore_cleanup_errors=True) as tmp:
        workdir = Path(tmp)
        fixed_path, moving_path = workdir / "fixed.mha", workdir / "moving.mha"
        io.write_image(fixed_path, target_img.channel(metric_channel))
        io.write_image(moving_path, source_img.channel(metric_channel))
        notify({"stage": "ants"})
        t0 = time.perf_counter()
        try:
            reg = ants.registration(fixed=ants.image_read(str(fixed_path)), moving=ants.image_read(str(moving_path)),
                                    type_of_transform=type_of_transform, outprefix=str(workdir / "ants_"),
                                    random_seed=seed, **kwargs)
        except (ValueError, RuntimeError) as exc:
            raise CombiregError(f"ants.registration failed: {' '.join(str(exc).split())}") from None
        seconds["ants"] = time.perf_counter() - t0
        forward, inverse = list(reg["fwdtransforms"]), list(reg["invtransforms"])
        notify({"stage": "field"})
        t0 = time.perf_counter()
        # fwdtransforms are applied as listed (ANTsPy's default whichtoinvert for them is all False)
        u_mm, u_outside = _mapped_points(ants, forward, [False] * len(forward), fixed_path,
                                         _coordinate_domain(source_img.geometry, target_img.geometry), target_img.geometry, workdir, "forward")
        notify({"stage": "inverse"})
        # invtransforms list the affine matrices un-inverted: invert every .mat (ANTsPy's docs)
        v_mm, v_outside = _mapped_points(ants, inverse, [p.endswith(".mat") for p in inverse], moving_path,
                                         _coordinate_domain(target_img.geometry, source_img.geometry), source_img.geometry, workdir, "inverse")
        seconds["fields"] = time.perf_counter() - t0
    notify({"stage": "warp"})
    warped = warp_image(source_img, target_img.geometry, u_mm)
    result = AntsResult(u_mm, target_img.geometry, v_mm, source_img.geometry, warped, type_of_transform,
                        metric_channel, seed, {k: v for k, v in kwargs.items()})
    seconds["total"] = time.perf_counter() - start
    from importlib.metadata import PackageNotFoundError, version

    try:
        ants_version = version("antspyx")
    except PackageNotFoundError:
        ants_version = getattr(ants, "__version__", "unknown")
    result.report = {
        "method": f"{METHOD}_{type_of_transform}",
        "combireg_version": __version__,
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "antspyx": ants_version},
        "type_of_transform": type_of_transform,
        "registration_kwargs": {k: repr(v) for k, v in kwargs.items()},
        "seed": seed,
        "metric_channel": metric_channel,
        "channels_note": f"channel {metric_channel} drives the registration, all channels are warped",
        "voxels_mapped_outside_coordinate_images": {"forward": u_outside, "inverse": v_outside},
        "target": {"channels": target_img.num_channels, **target_img.geometry.to_dict()},
        "source": {"channels": source_img.num_channels, **source_img.geometry.to_dict()},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "wall_time_s": round(seconds["total"], 3),
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        **field_statistics(u_mm, target_img.geometry),
    }
    return result
