"""``combireg run SRC TGT``: register one pair and write the outputs."""
from __future__ import annotations

import click

from combireg.device import DEVICE_HELP
from combireg.errors import CombiregError
from combireg.landmarks import LANDMARK_SPACES

from .common import channel_paths, echo_registration


def _load_landmarks(source: list[str], target: list[str], target_landmarks: str | None,
                    source_landmarks: str | None, space: str | None) -> tuple:
    """Read both images and both landmark files, and check them, before any registration work."""
    from combireg import io
    from combireg.landmarks import compute_tre, read_landmarks

    if not (target_landmarks and source_landmarks):
        raise CombiregError("give both --target-landmarks and --source-landmarks")
    target_img = io.read_channels(target, role="target")
    source_img = io.read_channels(source, role="source")
    tl = read_landmarks(target_landmarks, space=space, reference=target_img)
    sl = read_landmarks(source_landmarks, space=space, reference=source_img)
    compute_tre(None, target_img.geometry, tl, sl)  # labels match; landmarks outside the grid: a warning
    return source_img, target_img, (tl, sl)


@click.command()
@click.argument("source")
@click.argument("target")
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False),
              help="Output directory (created; must be empty unless --overwrite).")
@click.option("-p", "--params", "params", type=click.Path(dir_okay=False), default=None,
              help="elastix-syntax parameter file (default: built-in defaults = params/default.txt).")
@click.option("--init", "init", type=click.Path(dir_okay=False), default=None,
              help="Initialisation: a DRN model file (*.pt from `combireg train`), 'drn' for the shipped model, "
                   "or an initial forward displacement field (ITK vector image, LPS mm, our convention).")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda", help=DEVICE_HELP)
@click.option("--overwrite", is_flag=True, help="Replace the contents of a non-empty output directory.")
@click.option("--max-memory", "max_memory_gb", type=float, default=None,
              help="Refuse to start above this estimated peak memory in GiB (default: what is available).")
@click.option("--target-mask", type=click.Path(dir_okay=False), default=None,
              help="Binary mask on the target's grid (brain/region): only voxels inside count in the similarity.")
@click.option("--source-mask", type=click.Path(dir_okay=False), default=None,
              help="Binary mask on the source's grid, carried along by the field.")
@click.option("--outputs", "outputs", default="all", show_default=True, metavar="KINDS",
              help="Image outputs to compute and write, comma-separated: field, inverse, warped (or all). "
                   "params.txt and report.json are always written; a kind left out is not computed either "
                   "(no numerical inverse without 'inverse', no warping without 'warped').")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--target-landmarks", type=click.Path(dir_okay=False), default=None,
              help="Landmarks on the target (.fcsv, .mrk.json, .csv, elastix points): TRE before/after is "
                   "printed and stored in report.json. Needs --source-landmarks.")
@click.option("--source-landmarks", type=click.Path(dir_okay=False), default=None,
              help="Corresponding landmarks on the source (matched by label, else by order).")
@click.option("--landmark-space", type=click.Choice(LANDMARK_SPACES, case_sensitive=False), default=None,
              help="Space of landmark files that do not declare theirs: lps (default for CSV), ras, or index "
                   "(voxel indices of the first channel of their side).")
def run(source: str, target: str, output: str, params: str | None, init: str | None, device: str,
        overwrite: bool, max_memory_gb: float | None, target_mask: str | None, source_mask: str | None,
        outputs: str, quiet: bool, target_landmarks: str | None,
        source_landmarks: str | None, landmark_space: str | None) -> None:
    """Register SOURCE to TARGET (each one image or comma-separated channel files).

    Writes field.nii.gz (target grid, LPS mm, target x -> source x + u(x)),
    field_inverse.nii.gz (source grid), warped_<k>.nii.gz, params.txt and report.json
    (--outputs chooses among the first three).
    With --target-landmarks/--source-landmarks the TRE before and after is reported too.
    """
    from tqdm import tqdm

    from combireg.api import register
    from combireg.device import resolve_device
    from combireg.outputs import OutputWriter, output_kinds, prepare_output_dir
    from combireg.params import load_settings

    kinds = output_kinds(outputs)  # an unknown kind: one line before any work
    settings = load_settings(params)
    device = str(resolve_device(device))  # auto -> cuda or cpu (logged); cuda without a GPU: one line
    outdir = prepare_output_dir(output, overwrite=overwrite)
    source_in, target_in = channel_paths(source, "source"), channel_paths(target, "target")
    landmarks = None
    if target_landmarks or source_landmarks:
        source_in, target_in, landmarks = _load_landmarks(source_in, target_in, target_landmarks,
                                                          source_landmarks, landmark_space)
    total = sum(settings.iterations)
    # disable=None: no bar when stderr is not a terminal (logs stay readable)
    bar = tqdm(total=total, unit="it", disable=True if quiet else None, dynamic_ncols=True, leave=False)

    def progress(event: dict) -> None:
        bar.update(1)
        bar.set_description(f"level {event['level'] + 1}/{event['levels']}")
        bar.set_postfix(loss=f"{event['loss']:.4f}", refresh=False)

    # The files are written as the run produces them (the folder appears whole at the end).
    with OutputWriter(outdir, overwrite=overwrite, outputs=kinds) as writer:
        try:
            result = register(source_in, target_in, settings, init=init,
                              device=device, callback=progress, target_mask=target_mask, source_mask=source_mask,
                              max_memory_bytes=None if max_memory_gb is None else int(max_memory_gb * 2**30),
                              outputs=kinds, writer=writer)
        finally:
            bar.close()
        tre = None
        if landmarks is not None:
            from combireg.landmarks import compute_tre

            tre = compute_tre(result.displacement_lps_mm, result.target_geometry, *landmarks)
            result.report["tre"] = {"target_landmarks": target_landmarks, "source_landmarks": source_landmarks,
                                    **tre.to_dict()}
        writer.finish(result.params_text(), result.report)
    echo_registration(result.report)
    if tre is not None:
        st = tre.statistics
        click.echo(f"TRE {st['initial_mean']:.3f} -> {st['mean']:.3f} mm mean (median {st['initial_median']:.3f} -> "
                   f"{st['median']:.3f}, max {st['initial_max']:.3f} -> {st['max']:.3f}; n = {st['n']}), "
                   f"robustness {st['robustness']:.3f}"
                   + (f"; {st['n_outside_grid']} outside the target grid (edge values)" if st["n_outside_grid"] else ""))
    click.echo(f"results in {outdir}")
