"""``combireg synth``: simulate pre-/post-operative pairs with known ground truth."""
from __future__ import annotations

from pathlib import Path

import click


@click.command("synth")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Dataset directory to create (cases, manifest.csv, NOTICE.md).")
@click.option("--cases", default=5, show_default=True, type=click.IntRange(min=1), help="Number of cases.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the first case; case i uses seed + i.")
@click.option("--spacing", default=1.0, show_default=True, type=click.FloatRange(min=0.5, max=10.0),
              help="Isotropic voxel size of the simulated images, mm.")
@click.option("--tissue-points", default=100, show_default=True, type=click.IntRange(min=0),
              help="Random brain-tissue landmarks per case, besides the 32 AFIDs.")
@click.option("--no-ground-truth", is_flag=True, help="Do not write gt_field.nii.gz (dense displacement).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the template wheel is downloaded [default: $COMBIREG_DATA_CACHE or .cache/autoafids].")
def synth(out_dir: Path, cases: int, seed: int, spacing: float, tissue_points: int, no_ground_truth: bool,
          overwrite: bool, cache_dir: Path | None) -> None:
    """Simulate pre-op (source) / post-op (target) T1+T2 pairs from the MNI152 2009 template.

    Each case has a tumour with mass effect on the source, a resection cavity with tissue
    collapse and a rigid misalignment on the target, and corresponding landmarks (32 AFIDs plus
    random tissue points) with exact ground truth. The template is downloaded once with pip
    (autoafids==0.1.4).
    """
    # Why here: combireg.synth imports scipy.ndimage (~0.2 s), which every other command,
    # `combireg run` included, would pay at start-up.
    from tqdm import tqdm

    from combireg.outputs import prepare_output_dir
    from combireg.synth import generate_dataset

    prepare_output_dir(out_dir, overwrite=overwrite)  # before the progress bar appears
    with tqdm(total=cases, desc="synth", unit="case", disable=None) as bar:  # no bar off a terminal
        manifest = generate_dataset(
            out_dir,
            n_cases=cases,
            seed=seed,
            spacing=spacing,
            write_ground_truth=not no_ground_truth,
            n_tissue_points=tissue_points,
            overwrite=overwrite,
            cache_dir=cache_dir,
            progress=lambda case_id: bar.update(1),
        )
    click.echo(f"manifest: {manifest}")
