"""The DRN's training data: (source, target) pairs prepared once on the network's internal grid.

Each pair is normalised and resampled onto its target's internal grid exactly as
:meth:`combireg.network.DrnModel.prepare` does at inference (:func:`pair_tensors`), then kept
in memory as :class:`TrainingData`. The pairs come from a manifest of real cases
(:func:`manifest_data`; ``id,source,target`` columns, read by
:func:`combireg.cases.read_training_manifest`), from the simulator (:func:`synth_data`: pairs
simulated with :mod:`combireg.synth`, seeds from :data:`SYNTH_SEED` on, disjoint from the
sample and benchmark cases, optionally cached on disk) or from images in memory
(:func:`images_data`). :func:`combireg.train.train_drn` trains on them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .cases import read_training_manifest
from .errors import CombiregError, first_line
from .image import Image
from .network import _plain, atomic_torch_save, internal_geometry, to_internal_grid
from .optimize import normalise_intensities
from .params import TrainingSettings
from .version import __version__
from .warp import gradient_scale

__all__ = [
    "TrainingPair",
    "TrainingData",
    "SYNTH_SEED",
    "pair_tensors",
    "images_data",
    "manifest_data",
    "synth_data",
]

log = logging.getLogger(__name__)

#: Seed of the first simulated training pair: far from the sample (0, 1) and benchmark (100+) cases.
SYNTH_SEED = 10000
_SYNTH_CACHE_FORMAT = "combireg-drn-synth-cache"


@dataclass
class TrainingPair:
    """One (source, target) pair on its target's internal grid, intensities normalised."""

    id: str
    source: torch.Tensor  # (C, Z, Y, X)
    target: torch.Tensor  # (C, Z, Y, X)
    scale: torch.Tensor  # (3, 3) gradient_scale of the internal grid


@dataclass
class TrainingData:
    """Pairs ready for training, all on internal grids of one shape."""

    pairs: list
    channels: int
    internal_shape: tuple
    normalization_percentiles: tuple
    description: dict = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.pairs]

    def fingerprint(self) -> str:
        """sha256 of ids and voxel values: a checkpoint resumes only on the same data."""
        digest = hashlib.sha256()
        for pair in self.pairs:
            digest.update(pair.id.encode())
            for tensor in (pair.source, pair.target, pair.scale):
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()


