"""``combireg preprocess IMAGE -o OUT``: N4, pre-alignment, reorientation and resampling of one image."""
from __future__ import annotations

import json
import time

import click

from combireg.errors import CombiregError
from combireg.preprocess import ORIENTATION_CODES

from .common import channel_paths


def _spacing(value: str | None):
    """``MM`` (isotropic) or ``X,Y,Z`` in mm; None when not given."""
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",")]
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise CombiregError(f"--spacing {value!r}: give one number (isotropic mm) or three (x,y,z)") from None
    if len(numbers) not in (1, 3) or min(numbers) <= 0:
        raise CombiregError(f"--spacing {value!r}: give one positive number (isotropic mm) or three (x,y,z)")
    return numbers[0] if len(numbers) == 1 else numbers


def _orientation(value: str | None) -> str | None:
    if value is None:
        return None
    if value.strip().upper() not in ORIENTATION_CODES:
        raise CombiregError(f"--orient {value!r}: give three letters naming where the i, j, k axes point to, one of "
                            f"each pair L/R, P/A, I/S (for example RAS, LPS, LPI)")
    return value.strip().upper()


def _rotation_degrees(matrix) -> float:
    """Angle of the rotation nearest to the linear part (polar decomposition), in degrees."""
    import numpy as np

    u, _, vt = np.linalg.svd(matrix[:3, :3])
    rotation = u @ vt
    return float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0))))


@click.command()
@click.argument("image")
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False),
              help="Output directory (created; must be empty unless --overwrite).")
@click.option("--n4", "n4", is_flag=True, help="N4 bias-field correction (ITK), each channel.")
@click.option("--mask", "mask", type=click.Path(dir_okay=False), default=None,
              help="Binary mask on IMAGE's grid: where N4 fits its field and the alignment samples.")
@click.option("--align-to", "align_to", type=click.Path(dir_okay=False), default=None,
              help="Target image: align IMAGE (its first channel) to it with itk-elastix and resample all "
                   "channels onto its grid.")
@click.option("--transform", "transform", type=click.Choice(["rigid", "affine"]), default=None,
              help="Alignment transform (with --align-to; default rigid).")
@click.option("--metric", "metric", type=click.Choice(["mi", "ncc", "mse"]), default=None,
              help="Alignment similarity (with --align-to; default mi = Mattes mutual information).")
@click.option("--target-mask", "target_mask", type=click.Path(dir_okay=False), default=None,
              help="Binary mask on the --align-to image's grid for the alignment.")
@click.option("--orient", "orient", default=None, metavar="CODE",
              help="Reorder/flip the voxel axes (no interpolation) to the code nearest CODE, nibabel "
                   "style: the directions the i, j, k axes point to (RAS, LPS, LPI, ...).")
@click.option("--spacing", "spacing", default=None, metavar="MM|X,Y,Z",
              help="Resample to this spacing in mm over the same field of view (anti-aliased).")
@click.option("--interpolation", type=click.Choice(["linear", "nearest"]), default="linear", show_default=True,
              help="Interpolation for --align-to and --spacing (nearest for label images).")
