"""``combireg compare SRC TGT``: combireg and the classical baselines on one pair, one table."""
from __future__ import annotations

import click

from combireg.landmarks import LANDMARK_SPACES


@click.command()
@click.argument("source")
@click.argument("target")
@click.option("--target-landmarks", required=True, type=click.Path(dir_okay=False),
              help="Landmarks on the target (.fcsv, .mrk.json, .csv, elastix points).")
@click.option("--source-landmarks", required=True, type=click.Path(dir_okay=False),
              help="Corresponding landmarks on the source (matched by label, else by order).")
@click.option("-o", "--output", "output", default="compare_out", show_default=True, type=click.Path(file_okay=False),
              help="Output directory (created; must be empty unless --overwrite).")
@click.option("-m", "--method", "methods", multiple=True, metavar="NAME",
              help="Method to run, repeatable: combireg, elastix, syn, ants "
                   "(default: combireg, elastix, syn; ants needs the optional antspyx).")
@click.option("-p", "--params", "params", type=click.Path(dir_okay=False), default=None,
              help="combireg's parameter file (default: built-in defaults = params/default.txt).")
@click.option("--elastix-params", type=click.Path(dir_okay=False), default=None,
              help="elastix parameter file of the elastix baseline (default: the rigid, affine, B-spline "
                   "chain; params/elastix_bspline.txt: B-spline only).")
@click.option("--syn-params", type=click.Path(dir_okay=False), default=None,
              help="Settings file of the SyN baseline (as the params.txt of `combireg baseline syn`).")
@click.option("--landmark-space", type=click.Choice(LANDMARK_SPACES, case_sensitive=False), default=None,
              help="Space of landmark files that do not declare theirs: lps (default for CSV), ras or index.")
@click.option("--device", default="cpu", show_default=True, help="combireg's torch device: cpu or cuda.")
@click.option("--overwrite", is_flag=True, help="Replace the contents of a non-empty output directory.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
def compare(source: str, target: str, target_landmarks: str, source_landmarks: str, output: str,
            methods: tuple, params: str | None, elastix_params: str | None, syn_params: str | None, landmark_space: str | None, device: str, overwrite: bool,
            quiet: bool) -> None:
    """Register SOURCE to TARGET with combireg (default preset) and the baselines (elastix rigid ->
    affine -> B-spline, affine + ITK SyN) and print one table: TRE before/after, robustness, wall time, peak memory, % folding.

    Writes each method's outputs (DIR/<method>/, the files of `combireg run`), compare.md,
    compare.json and qc.png (target and each warped source through the slices of largest initial
    difference, with checkerboards).
    """
    from combireg.compare import DEFAULT_METHODS, TABLE_NAME, compare_pair

    def progress(event: dict) -> None:
        if quiet:
            return
        if event["event"] == "start":
            click.echo(f"[{event['index']}/{event['total']}] {event['method']} ...", err=True)
        elif event["status"] != "ok":
            click.echo(f"[{event['index']}/{event['total']}] {event['method']} {event['status']}", err=True)

    result = compare_pair(source, target, target_landmarks, source_landmarks, output,
                          methods=methods or DEFAULT_METHODS, params=params, elastix_params=elastix_params,
                          syn_params=syn_params, landmark_space=landmark_space,
                          device=device, overwrite=overwrite, progress=progress)
    click.echo(result.table, nl=False)
    for name, error in result.failed:
        click.echo(f"combireg: warning: method {name}: {error}", err=True)
    click.echo(f"results in {result.outdir} ({TABLE_NAME}, compare.json, qc.png)")
