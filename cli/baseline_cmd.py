"""``combireg baseline METHOD SRC TGT``: register with another tool, writing ``combireg run``'s outputs."""
from __future__ import annotations

import click

from combireg.errors import CombiregError

from .common import channel_paths, echo_registration


@click.group()
def baseline() -> None:
    """Baseline methods with the same inputs and outputs as `combireg run`."""


@baseline.command("elastix")
@click.argument("source")
@click.argument("target")
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False),
              help="Output directory (created; must be empty unless --overwrite).")
@click.option("-p", "--params", "params", type=click.Path(dir_okay=False), multiple=True,
              help="elastix parameter file, repeatable: the maps run in order, each from the transforms "
                   "before it (default: rigid, affine, B-spline = params/elastix_rigid.txt, "
                   "params/elastix_affine.txt, params/elastix_bspline.txt; `-p params/elastix_bspline.txt` "
                   "alone: B-spline only).")
@click.option("--overwrite", is_flag=True, help="Replace the contents of a non-empty output directory.")
def elastix(source: str, target: str, output: str, params: tuple, overwrite: bool) -> None:
    """Register SOURCE to TARGET with itk-elastix: by default rigid, then affine, then B-spline, as
    elastix users run it (each side one image or comma-separated channel files; all channels
    through elastix's multi-image registration, one metric per pair). Pyramid levels are stated
    in mm (8, 4, 2, 1 mm per axis) unless a parameter file sets its own schedule.

    Writes what `combireg run` writes: field.nii.gz (the whole chain; target grid, LPS mm, target
    x -> source x + u(x)), field_inverse.nii.gz (source grid), warped_<k>.nii.gz, params.txt (the
    elastix maps used, in order) and report.json.
    """
    from combireg.adapters.elastix import read_chain, register_elastix
    from combireg.outputs import prepare_output_dir

    if params:
        read_chain(params)  # a bad file fails before any work
    outdir = prepare_output_dir(output, overwrite=overwrite)
    result = register_elastix(channel_paths(source, "source"), channel_paths(target, "target"),
                              parameter_file=list(params) or None)
    result.save(outdir, overwrite=overwrite)
    stages = result.report["method"].split("_")[1:]
    echo_registration(result.report, f"elastix ({' -> '.join(stages)})")
    click.echo(f"results in {outdir}")


def _number_list(value: str | None, option: str, kind: type = int) -> tuple | None:
    """A comma-separated option value as a tuple of ``kind`` (int or float); None stays None."""
    if value is None:
        return None
    try:
        return tuple(kind(v) for v in value.replace(" ", ",").split(",") if v)
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise CombiregError(f"{option}: expected comma-separated {what}, got {value!r}") from None


@baseline.command("syn")
@click.argument("source")
@click.argument("target")
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False),
              help="Output directory (created; must be empty unless --overwrite).")
@click.option("-p", "--params", "params", type=click.Path(dir_okay=False), default=None,
              help="SyN parameter file, such as the params.txt of an earlier run (default: built-in settings).")
@click.option("--shrink-mm", "shrink_mm", default=None, metavar="S1,S2,...",
              help="Pyramid levels in mm, coarsest first (default 8,4,2): per axis max(1, mm / spacing).")
@click.option("--shrink", "shrink", default=None, metavar="F1,F2,...",
              help="Pyramid levels as shrink factors in voxels instead, the same on every axis.")
@click.option("--iterations", "iterations", default=None, metavar="N1,N2,...",
              help="Maximum iterations per level (default 100,70,20).")
@click.option("--cc-radius", "cc_radius", type=int, default=None, help="Cross-correlation radius in voxels (default 2).")
@click.option("--channel", "channel", type=int, default=None,
              help="Channel (0-based) that drives the registration (default 0); all channels are warped.")
@click.option("--prealign", "prealign", type=click.Choice(["affine", "rigid", "none"]), default=None,
              help="Linear stage before SyN (default affine, elastix on 3 mm copies).")
