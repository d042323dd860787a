"""``combireg baseline METHOD SRC TGT``: register with another tool, writing ``combireg run``'s outputs."""
from __future__ import annotations

import click

from combireg.errors import CombiregError


def _channels(value: str, role: str) -> list[str]:
    paths = [p.strip() for p in value.split(",") if p.strip()]
    if not paths:
        raise CombiregError(f"{role}: no image file given")
    return paths


@click.group()
def baseline() -> None:
    """Baseline methods with the same inputs and outputs as `combireg run`."""


@baseline.command("elastix")
@click.argument("source")
@click.argument("target")
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False),
              help="Output directory (created; must be empty unless --overwrite).")
@click.option("-p", "--params", "params", type=click.Path(dir_okay=False), default=None,
              help="elastix parameter file (default: itk-elastix's default B-spline map = "
                   "params/elastix_bspline.txt).")
@click.option("--overwrite", is_flag=True, help="Replace the contents of a non-empty output directory.")
def elastix(source: str, target: str, output: str, params: str | None, overwrite: bool) -> None:
    """B-spline registration of SOURCE to TARGET with itk-elastix (each one image or comma-separated
    channel files; all channels through elastix's multi-image registration, one metric per pair).

    Writes what `combireg run` writes: field.nii.gz (target grid, LPS mm, target x -> source
    x + u(x)), field_inverse.nii.gz (source grid), warped_<k>.nii.gz, params.txt (the elastix map
    used) and report.json.
    """
    from combireg.adapters.elastix import read_parameter_map, register_elastix
    from combireg.outputs import prepare_output_dir

    if params is not None:
        read_parameter_map(params)  # a bad file fails before any work
    outdir = prepare_output_dir(output, overwrite=overwrite)
    result = register_elastix(_channels(source, "source"), _channels(target, "target"), parameter_file=params)
    result.save(outdir, overwrite=overwrite)
    rep = result.report
    jac = rep["jacobian"]
    click.echo(f"registered with elastix in {rep['wall_time_s']:.1f} s (peak memory {rep['peak_memory_mb']:.0f} MB); "
               f"Jacobian min {jac['min']:.3f}, {jac['percent_nonpositive']:.3f}% folded")
    click.echo(f"results in {outdir}")
