"""``combireg evaluate DATASET --method NAME=SPEC ... -o DIR``: the paper's protocol on a dataset."""
from __future__ import annotations

import sys

import click

from combireg.device import DEVICE_HELP
from combireg.landmarks import LANDMARK_SPACES

from .tre_cmd import SPACE_HELP

METHOD_HELP = "Method to run, repeatable (SPEC grammar above)."


@click.command("evaluate")
@click.argument("dataset", metavar="DATASET")
@click.option("-m", "--method", "methods", multiple=True, required=True, metavar="NAME=SPEC", help=METHOD_HELP)
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False),
              help="Output directory; a directory holding a results.csv is resumed (finished cells are skipped).")
@click.option("--compare", "compare", multiple=True, metavar="A:B",
              help="Paired t-tests of method A against B on per-case mean TRE and mean Dice, repeatable "
                   "(default: every method against the first).")
@click.option("--pairs", default=None, metavar="val|test|training|PAIRS.csv",
              help="Learn2Reg JSON only: which pairs to register [default: val = registration_val], or a CSV "
                   "file with fixed,moving columns (paths relative to the JSON).")
@click.option("--landmark-space", type=click.Choice(LANDMARK_SPACES, case_sensitive=False), default=None,
              help=SPACE_HELP)
@click.option("--device", default="cpu", show_default=True, metavar="auto|cpu|cuda", help=DEVICE_HELP)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Cells at once: 1 runs them one after another in this process (use 1 for timed benchmarks); "
                   "more run them on a local dask cluster of that many worker processes.")
@click.option("--threads-per-worker", type=click.IntRange(min=1), default=None,
              help="torch/ITK threads of each parallel cell [default: the cores divided among the workers].")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Run the cells on the existing dask cluster at ADDRESS (tcp://HOST:PORT).")
@click.option("--overwrite", is_flag=True, help="Start afresh: ignore and replace a previous results.csv.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def evaluate(dataset: str, methods: tuple, output: str, compare: tuple, pairs: str | None, landmark_space: str | None,
             device: str, workers: int, threads_per_worker: int | None, scheduler: str | None, overwrite: bool,
             quiet: bool) -> None:
    """Run every method on every case of DATASET and report TRE and Dice like the paper's tables.

    \b
    DATASET is one of
      a manifest CSV   id,source,target[,target_landmarks,source_landmarks][,target_labels,
                       source_labels][,target_mask,source_mask][,lesion] (channels comma-joined
                       and CSV-quoted, paths relative to the manifest)
      a BraTS-Reg folder  BraTSReg_NNN/BraTSReg_NNN_{00,01}_*_{t1,t1ce,t2,flair}.nii.gz and
                       _landmarks.csv (baseline 00 = target, follow-up 01 = source)
      a Learn2Reg JSON    NAME_dataset.json with imagesTr/, labelsTr/, keypoints (fixed = target,
                       moving = source; --pairs)

    Each case x method is registered and saved under DIR/cases/<case>/<method>/ (with
    tre.csv/tre.json where the case has landmarks, dice.csv where it has label maps). DIR gets
    results.csv (one row per cell: TRE statistics, mean Dice and HD95, time, peak memory,
    % folding), summary.md (TRE and Dice per method, paired t-tests with 95% CI), ttests.csv
    and box plots. A failing case is recorded as failed and the rest go on.
    With --workers N (or --scheduler) the cells run in parallel on dask; timings are only
    comparable between cells run with --workers 1 (the default).

    \b
    SPEC is a comma-separated list of KEY:VALUE items:
      params:FILE     elastix-syntax parameter file (default: built-in defaults)
      init:FIELD      initial forward field; {case} is replaced by the case id
      baseline:elastix  elastix rigid+affine+B-spline baseline (params:FILE = elastix parameter file)
      baseline:syn    affine + ITK SyN baseline (params:FILE = SyN settings file)
      drn:MODEL       a DRN model file (or drn, the shipped one) starting the optimisation
    A bare FILE means params:FILE. Relative paths are relative to the current folder.

    \b
    Examples:
      --method mse=params/mse.txt --method ncc=params/ncc.txt --compare ncc:mse
      --method warm=params/default.txt,init:out0/cases/{case}/mse/field.nii.gz
    """
    from tqdm import tqdm

    from combireg.device import resolve_device
    from combireg.errors import CombiregError
    from combireg.cases import read_cases
    from combireg.evaluate import run_evaluation
    from combireg.methods import parse_method

    if scheduler is not None and workers != 1:
        raise CombiregError("--workers starts a local cluster; with --scheduler the cluster's own workers run the "
                            "cells (give one or the other)")
    device = str(resolve_device(device))
    specs = [parse_method(m) for m in methods]  # user errors before the bar appears
    total = len(read_cases(dataset, pairs=pairs)) * len(specs)
    # disable=None: no bar when stderr is not a terminal (logs stay readable)
    bar = tqdm(total=total, unit="cell", disable=True if quiet else None, dynamic_ncols=True)

    def progress(event: dict) -> None:
        if event["event"] == "start":
            bar.set_description(f"{event['case']} / {event['method']}")
        else:
            bar.update(1)
            bar.set_postfix(last=event["status"], refresh=False)

    try:
        ev = run_evaluation(dataset, specs, output, compare=compare, device=device, landmark_space=landmark_space,
                            overwrite=overwrite, progress=progress, workers=workers,
                            threads_per_worker=threads_per_worker, scheduler=scheduler, pairs=pairs)
    except KeyboardInterrupt:
        bar.close()
        click.echo("combireg: interrupted; finished cells are in results.csv (rerun the command to resume)",
                   err=True)
        sys.exit(130)
    finally:
        bar.close()
    click.echo(ev.summary_path.read_text().split("\n## Failed cells")[0].rstrip())
    click.echo("")
    click.echo(f"{ev.ran} cell(s) run, {ev.skipped} skipped (already finished), {len(ev.failed)} failed")
    for case_id, method, error in ev.failed:
        click.echo(f"  failed: {case_id} / {method}: {error}", err=True)
    click.echo(f"results in {ev.outdir}")
