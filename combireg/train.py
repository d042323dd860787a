"""Training the DRN on the paper's loss (``combireg train``).

The loss is Eq. 1 of the paper, the same as instance optimisation, per pair (S, T) on the
internal grid with ``u_st = f(S, T)`` and ``u_ts = f(T, S)``::

    L = sum_n w_n (Sim_n(S o (id + u_st), T) + Sim_n(T o (id + u_ts), S))
        + lambda (|grad u_st|^2 + |grad u_ts|^2)

with :func:`combireg.losses.weighted_similarity` and :func:`combireg.losses.gradient_regulariser`
(dimensionless derivatives via :func:`combireg.warp.gradient_scale` of each pair's internal
grid). Swapping source and target is built in: the loss is symmetric in (S, T), so every step
trains both orders.

The data (:mod:`combireg.training_data`: a manifest of real cases, simulated pairs or images
in memory) are prepared once onto the internal grid and kept in memory. The cases are split
train/validation/test (seeded, recorded); augmentation (left-right flips, intensity gamma) is drawn anew every epoch from
``(Seed, epoch)``, so a resumed training is identical to an uninterrupted one.

Files (``-o model.pt``): ``model.pt`` (the kept model, see :mod:`combireg.network`),
``model.pt.ckpt`` (the latest epoch's full state for ``--resume``), ``model.loss.png`` (the loss
curves). Each is written atomically (temporary file, then rename).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch

from .errors import CombiregError, first_line
from .image import Image
from .losses import gradient_regulariser, weighted_similarity
from .network import DrnModel, RegistrationUNet, _plain, _torch_load, atomic_torch_save, predict_both
from .optimize import torch_threads
from .params import TrainingSettings, load_training_settings
from .training_data import TrainingData, TrainingPair, images_data, manifest_data, synth_data
from .version import __version__
from .warp import identity_grid, warp_normalised

__all__ = [
    "TrainingSummary",
    "split_cases",
    "drn_loss",
    "check_outputs",
    "checkpoint_path",
    "curve_path",
    "train_drn",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "combireg-drn-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
#: Largest intensity gamma change of the augmentation: gamma in [exp(-0.2), exp(0.2)].
_GAMMA_LOG_RANGE = 0.2
#: Below this many internal voxels training runs on one thread (thread overhead dominates).
_SINGLE_THREAD_VOXELS = 32 ** 3

DataLike = Union["TrainingData", str, os.PathLike, int, Sequence[tuple[Image, Image]]]


# ============================================================================ data
def split_cases(ids: Sequence[str], validation_fraction: float, test_fraction: float,
                seed: int) -> dict[str, list[str]]:
    """A seeded train/validation/test split of case ids.

    Counts are rounded; with at least two cases and a positive fraction there is at least one
    validation case, and a test case only where at least two cases remain for the other sets.
    Training always keeps at least one case.
    """
    ids = list(ids)
    n = len(ids)
    order = [ids[i] for i in np.random.default_rng(int(seed)).permutation(n)]
    n_val = int(round(n * validation_fraction))
    n_test = int(round(n * test_fraction))
    if validation_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_test = min(n_test, max(n - 1 - n_val, 0))
    n_val = min(n_val, n - 1 - n_test)
    return {"train": order[n_val + n_test:], "validation": order[:n_val], "test": order[n_val:n_val + n_test]}


# ============================================================================ the loss
#: Gradient-norm clip of every training step (typical norms of the default network: 0.25-0.75).
MAX_GRADIENT_NORM = 1.0


def drn_loss(u_st: torch.Tensor, u_ts: torch.Tensor, source: torch.Tensor, target: torch.Tensor,
             scale: torch.Tensor, settings: TrainingSettings,
             grid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Eq. 1 for one pair: both directions' weighted similarities plus lambda times both
    regularisers.

    Parameters
    ----------
    u_st, u_ts : Tensor, (1, 3, Z, Y, X)
        Normalised fields ``f(S, T)`` and ``f(T, S)``.
    source, target : Tensor, (1, C, Z, Y, X)
    scale : Tensor, (3, 3)
        :func:`combireg.warp.gradient_scale` of the pair's internal grid.

    Returns
    -------
    loss : Tensor, ()
    terms : dict of float
    """
    if grid is None:
        grid = identity_grid(source.shape[2:], source.device, source.dtype)
    sim_f, terms_f = weighted_similarity(warp_normalised(source, u_st, grid), target, settings.metrics,
                                         settings.metric_weights, window=settings.ncc_window)
    sim_b, terms_b = weighted_similarity(warp_normalised(target, u_ts, grid), source, settings.metrics,
                                         settings.metric_weights, window=settings.ncc_window)
    reg = gradient_regulariser(u_st, scale) + gradient_regulariser(u_ts, scale)
    loss = sim_f + sim_b + settings.regularization_weight * reg
    terms = {**{f"forward_{k}": v for k, v in terms_f.items()}, **{f"backward_{k}": v for k, v in terms_b.items()},
             "regularisation": float(reg.detach())}
    return loss, terms


