"""``combireg evaluate MANIFEST --method NAME=SPEC ... -o DIR``: the paper's protocol on a dataset."""
from __future__ import annotations

import sys

import click

from combireg.device import DEVICE_HELP
from combireg.landmarks import LANDMARK_SPACES

from .tre_cmd import SPACE_HELP

METHOD_HELP = "Method to run, repeatable (SPEC grammar above)."


@click.command("evaluate")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("-m", "--method", "methods", multiple=True, required=True, metavar="NAME=SPEC", help=METHOD_HELP)
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False),
              help="Output directory; a directory holding a results.csv is resumed (finished cells are skipped).")
@click.option("--compare", "compare", multiple=True, metavar="A:B",
              help="Paired t-test of method A against B on per-case mean TRE, repeatable "
                   "(default: every method against the first).")
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
def evaluate(manifest: str, methods: tuple, output: str, compare: tuple, landmark_space: str | None, device: str,
             workers: int, threads_per_worker: int | None, scheduler: str | None, overwrite: bool,
             quiet: bool) -> None:
    """Run every method on every case of MANIFEST and report TRE like the paper's tables.

    MANIFEST is a CSV with the header id,source,target,target_landmarks,source_landmarks
    (channels comma-joined and CSV-quoted, paths relative to the manifest). Each case x method
    is registered and saved under DIR/cases/<case>/<method>/ (with tre.csv/tre.json).
    DIR gets results.csv (one row per cell: TRE statistics, time, peak memory, % folding),
    summary.md (mean ± std and median TRE per method, paired t-tests with 95% CI),
    ttests.csv and tre_boxplot.png. A failing case is recorded as failed and the rest go on.
    With --workers N (or --scheduler) the cells run in parallel on dask; timings are only
    comparable between cells run with --workers 1 (the default).

    \b
    SPEC is a comma-separated list of KEY:VALUE items:
      params:FILE     elastix-syntax parameter file (default: built-in defaults)
      init:FIELD      initial forward field; {case} is replaced by the case id
      baseline:elastix  elastix rigid+affine+B-spline baseline (params:FILE = elastix parameter file)
      baseline:syn    affine + ITK SyN baseline (params:FILE = SyN settings file)
      drn:MODEL       reserved (not available yet)
    A bare FILE means params:FILE. Relative paths are relative to the current folder.

    \b
    Examples:
      --method mse=params/mse.txt --method ncc=params/ncc.txt --compare ncc:mse
      --method warm=params/default.txt,init:out0/cases/{case}/mse/field.nii.gz
    """
    from tqdm import tqdm

    from combireg.device import resolve_device
    from combireg.errors import CombiregError
    from combireg.cases import read_manifest
    from combireg.evaluate import run_evaluation
    from combireg.methods import parse_method

    if scheduler is not None and workers != 1:
        raise CombiregError("--workers starts a local cluster; with --scheduler the cluster's own workers run the "
                            "cells (give one or the other)")
    device = str(resolve_device(device))
    specs = [parse_method(m) for m in methods]  # user errors before the bar appears
    total = len(read_manifest(manifest)) * len(specs)
    # disable=None: no bar when stderr is not a terminal (logs stay readable)
    bar = tqdm(total=total, unit="cell", disable=True if quiet else None, dynamic_ncols=True)

    def progress(event: dict) -> None:
        if event["event"] == "start":
            bar.set_description(f"{event['case']} / {event['method']}")
        else:
            bar.update(1)
            bar.set_postfix(last=event["status"], refresh=False)

    try:
        ev = run_evaluation(manifest, specs, output, compare=compare, device=device, landmark_space=landmark_space,
                            overwrite=overwrite, progress=progress, workers=workers,
                            threads_per_worker=threads_per_worker, scheduler=scheduler)
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
