"""``combireg batch DATASET -o DIR``: register every case of a dataset on a dask cluster."""
from __future__ import annotations

import sys

import click

from combireg.device import DEVICE_HELP
from combireg.landmarks import LANDMARK_SPACES

from .tre_cmd import SPACE_HELP


@click.command("batch")
@click.argument("dataset", metavar="DATASET")
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False),
              help="Output directory: one folder per case (the files of `combireg run`) and batch_summary.json; "
                   "a directory holding a batch_summary.json is resumed (finished cases are skipped).")
@click.option("-p", "--params", "params", type=click.Path(dir_okay=False), default=None,
              help="elastix-syntax parameter file for every case (default: built-in defaults).")
@click.option("--init", "init", default=None, metavar="FIELD|MODEL.pt|drn",
              help="Initialisation as for `combireg run`; {case} in a FIELD path is replaced by the case id.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes of the local cluster [default: as many as the cores and the memory allow].")
@click.option("--threads-per-worker", type=click.IntRange(min=1), default=None,
              help="torch/ITK threads of each worker, which registers one case at a time "
                   "[default: the cores divided among the workers].")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Use the existing dask cluster at ADDRESS (tcp://HOST:PORT) instead of a local one.")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda", help=DEVICE_HELP)
@click.option("--landmark-space", type=click.Choice(LANDMARK_SPACES, case_sensitive=False), default=None,
              help=SPACE_HELP)
@click.option("--pairs", default=None, metavar="val|test|training|PAIRS.csv",
              help="Learn2Reg JSON only: which pairs to register [default: val = registration_val], or a CSV "
                   "file with fixed,moving columns.")
@click.option("--overwrite", is_flag=True, help="Register every case again, finished ones included.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def batch(dataset: str, output: str, params: str | None, init: str | None, workers: int | None,
          threads_per_worker: int | None, scheduler: str | None, device: str, landmark_space: str | None,
          pairs: str | None, overwrite: bool, quiet: bool) -> None:
    """Register every case of DATASET into DIR/<case id>/ on a dask.distributed cluster.

    DATASET is what `combireg evaluate` reads: a manifest CSV (id,source,target, optionally
    target_landmarks,source_landmarks and target_mask,source_mask; paths relative to it), a
    BraTS-Reg folder or a Learn2Reg JSON. Each case gets field.nii.gz, field_inverse.nii.gz,
    warped_<k>.nii.gz, params.txt and report.json (with the landmark TRE where the case has
    landmarks), written atomically. A case is finished when all of these are there and
    report.json reads back; a rerun skips finished cases. A failing case is recorded in
    DIR/batch_summary.json and the others go on.

    By default a local cluster of worker processes (127.0.0.1 only, no dashboard) runs one
    case per worker at a time; --scheduler ADDRESS uses an existing cluster instead. The
    terminal shows a progress bar and one summary line: dask's log lines go to DIR/dask.log
    (to the terminal as well with `combireg -v batch ...`), warnings of the cases to
    DIR/batch_summary.json.

    Exit status: 0 when every case is finished, 1 when some failed, 2 for an error before
    any case ran (bad input, unreachable scheduler).
    """
    from tqdm import tqdm

    from combireg.batch import run_batch
    from combireg.cases import read_cases

    total = len(read_cases(dataset, pairs=pairs))  # a bad dataset fails before the bar appears
    # disable=None: no bar when stderr is not a terminal (logs stay readable)
    bar = tqdm(total=total, unit="case", disable=True if quiet else None, dynamic_ncols=True)

    def progress(event: dict) -> None:
        if event["event"] == "started":
            threads = event["threads"] or "auto"
            bar.set_description(f"{event['workers']} worker(s) x {threads} thread(s)")
            return
        bar.update(1)
        bar.set_postfix(last=f"{event['case']} {event['event']}", refresh=False)

    try:
        summary = run_batch(dataset, output, params=params, init=init, device=device, workers=workers,
                            threads_per_worker=threads_per_worker, scheduler=scheduler,
                            landmark_space=landmark_space, overwrite=overwrite, progress=progress, pairs=pairs)
    except KeyboardInterrupt:
        bar.close()
        click.echo("combireg: interrupted; finished cases are kept (rerun the command to resume)", err=True)
        sys.exit(130)
    finally:
        bar.close()
    for case_id, error in summary.failed:
        click.echo(f"  failed: {case_id}: {error}", err=True)
    click.echo(summary.line())
    dask_log = " and dask.log" if (summary.outdir / "dask.log").is_file() else ""
    click.echo(f"results in {summary.outdir} (summary: {summary.summary_path.name}{dask_log})")
    if summary.failed:
        sys.exit(1)
