"""The deformable registration network (DRN): a small 3-D U-Net, its inputs and its model file.

The network sees the source and the target on a fixed *internal grid*: the target's field of
view (first and last voxel centres kept, orientation kept) resampled to ``internal_shape``,
with the source resampled into target space in world coordinates first. It predicts a
displacement on that grid in *normalised units* (PyTorch ``grid_sample`` coordinates,
``align_corners=True``, components x, y, z). Normalised coordinates are relative to the field
of view, so the same values mean the same world displacement on the target's own grid (only
an up-sampling with :func:`combireg.warp.upsample_normalised`).

Bidirectional, as in the paper: ``u_st = f(S, T)`` warps the source onto the target (target
point x -> source point x + u_st(x)) and ``u_ts = f(T, S)`` the other way, with one set of
weights.

Model file (``torch.save`` of a plain dict, read back with ``torch.load(weights_only=True)``,
so no pickled code is ever executed)::

    format "combireg-drn", format_version 1, combireg_version,
    config {"channels", "features"}           architecture of RegistrationUNet
    internal_shape [Z, Y, X], channels C, normalization_percentiles [lo, hi],
    parameters (the training parameter file, text), training (summary dict),
    state_dict (the weights)
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import CombiregError, first_line
from .filters import smooth_and_resize
from .geometry import Geometry
from .image import Image
from .optimize import normalise_intensities
from .version import __version__
from .warp import normalised_to_lps_mm, resample_field, resample_image, same_field_of_view

__all__ = [
    "RegistrationUNet",
    "predict_both",
    "DrnModel",
    "MODEL_FORMAT",
    "MODEL_FORMAT_VERSION",
    "SHIPPED_MODEL",
    "shipped_model_path",
    "internal_geometry",
    "to_internal_grid",
    "load_model",
    "save_model",
    "atomic_torch_save",
]

log = logging.getLogger(__name__)

MODEL_FORMAT = "combireg-drn"
MODEL_FORMAT_VERSION = 1
#: ``load_model("drn")`` loads this file from the package.
SHIPPED_MODEL = "drn"
_SHIPPED_FILE = "drn_default.pt"
_REQUIRED_KEYS = ("config", "internal_shape", "channels", "normalization_percentiles", "state_dict")


def shipped_model_path() -> Path:
    """Where the shipped model lives inside the package (it may not exist)."""
    return Path(__file__).resolve().parent / "models" / _SHIPPED_FILE


# ============================================================================ the network
def _conv(cin: int, cout: int, stride: int = 1) -> nn.Module:
    return nn.Conv3d(cin, cout, kernel_size=3, stride=stride, padding=1)


class _Block(nn.Sequential):
    """Two 3x3x3 convolutions with LeakyReLU; the first may stride by 2 (down-sampling)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(_conv(cin, cout, stride), nn.LeakyReLU(0.2), _conv(cout, cout), nn.LeakyReLU(0.2))


class RegistrationUNet(nn.Module):
    """A small 3-D U-Net predicting a displacement from a (source, target) pair.

    Parameters
    ----------
    channels : int
        Channels ``C`` of each image; the network input is the 2C channels of source and
        target concatenated.
    features : sequence of int
        Feature channels per encoder level, finest first; level ``i > 0`` works at
        ``2^-i`` of the input resolution. The decoder mirrors the encoder with skip
        connections; a final 3x3x3 convolution, initialised near zero (so an untrained
        network predicts about the identity), gives the 3-channel displacement.

    Notes
    -----
    With the default ``(8, 16, 32, 32)`` and two channels the network has about 200 000
    parameters (under 1 MB of float32 weights). Any input shape works (odd sizes too).
    """

    def __init__(self, channels: int = 2, features: Sequence[int] = (8, 16, 32, 32)) -> None:
        super().__init__()
        features = tuple(int(f) for f in features)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if not features or min(features) < 1:
            raise ValueError(f"features must be positive integers, got {features}")
        self.channels = int(channels)
        self.features = features
        cin = 2 * self.channels
        self.encoder = nn.ModuleList()
        for level, width in enumerate(features):
            self.encoder.append(_Block(cin, width, stride=1 if level == 0 else 2))
            cin = width
        # decoder[k] merges level (n-2-k) with the up-sampled level below it
        self.decoder = nn.ModuleList(
            _Block(features[level + 1] + features[level], features[level])
            for level in reversed(range(len(features) - 1))
        )
        self.head = nn.Conv3d(features[0], 3, kernel_size=3, padding=1)
        # Why near zero: the untrained network then predicts ~identity, and training starts
        # from "no motion" instead of a random field.
        nn.init.normal_(self.head.weight, std=1e-5)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self) -> dict:
        """The architecture, as stored in a model file."""
        return {"channels": self.channels, "features": list(self.features)}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``u_st = f(S, T)``.

        Parameters
        ----------
        source, target : Tensor, (N, C, Z, Y, X)
            Normalised intensities of both images on one grid.

        Returns
        -------
        Tensor, (N, 3, Z, Y, X)
            Displacement in normalised units (x, y, z) on that grid: the source warped by
            it (:func:`combireg.warp.warp_normalised`) should match the target.
        """
        if source.shape != target.shape:
            raise ValueError(f"source {tuple(source.shape)} and target {tuple(target.shape)} differ in shape")
        if source.ndim != 5 or source.shape[1] != self.channels:
            raise ValueError(f"expected (N, {self.channels}, Z, Y, X) inputs, got {tuple(source.shape)}")
        x = torch.cat([source, target], dim=1)
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for block in self.decoder:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)

    def predict_both(self, source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u_st, u_ts) = (f(S, T), f(T, S))`` with the same weights, in one batched call.

        Shapes as :meth:`forward`; returns two (N, 3, Z, Y, X) tensors.
        """
        return predict_both(self, source, target)