@click.option("--overwrite", is_flag=True, help="Replace the contents of a non-empty output directory.")
def syn(source: str, target: str, output: str, params: str | None, shrink_mm: str | None, shrink: str | None,
        iterations: str | None, cc_radius: int | None, channel: int | None, prealign: str | None,
        overwrite: bool) -> None:
    """Affine pre-alignment, then symmetric normalisation (SyN) of SOURCE to TARGET with ITK's
    SyNImageRegistrationMethod and ANTs' neighbourhood cross-correlation (each side one image or
    comma-separated channel files; one channel drives the registration, all are warped).

    Writes what `combireg run` writes: field.nii.gz (affine and SyN; target grid, LPS mm, target
    x -> source x + u(x)), field_inverse.nii.gz (SyN's own inverse, source grid),
    warped_<k>.nii.gz, params.txt (the SyN settings) and report.json.
    """
    from combireg.adapters.syn import SynSettings, read_syn_settings, register_syn
    from combireg.outputs import prepare_output_dir

    settings = read_syn_settings(params) if params is not None else SynSettings()
    if shrink is not None and shrink_mm is not None:
        raise CombiregError("give --shrink-mm or --shrink, not both")
    overrides = {"shrink_factors": _number_list(shrink, "--shrink"),
                 "shrink_spacing": _number_list(shrink_mm, "--shrink-mm", float),
                 "iterations": _number_list(iterations, "--iterations"), "cc_radius": cc_radius,
                 "metric_channel": channel, "pre_alignment": prealign}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if ("shrink_factors" in overrides or "shrink_spacing" in overrides) and "iterations" not in overrides:
        raise CombiregError(f"{'--shrink' if shrink else '--shrink-mm'} needs --iterations too (one count per level)")
    settings = settings.with_changes(**overrides)  # bad values fail before any work
    outdir = prepare_output_dir(output, overwrite=overwrite)
    result = register_syn(channel_paths(source, "source"), channel_paths(target, "target"), settings=settings)
    result.save(outdir, overwrite=overwrite)
    echo_registration(result.report, "ITK SyN" if settings.pre_alignment == "none" else
                      f"ITK SyN (after {settings.pre_alignment} pre-alignment)")
    click.echo(f"results in {outdir}")


@baseline.command("ants")
@click.argument("source")
@click.argument("target")
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False),
              help="Output directory (created; must be empty unless --overwrite).")
@click.option("-t", "--type", "type_of_transform", default="SyN", show_default=True,
              help="ANTsPy's type_of_transform (SyN, SyNRA, SyNOnly, ElasticSyN, ...).")
@click.option("--channel", "channel", type=int, default=0, show_default=True,
              help="Channel (0-based) that drives the registration; all channels are warped.")
@click.option("--seed", "seed", type=int, default=None, help="ANTs random seed (sampling of the affine stage).")
@click.option("--overwrite", is_flag=True, help="Replace the contents of a non-empty output directory.")
def ants(source: str, target: str, output: str, type_of_transform: str, channel: int, seed: int | None,
         overwrite: bool) -> None:
    """Register SOURCE to TARGET with ANTsPy's ants.registration (needs the optional package
    antspyx), writing what `combireg run` writes; ANTs' forward transforms (affine + warp) are
    turned into one displacement field on the target grid.
    """
    from combireg.adapters.ants import register_ants, require_ants
    from combireg.outputs import prepare_output_dir

    require_ants()  # a missing package fails before anything else
    outdir = prepare_output_dir(output, overwrite=overwrite)
    result = register_ants(channel_paths(source, "source"), channel_paths(target, "target"),
                           type_of_transform=type_of_transform, metric_channel=channel, seed=seed)
    result.save(outdir, overwrite=overwrite)
    echo_registration(result.report, f"ANTs {type_of_transform}")
    click.echo(f"results in {outdir}")
