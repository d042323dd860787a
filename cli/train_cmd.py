"""``combireg train``: train the DRN (small 3-D U-Net) on the paper's loss."""
from __future__ import annotations

import os
from pathlib import Path

import click

from combireg.device import DEVICE_HELP, resolve_device
from combireg.errors import CombiregError


@click.command("train")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CSV of training cases (id,source,target columns as for `combireg evaluate`; others ignored).")
@click.option("--synth", "synth_pairs", type=click.IntRange(min=1), default=None,
              help="Train on this many pairs simulated from the MNI template (combireg synth), instead of a manifest.")
@click.option("--synth-spacing", default=3.0, show_default=True, type=click.FloatRange(min=0.5, max=10.0),
              help="Spacing (mm) of the simulated pairs; the internal grid is coarse, so 3 mm loses nothing.")
@click.option("--synth-seed", default=None, type=click.IntRange(min=0),
              help="Seed of the first simulated pair [default: 10000, disjoint from samples and benchmarks].")
@click.option("--synth-cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder keeping the prepared simulated pairs, reused by later trainings on the same data.")
@click.option("-p", "--params", type=click.Path(dir_okay=False), default=None,
              help="Training parameter file (elastix syntax, see params/drn_train.txt) [default: built-in defaults].")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Model file to write (model.pt); model.pt.ckpt and model.loss.png go beside it.")
@click.option("--resume", is_flag=True, help="Continue from OUTPUT.ckpt (same data and parameters).")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Total number of epochs (overrides NumberOfEpochs).")
@click.option("--overwrite", is_flag=True, help="Replace an existing model and checkpoint.")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda", help=DEVICE_HELP)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def train(manifest: Path | None, synth_pairs: int | None, synth_spacing: float, synth_seed: int | None,
          synth_cache: Path | None, params: str | None, output: Path, resume: bool, epochs: int | None,
          overwrite: bool, device: str, quiet: bool) -> None:
    """Train the deformable registration network (DRN) on --manifest cases or --synth pairs.

    The loss is the paper's Eq. 1 with the parameter file's metrics, weights and
    regularisation (bidirectional: u_st = f(S, T), u_ts = f(T, S)); Adam; the cases are split
    train/validation/test and the epoch with the lowest validation loss is kept. Every epoch
    is checkpointed (OUTPUT.ckpt) for --resume. Use the model with `combireg run --init MODEL`.
    """
    from tqdm import tqdm

    from combireg.params import load_training_settings
    from combireg.train import check_outputs, train_drn
    from combireg.training_data import SYNTH_SEED, manifest_data, synth_data

    if (manifest is None) == (synth_pairs is None):
        raise CombiregError("give exactly one of --manifest FILE and --synth N")
    if manifest is not None and (synth_seed is not None or synth_cache is not None):
        raise CombiregError("--synth-seed and --synth-cache go with --synth, not --manifest")
    settings = load_training_settings(params)
    torch_device = resolve_device(device)  # cuda without a GPU: one line, exit 2
    if epochs is not None:
        settings = settings.replace(epochs=epochs)
    check_outputs(output, resume=resume, overwrite=overwrite)  # before minutes of data loading

    # Under torchrun only rank 0 presents (the others train silently).
    main_rank = int(os.environ.get("RANK", "0") or 0) == 0
    disable = True if quiet or not main_rank else None  # None: no bar off a terminal
    with tqdm(total=synth_pairs, desc="data", unit="case", disable=disable, leave=False) as bar:
        def loaded(case_id: str) -> None:
            bar.update(1)
            bar.set_postfix_str(case_id, refresh=False)

        if manifest is not None:
            data = manifest_data(manifest, settings, progress=loaded)
        else:
            data = synth_data(synth_pairs, settings, seed=SYNTH_SEED if synth_seed is None else synth_seed,
                              spacing=synth_spacing, cache_dir=synth_cache, progress=loaded)

    bar = tqdm(unit="step", disable=disable, dynamic_ncols=True, leave=False)
    state: dict = {}

    def progress(event: dict) -> None:
        kind = event["event"]
        if kind == "start":
            state["epochs"] = event["epochs"]
            bar.reset(total=max(0, event["epochs"] - event["start_epoch"]) * event["steps_per_epoch"])
        elif kind == "step":
            bar.update(1)
            bar.set_description(f"epoch {event['epoch']}/{state.get('epochs', '?')}")
            bar.set_postfix(loss=f"{event['loss']:.4f}", **state.get("last", {}), refresh=False)
        elif kind == "epoch":
            last = {"train": f"{event['train_loss']:.4f}"}
            if event["validation_loss"] is not None:
                last["val"] = f"{event['validation_loss']:.4f}"
            state["last"] = last

    try:
        summary = train_drn(data, settings, output, resume=resume, overwrite=overwrite, progress=progress,
                            device=torch_device)
    finally:
        bar.close()
    if main_rank:
        click.echo(summary.format())