def predict_both(module: nn.Module, source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f(S, T), f(T, S))`` in one batched call of ``module`` (a :class:`RegistrationUNet`, or
    one wrapped in DistributedDataParallel, whose forward must be what is called)."""
    n = source.shape[0]
    both = module(torch.cat([source, target]), torch.cat([target, source]))
    return both[:n], both[n:]


# ============================================================================ the internal grid
def internal_geometry(target_geometry: Geometry, internal_shape: Sequence[int]) -> Geometry:
    """The target's field of view on a grid of ``internal_shape`` (Z, Y, X) voxels.

    First and last voxel centres, origin and direction are the target's, so normalised
    coordinates mean the same world points on both grids.

    Raises
    ------
    CombiregError
        If the target has a single voxel along an axis (no field of view to resample).
    """
    size = tuple(int(n) for n in reversed(tuple(internal_shape)))
    if min(target_geometry.size) < 2:
        raise CombiregError(f"target grid {target_geometry.size} has a single voxel along an axis; the DRN needs "
                            "3-D volumes")
    spacing = np.asarray(target_geometry.extent_mm) / (np.asarray(size) - 1)
    return Geometry(size, target_geometry.origin, tuple(spacing), target_geometry.direction)


def _smoothing_voxels(image_geometry: Geometry, spacing_mm) -> list[float]:
    """Gaussian sigma per array axis (Z, Y, X) before resampling to ``spacing_mm`` (one value,
    or one per grid axis x, y, z): half the shrink factor, as the pyramids of
    :func:`combireg.optimize.level_image`."""
    factors = np.asarray(spacing_mm, dtype=np.float64) / np.asarray(image_geometry.spacing)
    return [0.5 * f if f > 1 else 0.0 for f in reversed(factors)]


def to_internal_grid(image: Image, grid: Geometry) -> torch.Tensor:
    """Anti-aliased resampling of ``image`` onto ``grid`` in world coordinates.

    The image is first smoothed and resized on its own field of view (one separable pass,
    sigma = half the shrink factor) to about the grid's spacing, then resampled trilinearly
    onto ``grid`` (zeros outside the image). When ``grid`` covers exactly the image's field of
    view (the target), the first pass lands on it and there is no second interpolation.

    Returns
    -------
    Tensor, (C, Z, Y, X) float32 on ``grid``
    """
    geom = image.geometry
    data = image.data.to(torch.float32)
    same_fov = same_field_of_view(geom, grid)
    spacing_mm = float(np.mean(grid.spacing))
    if same_fov:
        sigma = _smoothing_voxels(geom, grid.spacing)
        return smooth_and_resize(data[None], sigma, grid.shape)[0].contiguous()
    size = np.asarray(geom.size)
    extent = np.asarray(geom.extent_mm)
    coarse = np.maximum(np.ceil(extent / spacing_mm).astype(int) + 1, 2)
    new_size = np.where((size > coarse) & (size > 1), coarse, size)
    if np.any(new_size != size):
        new_spacing = np.where(new_size > 1, extent / np.maximum(new_size - 1, 1), geom.spacing)
        mid = Geometry(tuple(int(v) for v in new_size), geom.origin, tuple(new_spacing), geom.direction)
        data = smooth_and_resize(data[None], _smoothing_voxels(geom, spacing_mm), mid.shape)[0]
        geom = mid
    return resample_image(Image(data, geom), grid).data.contiguous()


# ============================================================================ the model
@dataclass
class DrnModel:
    """A trained (or untrained) DRN with everything needed to use it.

    Attributes
    ----------
    network : RegistrationUNet
    internal_shape : tuple of int
        The internal grid, array order (Z, Y, X).
    normalization_percentiles : tuple of float
        Per-channel intensity normalisation of the inputs (as instance optimisation).
    parameters : str
        The training parameter file (elastix syntax), for the record.
    training : dict
        Training summary (epochs, losses, data, time); empty for an untrained model.
    path : Path or None
        Where it was loaded from.
    """

    network: RegistrationUNet
    internal_shape: tuple
    normalization_percentiles: tuple = (0.5, 99.5)
    parameters: str = ""
    training: dict = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        self.internal_shape = tuple(int(n) for n in self.internal_shape)
        if len(self.internal_shape) != 3 or min(self.internal_shape) < 2:
            raise ValueError(f"internal_shape must be 3 sizes >= 2, got {self.internal_shape}")
        self.normalization_percentiles = tuple(float(v) for v in self.normalization_percentiles)
        self.network.eval()

    @property
    def channels(self) -> int:
        return self.network.channels

    @property
    def config(self) -> dict:
        return self.network.config

    def internal_geometry(self, target_geometry: Geometry) -> Geometry:
        """The internal grid for a target (see :func:`internal_geometry`)."""
        return internal_geometry(target_geometry, self.internal_shape)

    def prepare(self, source: Image, target: Image) -> tuple[torch.Tensor, torch.Tensor, Geometry]:
        """Normalised source and target on the target's internal grid.

        Returns
        -------
        source, target : Tensor, (1, C, Z, Y, X)
        grid : Geometry
            The internal grid (target space).

        Raises
        ------
        CombiregError
            Channel counts that differ from the model's, or a constant channel.
        """
        for role, image in (("source", source), ("target", target)):
            if image.num_channels != self.channels:
                raise CombiregError(f"{role} has {image.num_channels} channel(s) but the DRN model"
                                    f"{' ' + str(self.path) if self.path else ''} was trained on {self.channels}")
        grid = self.internal_geometry(target.geometry)
        tensors = []
        for role, image in (("source", source), ("target", target)):
            norm = normalise_intensities(image, self.normalization_percentiles, role=role)
            tensors.append(to_internal_grid(norm, grid)[None])
        return tensors[0], tensors[1], grid

    @torch.no_grad()
    def predict_normalised(self, source: Image, target: Image) -> tuple[torch.Tensor, torch.Tensor, Geometry]:
        """Forward and backward fields in normalised units on the target's internal grid.

        Returns
        -------
        forward : Tensor, (1, 3, Z, Y, X)
            ``u_st``: target-space point x -> source point, in target normalised coordinates.
        backward : Tensor, (1, 3, Z, Y, X)
            ``u_ts`` on the same grid: a point y of the source (located in target space, i.e.
            in world coordinates) -> target point. Both up-sample to any grid with the
            target's field of view with :func:`combireg.warp.upsample_normalised`.
        grid : Geometry
            The internal grid.
        """
        src, tgt, grid = self.prepare(source, target)
        self.network.eval()
        forward, backward = self.network.predict_both(src, tgt)
        return forward, backward, grid

    def predict(self, source: Image, target: Image) -> tuple[np.ndarray, np.ndarray]:
        """Forward and backward displacement fields in LPS mm (combireg's convention).

        Parameters
        ----------
        source, target : Image
            Any grids and orientations; the channel count of the model.

        Returns
        -------
        forward : ndarray, (Z, Y, X, 3) float32
            On the target grid: target point x maps to source point x + u(x).
        backward : ndarray, (Z', Y', X', 3) float32
            On the source grid: source point y maps to target point y + v(y).

        Raises
        ------
        CombiregError
            Channel count mismatch, constant channel.
        """
        start = time.perf_counter()
        forward, backward, grid = self.predict_normalised(source, target)
        # mm first, on the small grid: the conversion is linear, so it commutes with interpolation
        u_mm = resample_field(normalised_to_lps_mm(forward, grid), grid, target.geometry)
        # The backward field lives in target space; its points are world points, so putting it
        # on the source grid is a world-coordinate resampling of the vectors (as api._finish).
        v_mm = resample_field(normalised_to_lps_mm(backward, grid), grid, source.geometry)
        log.info("DRN prediction in %.2f s", time.perf_counter() - start)
        return u_mm, v_mm

    def to_dict(self) -> dict:
        """The model file's contents (plain types and tensors only)."""
        return {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "combireg_version": __version__,
            "config": self.config,
            "internal_shape": list(self.internal_shape),
            "channels": self.channels,
            "normalization_percentiles": list(self.normalization_percentiles),
            "parameters": str(self.parameters),
            "training": _plain(self.training),
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()},
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model file atomically; see :func:`save_model`."""
        return save_model(self, path)


def _plain(value):
    """``value`` with numpy scalars/arrays and tuples turned into plain Python types."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str) and type(value) is not str:
        return str(value)  # e.g. torch.__version__ (a TorchVersion) would need unpickling code
    return value


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` into a temporary file beside ``path``, then rename: never half-written."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def save_model(model: DrnModel, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` (see the module docstring for the format), atomically."""
    return atomic_torch_save(model.to_dict(), path)


def _load_error(exc: BaseException) -> str:
    """The informative part of a torch.load failure (its messages run over many lines)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        after = [line.strip() for line in text.split("WeightsUnpickler error:", 1)[1].splitlines() if line.strip()]
        reason = after[0].split(" was not an allowed global")[0] if after else "unsupported content"
        return f"it holds more than weights and plain data: {reason}"[:200]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"corrupt or truncated: {lines[0] if lines else type(exc).__name__}"[:200]


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes zip archives


def _torch_load(path: Path, what: str) -> dict:
    """``torch.load(weights_only=True)`` with every failure turned into one CombiregError line."""
    if path.is_dir():
        raise CombiregError(f"{path}: is a directory, not a {what} file")
    if not path.is_file():
        raise CombiregError(f"{path}: no such {what} file")
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise CombiregError(f"{path}: cannot read {what} file ({exc.strerror or exc})") from None
    if magic != _ZIP_MAGIC:
        raise CombiregError(f"{path}: not a combireg {what} file (not a PyTorch file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (bad zip), EOFError, ...
        raise CombiregError(f"{path}: not a combireg {what} file ({_load_error(exc)})") from None
    if not isinstance(obj, dict):
        raise CombiregError(f"{path}: not a combireg {what} file (holds a {type(obj).__name__}, not a dict)")
    return obj


def load_model(path_or_name: str | os.PathLike) -> DrnModel:
    """Load a DRN model file, or the shipped model with ``"drn"``.

    Raises
    ------
    CombiregError
        Missing file, a file that is not one of ours (garbage, another torch file), a model
        from an incompatible format version, or inconsistent contents; one line each.
    """
    if str(path_or_name) == SHIPPED_MODEL:
        path = shipped_model_path()
        if not path.is_file():
            raise CombiregError(f"the shipped DRN model is not installed ({path}); train one with `combireg train` "
                                "(scripts/train_shipped_drn.py makes the shipped one)")
    else:
        path = Path(path_or_name)
    obj = _torch_load(path, "DRN model")
    if obj.get("format") != MODEL_FORMAT:
        raise CombiregError(f"{path}: not a combireg DRN model (format {obj.get('format')!r}, expected "
                            f"{MODEL_FORMAT!r})")
    version = obj.get("format_version")
    if version != MODEL_FORMAT_VERSION:
        raise CombiregError(f"{path}: DRN model format version {version!r} (written by combireg "
                            f"{obj.get('combireg_version', '?')}) is not supported by combireg {__version__}, which "
                            f"reads version {MODEL_FORMAT_VERSION}; retrain the model with this version")
    missing = [k for k in _REQUIRED_KEYS if k not in obj]
    if missing:
        raise CombiregError(f"{path}: DRN model file lacks {', '.join(missing)}")
    try:
        config = obj["config"]
        channels = int(obj["channels"])
        network = RegistrationUNet(int(config["channels"]), tuple(int(f) for f in config["features"]))
        if network.channels != channels:
            raise ValueError(f"config has {network.channels} channels but the file says {channels}")
        network.load_state_dict(obj["state_dict"])
        model = DrnModel(network, tuple(obj["internal_shape"]), tuple(obj["normalization_percentiles"]),
                         str(obj.get("parameters", "")), dict(obj.get("training") or {}), path)
    except CombiregError:
        raise
    except Exception as exc:  # wrong shapes, missing weights, bad config values
        raise CombiregError(f"{path}: inconsistent DRN model file ({first_line(exc)})") from None
    return model