@click.option("--overwrite", is_flag=True, help="Replace the contents of a non-empty output directory.")
def preprocess(image: str, output: str, n4: bool, mask: str | None, align_to: str | None, transform: str | None,
               metric: str | None, target_mask: str | None, orient: str | None, spacing: str | None,
               interpolation: str, overwrite: bool) -> None:
    """Preprocess IMAGE (one file or comma-separated channel files on one grid).

    Steps, in this order, each only when asked: N4 bias-field correction (--n4), rigid/affine
    alignment to a target with resampling onto its grid (--align-to), reorientation of the voxel
    axes (--orient) and resampling to a spacing (--spacing). Writes into OUTPUT:

    \b
    image_<k>.nii.gz  channel k (0-based) of the result, float32
    report.json       the steps, their settings and times, input and output grids
    affine.txt        (--align-to) 4x4 matrix A, LPS mm: target point x -> source (IMAGE)
                      point A [x, 1]; numpy.loadtxt reads it
    field.nii.gz      (--align-to) the same map as a displacement field u(x) = A x - x on the
                      grid of image_<k>.nii.gz (combireg's field convention; `combireg run
                      --init` takes it)
    """
    import numpy as np

    from combireg import io
    from combireg import preprocess as pp
    from combireg.outputs import atomic_output_dir, prepare_output_dir

    # Everything that can be checked is checked before any work.
    orient = _orientation(orient)
    spacing_mm = _spacing(spacing)
    if align_to is None and (transform or metric or target_mask):
        raise CombiregError("--transform, --metric and --target-mask need --align-to")
    if mask and not (n4 or align_to):
        raise CombiregError("--mask is used by --n4 and --align-to only; give one of them")
    if not (n4 or align_to or orient or spacing_mm is not None):
        raise CombiregError("nothing to do: give at least one of --n4, --align-to, --orient, --spacing")
    outdir = prepare_output_dir(output, overwrite=overwrite)
    paths = channel_paths(image, "image")
    img = io.read_channels(paths, role="image")
    image_mask = pp.load_mask(mask, img.geometry, role="image") if mask else None
    target = tmask = None
    if align_to:
        target = io.read_image(align_to)
        tmask = pp.load_mask(target_mask, target.geometry, role="target") if target_mask else None

    report: dict = {"inputs": {"image": paths, "mask": mask, "align_to": align_to, "target_mask": target_mask},
                    "input_grid": img.geometry.to_dict(), "input_orientation": pp.orientation_code(img.geometry),
                    "steps": [], "seconds": {}}
    start = time.perf_counter()
    affine = None
    if n4:
        clock = time.perf_counter()
        img = pp.n4_bias_correction(img, mask=image_mask)
        report["steps"].append({"step": "n4"})
        report["seconds"]["n4"] = round(time.perf_counter() - clock, 3)
        click.echo(f"N4 bias-field correction: {report['seconds']['n4']:.1f} s")
    if target is not None:
        clock = time.perf_counter()
        kind = transform or "rigid"
        affine = pp.prealign(img, target, kind, source_mask=image_mask, target_mask=tmask, metric=metric or "mi")
        img = pp.warp_affine(img, affine, target.geometry, interpolation=interpolation)
        report["steps"].append({"step": "align", "transform": kind, "metric": metric or "mi",
                                "affine_target_to_source_lps_mm": affine.tolist()})
        report["seconds"]["align"] = round(time.perf_counter() - clock, 3)
        click.echo(f"aligned ({kind}) to {align_to}: rotation {_rotation_degrees(affine):.2f} deg, translation "
                   f"{np.linalg.norm(affine[:3, 3]):.2f} mm at the origin, {report['seconds']['align']:.1f} s")
    if orient:
        before = pp.orientation_code(img.geometry)
        img = pp.reorient(img, orient)
        report["steps"].append({"step": "orient", "code": orient, "before": before})
        click.echo(f"orientation {before} -> {pp.orientation_code(img.geometry)}")
    if spacing_mm is not None:
        clock = time.perf_counter()
        before = img.geometry
        img = pp.resample_to_spacing(img, spacing_mm, interpolation=interpolation)
        report["steps"].append({"step": "spacing", "spacing_mm": list(img.geometry.spacing)})
        report["seconds"]["spacing"] = round(time.perf_counter() - clock, 3)
        click.echo(f"spacing {tuple(round(s, 4) for s in before.spacing)} -> {img.geometry.spacing} mm, size "
                   f"{before.size} -> {img.geometry.size}")
    report["output_grid"] = img.geometry.to_dict()
    report["output_orientation"] = pp.orientation_code(img.geometry)
    report["seconds"]["total"] = round(time.perf_counter() - start, 3)

    with atomic_output_dir(outdir, overwrite=overwrite) as tmp:
        for k in range(img.num_channels):
            io.write_image(tmp / f"image_{k}.nii.gz", img.channel(k))
        if affine is not None:
            pp.write_affine(tmp / "affine.txt", affine)
            io.write_displacement(tmp / "field.nii.gz", pp.affine_displacement(affine, img.geometry), img.geometry)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    click.echo(f"results in {outdir}")
