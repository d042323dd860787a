"""``combireg run SRC TGT``: register one pair and write the outputs."""
from __future__ import annotations

import click

from combireg.errors import CombiregError


def _channels(value: str, role: str) -> list[str]:
    paths = [p.strip() for p in value.split(",") if p.strip()]
    if not paths:
        raise CombiregError(f"{role}: no image file given")
    return paths


@click.command()
@click.argument("source")
@click.argument("target")
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False),
              help="Output directory (created; must be empty unless --overwrite).")
@click.option("-p", "--params", "params", type=click.Path(dir_okay=False), default=None,
              help="elastix-syntax parameter file (default: built-in defaults = params/default.txt).")
@click.option("--init", "init", type=click.Path(dir_okay=False), default=None,
              help="Initial forward displacement field (ITK vector image, LPS mm, our convention).")
@click.option("--device", default="cpu", show_default=True, help="torch device: cpu or cuda.")
@click.option("--overwrite", is_flag=True, help="Replace the contents of a non-empty output directory.")
@click.option("--max-memory", "max_memory_gb", type=float, default=None,
              help="Refuse to start above this estimated peak memory in GiB (default: what is available).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def run(source: str, target: str, output: str, params: str | None, init: str | None, device: str,
        overwrite: bool, max_memory_gb: float | None, quiet: bool) -> None:
    """Register SOURCE to TARGET (each one image or comma-separated channel files).

    Writes field.nii.gz (target grid, LPS mm, target x -> source x + u(x)),
    field_inverse.nii.gz (source grid), warped_<k>.nii.gz, params.txt and report.json.
    """
    from tqdm import tqdm

    from combireg.api import prepare_output_dir, register
    from combireg.params import load_settings

    settings = load_settings(params)
    outdir = prepare_output_dir(output, overwrite=overwrite)
    total = sum(settings.iterations)
    bar = tqdm(total=total, unit="it", disable=quiet, dynamic_ncols=True, leave=False)

    def progress(event: dict) -> None:
        bar.update(1)
        bar.set_description(f"level {event['level'] + 1}/{event['levels']}")
        bar.set_postfix(loss=f"{event['loss']:.4f}", refresh=False)

    try:
        result = register(_channels(source, "source"), _channels(target, "target"), settings, init=init,
                          device=device, callback=progress,
                          max_memory_bytes=None if max_memory_gb is None else int(max_memory_gb * 2**30))
    finally:
        bar.close()
    result.save(outdir, overwrite=overwrite)
    rep = result.report
    jac = rep["jacobian"]
    click.echo(f"registered in {rep['wall_time_s']:.1f} s (peak memory {rep['peak_memory_mb']:.0f} MB); "
               f"Jacobian min {jac['min']:.3f}, {jac['percent_nonpositive']:.3f}% folded")
    click.echo(f"results in {outdir}")