def pair_tensors(source: Image, target: Image, internal_shape: Sequence[int],
                 percentiles: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised source and target on the target's internal grid, and its gradient scale.

    Exactly the preprocessing of :meth:`combireg.network.DrnModel.prepare` (training and
    inference see the same inputs).

    Returns
    -------
    source, target : Tensor, (C, Z, Y, X)
    scale : Tensor, (3, 3)
    """
    grid = internal_geometry(target.geometry, internal_shape)
    src = to_internal_grid(normalise_intensities(source, tuple(percentiles), role="source"), grid)
    tgt = to_internal_grid(normalise_intensities(target, tuple(percentiles), role="target"), grid)
    return src, tgt, gradient_scale(grid)


def images_data(images: Sequence[tuple[Image, Image]], settings: TrainingSettings, *,
                ids: Sequence[str] | None = None, description: dict | None = None) -> TrainingData:
    """Training data from in-memory (source, target) image pairs.

    Raises
    ------
    CombiregError
        No pairs, or channel counts that differ between images.
    """
    if len(images) == 0:
        raise CombiregError("no training pairs given")
    ids = [f"pair{i:04d}" for i in range(len(images))] if ids is None else [str(i) for i in ids]
    channels = images[0][0].num_channels
    pairs = []
    for case_id, (source, target) in zip(ids, images):
        _check_channels(case_id, source, target, channels)
        src, tgt, scale = pair_tensors(source, target, settings.internal_shape, settings.normalization_percentiles)
        pairs.append(TrainingPair(case_id, src, tgt, scale))
    return TrainingData(pairs, channels, settings.internal_shape, settings.normalization_percentiles,
                        dict(description or {"kind": "images", "pairs": len(pairs)}))


def _check_channels(case_id: str, source: Image, target: Image, channels: int) -> None:
    if source.num_channels != target.num_channels:
        raise CombiregError(f"{case_id}: source has {source.num_channels} channel(s) but target has "
                            f"{target.num_channels}")
    if source.num_channels != channels:
        raise CombiregError(f"{case_id}: {source.num_channels} channel(s), but the first case has {channels}; all "
                            "training cases need the same channels")


def manifest_data(manifest: str | os.PathLike, settings: TrainingSettings, *,
                  progress: Callable[[str], None] | None = None) -> TrainingData:
    """Load, normalise and resample every case of a manifest onto its internal grid (once).

    Raises
    ------
    CombiregError
        Manifest problems, unreadable images, channel mismatches, constant channels.
    """
    from . import io

    rows = read_training_manifest(manifest)
    for case_id, source, target in rows:  # all files first: fail before minutes of loading
        for p in [*source, *target]:
            if not p.is_file():
                raise CombiregError(f"{manifest}: case {case_id}: no such file {p}")
    pairs, channels = [], None
    start = time.perf_counter()
    for case_id, source_files, target_files in rows:
        source = io.read_channels(source_files, role=f"{case_id} source")
        target = io.read_channels(target_files, role=f"{case_id} target")
        channels = source.num_channels if channels is None else channels
        _check_channels(case_id, source, target, channels)
        src, tgt, scale = pair_tensors(source, target, settings.internal_shape, settings.normalization_percentiles)
        pairs.append(TrainingPair(case_id, src, tgt, scale))
        del source, target
        if progress is not None:
            progress(case_id)
    description = {"kind": "manifest", "manifest": str(Path(manifest).absolute()), "cases": len(pairs),
                   "loading_s": round(time.perf_counter() - start, 2)}
    return TrainingData(pairs, channels, settings.internal_shape, settings.normalization_percentiles, description)


def synth_data(n: int, settings: TrainingSettings, *, seed: int = SYNTH_SEED, spacing: float = 3.0,
               template=None, cache_dir: str | os.PathLike | None = None, template_cache=None,
               progress: Callable[[str], None] | None = None, simulator: str = "basic") -> TrainingData:
    """``n`` simulated pairs (seeds ``seed .. seed+n-1``): by :func:`combireg.synth.simulate_case`
    (``simulator="basic"``) or from the varied benchmark's harder anatomies
    (``simulator="varied"``, :func:`combireg.synth_varied.training_pair`: brain shift, large
    collapse, half of them with a pose difference of 8-15 degrees and 8-15 mm).

    The template is smoothed to the output spacing first (Gaussian, sigma = spacing / 2) so the
    coarse simulated images are not aliased; the internal grid is coarse anyway. A simulated
    pair costs about 2 s at 3 mm and 4.5 s at 2 mm on a 2-core CPU.

    Parameters
    ----------
    n : int
        Number of pairs, >= 1.
    spacing : float
        Isotropic spacing (mm) the pairs are simulated at.
    template : (Image, Landmarks), optional
        Two-channel template and its landmarks; default :func:`combireg.template.fetch_template`.
    cache_dir : path, optional
        Folder keeping the prepared pairs (one ``.pt`` file per distinct request), so several
        trainings on the same simulated data generate it once.
    template_cache : path, optional
        Where the template wheel is cached (see :func:`combireg.template.fetch_template`).
    """
    from . import synth
    from .filters import gaussian_blur
    from .template import AUTOAFIDS_SHA256, AUTOAFIDS_VERSION

    if n < 1:
        raise CombiregError(f"--synth needs at least 1 pair, got {n}")
    if simulator not in ("basic", "varied"):
        raise CombiregError(f"unknown simulator {simulator!r} (basic or varied)")
    if not spacing > 0:
        raise CombiregError(f"synthetic spacing must be positive, got {spacing}")
    key = None
    cache_file = None
    if cache_dir is not None and template is None:
        key = hashlib.sha256(json.dumps({
            "n": n, "seed": seed, "spacing": spacing, "internal_shape": list(settings.internal_shape),
            "percentiles": list(settings.normalization_percentiles), "combireg": __version__,
            "template": AUTOAFIDS_SHA256, **({"simulator": simulator} if simulator != "basic" else {})},
            sort_keys=True).encode()).hexdigest()[:16]
        cache_file = Path(cache_dir) / f"synth-{key}.pt"
        cached = _read_synth_cache(cache_file, key)
        if cached is not None:
            log.info("simulated pairs from the cache %s", cache_file)
            return cached
    start = time.perf_counter()
    if template is None:
        template_image, afids = synth.fetch_template(template_cache)
        template_name = f"MNI152NLin2009cAsym 1 mm T1w+T2w (autoafids {AUTOAFIDS_VERSION})"
    else:
        template_image, afids = template
        template_name = "user template"
    brain = synth.estimate_brain_mask(template_image)
    sigma = [0.5 * spacing / s if spacing > s else 0.0 for s in reversed(template_image.geometry.spacing)]
    if any(sigma):
        smoothed = gaussian_blur(template_image.data[None].to(torch.float32), sigma)[0]
        template_image = Image(smoothed, template_image.geometry)
    pairs = []
    loop_start = time.perf_counter()
    for i in range(n):
        case_seed = seed + i
        if simulator == "varied":
            from .synth_varied import make_anatomy, training_pair

            anatomy = make_anatomy(template_image, afids, case_seed, brain_mask=brain, landmarks=False)
            source, target = training_pair(anatomy, spacing)
        else:
            case = synth.simulate_case(template_image, afids, seed=case_seed, spacing=spacing, n_tissue_points=0,
                                       brain_mask=brain, ground_truth=False)
            source, target = case.source, case.target
        src, tgt, scale = pair_tensors(source, target, settings.internal_shape, settings.normalization_percentiles)
        pairs.append(TrainingPair(f"synth{case_seed:05d}", src, tgt, scale))
        if progress is not None:
            progress(pairs[-1].id)
    seconds = time.perf_counter() - start
    description = {"kind": "synth", "simulator": simulator, "pairs": n, "first_seed": seed, "spacing_mm": spacing,
                   "template": template_name,
                   "generation_s": round(seconds, 1),
                   "seconds_per_pair": round((time.perf_counter() - loop_start) / n, 2)}
    data = TrainingData(pairs, template_image.num_channels, settings.internal_shape,
                        settings.normalization_percentiles, description)
    if cache_file is not None:
        _write_synth_cache(cache_file, key, data)
    return data


def _read_synth_cache(path: Path, key: str) -> TrainingData | None:
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if obj.get("format") != _SYNTH_CACHE_FORMAT or obj.get("key") != key:
            return None
        pairs = [TrainingPair(p["id"], p["source"], p["target"], p["scale"]) for p in obj["pairs"]]
        return TrainingData(pairs, int(obj["channels"]), tuple(obj["internal_shape"]),
                            tuple(obj["normalization_percentiles"]), dict(obj["description"]))
    except Exception as exc:  # a broken cache is regenerated, not an error
        log.warning("ignoring unreadable cache %s (%s)", path, first_line(exc))
        return None


def _write_synth_cache(path: Path, key: str, data: TrainingData) -> None:
    atomic_torch_save({"format": _SYNTH_CACHE_FORMAT, "key": key, "channels": data.channels,
                       "internal_shape": list(data.internal_shape),
                       "normalization_percentiles": list(data.normalization_percentiles),
                       "description": _plain(data.description),
                       "pairs": [{"id": p.id, "source": p.source, "target": p.target, "scale": p.scale}
                                 for p in data.pairs]}, path)