def _batch_loss(network: torch.nn.Module, pairs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                settings: TrainingSettings, grid: torch.Tensor) -> torch.Tensor:
    device = grid.device
    source = torch.stack([p[0] for p in pairs]).to(device)
    target = torch.stack([p[1] for p in pairs]).to(device)
    # Through the module's own forward (DistributedDataParallel's, when wrapped): its gradient
    # hooks must see the step.
    u_st, u_ts = predict_both(network, source, target)
    total = source.new_zeros(())
    for i, (_, _, scale) in enumerate(pairs):
        loss, _ = drn_loss(u_st[i:i + 1], u_ts[i:i + 1], source[i:i + 1], target[i:i + 1], scale.to(device),
                           settings, grid)
        total = total + loss
    return total / len(pairs)


def _augment(pair: TrainingPair, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A left-right flip of the internal grid's x axis (both images) and a gamma per image and
    channel. Neither changes the gradient scale (a flip keeps the grid's extents)."""
    source, target = pair.source, pair.target
    if rng.random() < 0.5:
        source, target = source.flip(-1), target.flip(-1)
    gammas = np.exp(rng.uniform(-_GAMMA_LOG_RANGE, _GAMMA_LOG_RANGE, size=(2, source.shape[0])))
    source = source.clamp_min(0) ** torch.as_tensor(gammas[0], dtype=source.dtype).view(-1, 1, 1, 1)
    target = target.clamp_min(0) ** torch.as_tensor(gammas[1], dtype=target.dtype).view(-1, 1, 1, 1)
    return source, target, pair.scale


# ============================================================================ outputs
def checkpoint_path(out_path: str | os.PathLike) -> Path:
    """``model.pt`` -> ``model.pt.ckpt``: the latest epoch's full training state."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".ckpt")


def curve_path(out_path: str | os.PathLike) -> Path:
    """``model.pt`` -> ``model.loss.png``: the loss curves."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".loss.png")


def check_outputs(out_path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Check, before any work, that the model (and its checkpoint) may be written.

    Raises
    ------
    CombiregError
        ``out_path`` is a folder; the folder is not writable; the model or a checkpoint exists
        without ``overwrite``/``resume``; ``resume`` without a checkpoint.
    """
    out_path = Path(out_path).absolute()
    if out_path.is_dir():
        raise CombiregError(f"{out_path}: is a directory; give a model file name such as model.pt")
    ckpt = checkpoint_path(out_path)
    if resume:
        if not ckpt.is_file():
            raise CombiregError(f"{ckpt}: no checkpoint to resume from")
    elif not overwrite:
        if out_path.exists():
            raise CombiregError(f"{out_path}: exists (use --overwrite to replace it, or --resume)")
        if ckpt.exists():
            raise CombiregError(f"{ckpt}: a checkpoint exists (use --resume to continue it or --overwrite to start "
                                "afresh)")
    parent = out_path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:  # a real probe: os.access() says yes to root everywhere, even on read-only mounts
        fd, probe = tempfile.mkstemp(prefix=".combireg-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError:
        raise CombiregError(f"{out_path.parent}: not writable") from None
    return out_path


def _write_curve(path: Path, history: list[dict], best_epoch: int | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    val = [(h["epoch"], h["validation_loss"]) for h in history if h.get("validation_loss") is not None]
    if val:
        ax.plot([e for e, _ in val], [v for _, v in val], "s-", label="validation")
    if best_epoch is not None:
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"kept (epoch {best_epoch})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (Eq. 1)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)


# ============================================================================ training
@dataclass
class TrainingSummary:
    """What a training run did (also stored as the model file's ``training`` entry)."""

    model_path: Path
    checkpoint_path: Path
    curve_path: Path
    epochs: int
    start_epoch: int
    best_epoch: int
    selection: str  # "validation", "training" (no validation cases) or "last" (KeepBest false)
    best_loss: float | None
    final_train_loss: float | None
    final_validation_loss: float | None
    test_loss: float | None
    history: list
    split: dict
    data: dict
    num_parameters: int
    seconds: float  # this call, data loading included
    training_seconds: float  # epochs only, summed over resumed runs
    settings: dict = field(default_factory=dict)
    device: str = "cpu"
    world_size: int = 1  # torch.distributed ranks that trained together
    final_parameters_sha256: str = ""  # of the last epoch's weights: equal on every rank

    def to_dict(self) -> dict:
        return _plain({
            "epochs": self.epochs, "start_epoch": self.start_epoch, "best_epoch": self.best_epoch,
            "selection": self.selection, "best_loss": self.best_loss, "final_train_loss": self.final_train_loss,
            "final_validation_loss": self.final_validation_loss, "test_loss": self.test_loss,
            "history": self.history, "split": self.split, "data": self.data, "num_parameters": self.num_parameters,
            "seconds": round(self.seconds, 1), "training_seconds": round(self.training_seconds, 1),
            "settings": self.settings, "combireg_version": __version__, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": self.device, "world_size": self.world_size,
            "final_parameters_sha256": self.final_parameters_sha256,
        })

    def format(self) -> str:
        """A few lines for the terminal (and BENCHMARKS.md)."""
        def num(v):
            return "n/a" if v is None else f"{v:.5f}"
        data = self.data
        if data.get("kind") == "synth":
            what = (f"{data['pairs']} simulated pairs ({data['spacing_mm']:g} mm, seeds {data['first_seed']}.."
                    f"{data['first_seed'] + data['pairs'] - 1}, {data.get('seconds_per_pair', '?')} s/pair)")
        elif data.get("kind") == "manifest":
            what = f"{data['cases']} cases of {data['manifest']}"
        else:
            what = f"{len(sum(self.split.values(), []))} pairs"
        split = ", ".join(f"{k} {len(v)}" for k, v in self.split.items())
        return "\n".join([
            f"data: {what}; split {split}",
            f"epochs: {self.epochs} (this run from epoch {self.start_epoch + 1}), kept epoch {self.best_epoch} "
            f"by {self.selection} loss",
            f"loss: train {num(self.final_train_loss)}, validation {num(self.final_validation_loss)} (last epoch); "
            f"kept {num(self.best_loss)}; test {num(self.test_loss)}",
            f"network: {self.num_parameters} parameters; {self.seconds:.1f} s this run (data included), "
            f"{self.training_seconds:.1f} s of training epochs in all",
            f"model: {self.model_path}  (loss curves: {self.curve_path})",
        ])


def _as_data(data: DataLike, settings: TrainingSettings, progress) -> TrainingData:
    if isinstance(data, TrainingData):
        if tuple(data.internal_shape) != tuple(settings.internal_shape):
            raise CombiregError(f"the training data were prepared on an internal grid {tuple(data.internal_shape)} "
                                f"but the parameters ask for {tuple(settings.internal_shape)} (Z, Y, X)")
        if tuple(data.normalization_percentiles) != tuple(settings.normalization_percentiles):
            raise CombiregError("the training data were normalised with other NormalizationPercentiles than the "
                                "parameters give")
        return data
    if isinstance(data, bool):
        raise TypeError("data must be training data, a manifest path, a pair count or image pairs")
    if isinstance(data, int):
        return synth_data(data, settings, progress=progress)
    if isinstance(data, (str, os.PathLike)):
        return manifest_data(data, settings, progress=progress)
    return images_data(list(data), settings)


def _config(settings: TrainingSettings, channels: int, fingerprint: str | None) -> dict:
    """What must not change between a checkpoint and a resumed run (all but the epoch count,
    KeepBest and threads)."""
    return {
        "architecture": {"channels": int(channels), "features": list(settings.features)},
        "InternalGridSize": list(settings.internal_size),
        "Metric": list(settings.metrics),
        "MetricWeights": list(settings.metric_weights),
        "NCCWindowSize": settings.ncc_window,
        "RegularizationWeight": settings.regularization_weight,
        "LearningRate": settings.learning_rate,
        "Optimizer": settings.optimizer,
        "BatchSize": settings.batch_size,
        "ValidationFraction": settings.validation_fraction,
        "TestFraction": settings.test_fraction,
        "Augmentation": settings.augmentation,
        "Seed": settings.seed,
        "NormalizationPercentiles": list(settings.normalization_percentiles),
        "data": fingerprint,
    }


def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _config_difference(saved: dict, current: dict, skip_data: bool = False) -> list[str]:
    keys = [k for k in dict.fromkeys([*saved, *current]) if not (skip_data and k == "data")]
    diffs = []
    for key in keys:
        if saved.get(key) != current.get(key):
            if key == "data":
                diffs.append("the training data")
            else:
                diffs.append(f"{key} ({_short(saved.get(key))} in the checkpoint, {_short(current.get(key))} now)")
    return diffs


def _short(value) -> str:
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {_short(v)}" for k, v in value.items())
    return str(value)


def _load_checkpoint(path: Path) -> dict:
    ckpt = _torch_load(path, "DRN checkpoint")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CombiregError(f"{path}: not a combireg DRN checkpoint (format {ckpt.get('format')!r})")
    if ckpt.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CombiregError(f"{path}: checkpoint format version {ckpt.get('format_version')!r} is not supported by "
                            f"combireg {__version__} (reads {CHECKPOINT_FORMAT_VERSION}); start afresh with --overwrite")
    for key in ("config", "config_hash", "epoch", "model_state", "optimizer_state", "best_state", "history"):
        if key not in ckpt:
            raise CombiregError(f"{path}: checkpoint lacks {key}")
    return ckpt


def _refuse_other_config(path: Path, saved: dict, current: dict, skip_data: bool = False) -> None:
    diffs = _config_difference(saved, current, skip_data=skip_data)
    if diffs:
        raise CombiregError(f"{path}: --resume from a checkpoint of another configuration (differs in "
                            f"{'; '.join(diffs)}); use the same data and parameters, or --overwrite to start afresh")




def _mean_loss(network: RegistrationUNet, pairs: Sequence[TrainingPair], settings: TrainingSettings,
               grid: torch.Tensor) -> float | None:
    if not pairs:
        return None
    network.eval()
    with torch.no_grad():
        total = sum(float(_batch_loss(network, [(p.source, p.target, p.scale)], settings, grid)) for p in pairs)
    return total / len(pairs)


@dataclass(frozen=True)
class _Ranks:
    """Where this process stands in a torch.distributed run (rank 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1
    joined_here: bool = False  # this call initialised the process group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _join_process_group(device: torch.device) -> tuple[_Ranks, torch.device]:
    """Join the process group of a ``torchrun`` launch (``WORLD_SIZE`` > 1 in the environment).

    gloo on the CPU, NCCL on CUDA (each rank on GPU ``LOCAL_RANK``); a group the caller
    already initialised is used as it is.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    import torch.distributed as dist

    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return _Ranks(), device
    if not dist.is_available():
        raise CombiregError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    joined = False
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        except Exception as exc:  # a wrong MASTER_ADDR/PORT etc.: one line, not a trace
            raise CombiregError(f"cannot join the torch.distributed process group ({first_line(exc)})") from None
        joined = True
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
        torch.cuda.set_device(device)
    return _Ranks(dist.get_rank(), dist.get_world_size(), joined), device


def _state_sha256(network: torch.nn.Module) -> str:
    """sha256 of the weights (float32 bytes in state-dict order): equal weights, equal digest."""
    digest = hashlib.sha256()
    for name, value in network.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def train_drn(data: DataLike, params: TrainingSettings | str | os.PathLike | None, out_path: str | os.PathLike, *,
              resume: bool = False, epochs: int | None = None, overwrite: bool = False,
              progress: Callable[[dict], None] | None = None,
              device: str | torch.device = "cpu") -> TrainingSummary:
    """Train the DRN on Eq. 1 and write the model, its checkpoint and the loss curves.

    Parameters
    ----------
    data : TrainingData, path, int or sequence of (Image, Image)
        Prepared data (:func:`~combireg.training_data.manifest_data`,
        :func:`~combireg.training_data.synth_data`, :func:`~combireg.training_data.images_data`), a
        manifest CSV, a number of pairs to simulate (defaults of ``synth_data``), or
        in-memory (source, target) pairs.
    params : TrainingSettings, path or None
        Training parameters (``params/drn_train.txt`` syntax); None = the built-in defaults.
    out_path : path
        The model file (``model.pt``); ``model.pt.ckpt`` and ``model.loss.png`` go beside it.
    resume : bool
        Continue from ``model.pt.ckpt`` after its last finished epoch; the data and every
        parameter except NumberOfEpochs, KeepBest and NumberOfThreads must be the same.
    epochs : int, optional
        Total number of epochs (overrides NumberOfEpochs); with ``resume``, where to stop.
    overwrite : bool
        Replace an existing model and checkpoint (else they are refused).
    device : str or torch.device
        Where the network trains ("cpu", "cuda", "cuda:1"); the data stay on the CPU and move
        per step.
    progress : callable, optional
        Receives dicts (on rank 0 only): ``{"event": "data", "case"}`` while loading,
        ``{"event": "start", "start_epoch", "epochs", "steps_per_epoch", "split"}``,
        ``{"event": "step", "epoch", "step", "loss"}`` after every optimiser step and
        ``{"event": "epoch", "epoch", "train_loss", "validation_loss", "best_epoch"}``.

    Returns
    -------
    TrainingSummary

    Raises
    ------
    CombiregError
        Bad parameters, data or output paths, a checkpoint of another configuration,
        divergence. Nothing is written before the data are loaded and checked.

    Notes
    -----
    Under ``torchrun`` (``WORLD_SIZE`` > 1) the network is wrapped in
    DistributedDataParallel (gloo on the CPU, NCCL on CUDA): every rank loads the data, the
    epoch's shuffled order is the same on all ranks and rank ``r`` trains on its pairs
    ``r, r + W, r + 2W, ...`` (each rank the same number of steps, wrapping around), gradients
    are averaged across ranks, and only rank 0 writes the checkpoint, the model and the
    curves. An epoch then takes ``ceil(train / (BatchSize * W))`` steps.
    """
    clock = time.perf_counter()
    settings = params if isinstance(params, TrainingSettings) else load_training_settings(params)
    if epochs is not None:
        if int(epochs) < 1:
            raise CombiregError(f"--epochs must be >= 1, got {epochs}")
        settings = settings.replace(epochs=int(epochs))
    out_path = check_outputs(out_path, resume=resume, overwrite=overwrite)
    ckpt_file = checkpoint_path(out_path)
    ckpt = None
    if resume:  # refuse early, before loading data, where the parameters alone differ
        ckpt = _load_checkpoint(ckpt_file)
        saved_channels = ckpt["config"].get("architecture", {}).get("channels", 0)
        _refuse_other_config(ckpt_file, ckpt["config"], _config(settings, saved_channels, None), skip_data=True)

    ranks, device = _join_process_group(torch.device(device))
    emit = (progress if ranks.is_main else None) or (lambda event: None)
    data = _as_data(data, settings, lambda case_id: emit({"event": "data", "case": case_id}))
    config = _config(settings, data.channels, data.fingerprint())
    if ckpt is not None:
        _refuse_other_config(ckpt_file, ckpt["config"], config)

    split = split_cases(data.ids, settings.validation_fraction, settings.test_fraction, settings.seed)
    by_id = {p.id: p for p in data.pairs}
    train_pairs = [by_id[i] for i in split["train"]]
    val_pairs = [by_id[i] for i in split["validation"]]
    test_pairs = [by_id[i] for i in split["test"]]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        network = RegistrationUNet(data.channels, settings.features)
    network.to(device)
    model: torch.nn.Module = network
    if ranks.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
    optimiser = torch.optim.Adam(network.parameters(), lr=settings.learning_rate)
    history: list[dict] = []
    start_epoch, best_epoch, best_loss, elapsed_before = 0, 0, None, 0.0
    best_state = {k: v.clone() for k, v in network.state_dict().items()}
    if ckpt is not None:
        try:
            network.load_state_dict(ckpt["model_state"])
            optimiser.load_state_dict(ckpt["optimizer_state"])
        except Exception as exc:
            raise CombiregError(f"{ckpt_file}: inconsistent checkpoint ({first_line(exc)})") from None
        start_epoch = int(ckpt["epoch"])
        best_epoch, best_loss = int(ckpt.get("best_epoch", 0)), ckpt.get("best_loss")
        best_state = ckpt["best_state"]
        history = list(ckpt["history"])
        elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        log.info("resuming %s after epoch %d", ckpt_file, start_epoch)

    selection = "last" if not settings.keep_best else ("validation" if val_pairs else "training")
    batch = settings.batch_size
    steps = max(1, math.ceil(len(train_pairs) / (batch * ranks.world)))
    emit({"event": "start", "start_epoch": start_epoch, "epochs": settings.epochs, "steps_per_epoch": steps,
          "split": split})
    voxels = int(np.prod(data.internal_shape))
    threads = settings.num_threads or (1 if voxels < _SINGLE_THREAD_VOXELS else torch.get_num_threads())
    grid = identity_grid(data.internal_shape, device)
    run_start = time.perf_counter()
    with torch_threads(threads):
        for epoch in range(start_epoch + 1, settings.epochs + 1):
            epoch_start = time.perf_counter()
            # Why (seed, epoch): the epoch's order and augmentation do not depend on how many
            # epochs ran in this process, so --resume reproduces an uninterrupted run.
            rng = np.random.default_rng([settings.seed, epoch])
            order = [train_pairs[i] for i in rng.permutation(len(train_pairs))]
            if ranks.world > 1:  # this rank's shard, as many pairs on every rank
                order = [order[(ranks.rank + ranks.world * k) % len(order)] for k in range(steps * batch)]
            network.train()
            losses = []
            for step in range(steps):
                members = order[step * batch:(step + 1) * batch]
                inputs = [_augment(p, rng) if settings.augmentation else (p.source, p.target, p.scale)
                          for p in members]
                optimiser.zero_grad(set_to_none=True)
                loss = _batch_loss(model, inputs, settings, grid)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise CombiregError(f"training diverged in epoch {epoch} (loss {value}); lower LearningRate")
                loss.backward()
                # Why: a step that throws the fields out of the field of view gives a gradient
                # spike that Adam turns into a large weight change; unclipped, a CPU training at
                # lr 1e-3 blew up in epoch 11 (loss 0.26 -> 228) and never fully recovered.
                torch.nn.utils.clip_grad_norm_(network.parameters(), MAX_GRADIENT_NORM)
                optimiser.step()
                losses.append(value)
                emit({"event": "step", "epoch": epoch, "step": step + 1, "loss": value})
            train_loss = float(np.mean(losses))
            if ranks.world > 1:  # the epoch's loss over all ranks' pairs
                import torch.distributed as dist

                reduced = torch.tensor([train_loss], dtype=torch.float64, device=device)
                dist.all_reduce(reduced)
                train_loss = float(reduced.item()) / ranks.world
            val_loss = _mean_loss(network, val_pairs, settings, grid)
            score = val_loss if val_pairs else train_loss
            if best_loss is None or score < best_loss or not settings.keep_best:
                best_loss, best_epoch = score, epoch
                best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
            history.append({"epoch": epoch, "train_loss": train_loss, "validation_loss": val_loss,
                            "seconds": round(time.perf_counter() - epoch_start, 2)})
            elapsed = elapsed_before + time.perf_counter() - run_start
            if ranks.is_main:
                atomic_torch_save({
                    "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION,
                    "combireg_version": __version__, "config": config, "config_hash": _config_hash(config),
                    "epoch": epoch, "model_state": network.state_dict(), "optimizer_state": optimiser.state_dict(),
                    "best_state": best_state, "best_epoch": best_epoch, "best_loss": best_loss,
                    "history": _plain(history), "split": split, "rng_state": torch.get_rng_state(),
                    "elapsed_s": elapsed,
                }, ckpt_file)
            emit({"event": "epoch", "epoch": epoch, "epochs": settings.epochs, "train_loss": train_loss,
                  "validation_loss": val_loss, "best_epoch": best_epoch})

        if not settings.keep_best and history:
            best_epoch = history[-1]["epoch"]
            best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
        final_sha256 = _state_sha256(network)
        kept = RegistrationUNet(data.channels, settings.features)
        kept.load_state_dict(best_state)
        kept.to(device)
        test_loss = _mean_loss(kept, test_pairs, settings, grid)
        kept.to("cpu")
    seconds = time.perf_counter() - run_start
    last = history[-1] if history else {}
    summary = TrainingSummary(
        model_path=out_path, checkpoint_path=ckpt_file, curve_path=curve_path(out_path),
        epochs=int(last.get("epoch", start_epoch)), start_epoch=start_epoch, best_epoch=best_epoch,
        selection=selection, best_loss=best_loss, final_train_loss=last.get("train_loss"),
        final_validation_loss=last.get("validation_loss"), test_loss=test_loss, history=history, split=split,
        data=data.description, num_parameters=kept.num_parameters(), seconds=time.perf_counter() - clock,
        training_seconds=elapsed_before + seconds, settings=_plain(settings.to_parameter_map()),
        device=str(device), world_size=ranks.world, final_parameters_sha256=final_sha256)
    header = (f"// combireg {__version__}: DRN training parameters (source: {settings.source}).\n"
              f"// `combireg train ... -p` with this file reproduces the training.\n")
    if ranks.is_main:
        drn = DrnModel(kept, data.internal_shape, data.normalization_percentiles, header + settings.to_text(),
                       summary.to_dict(), out_path)
        drn.save(out_path)
        title = (f"DRN {'+'.join(settings.metrics)}, lambda {settings.regularization_weight:g}, "
                 f"lr {settings.learning_rate:g}")
        if history:
            _write_curve(summary.curve_path, history, best_epoch if settings.keep_best else None, title)
        log.info("trained %d epochs in %.1f s; kept epoch %d", summary.epochs, seconds, best_epoch)
    if ranks.world > 1:
        import torch.distributed as dist

        dist.barrier()  # the files exist when any rank returns
        if ranks.joined_here:
            dist.destroy_process_group()
    return summary
