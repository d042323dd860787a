"""``combireg tre FIELD TARGET_LANDMARKS SOURCE_LANDMARKS``: target registration error of a field."""
from __future__ import annotations

from pathlib import Path

import click

from combireg.errors import CombiregError
from combireg.landmarks import LANDMARK_SPACES

SPACE_HELP = ("Coordinate space of landmark files that do not declare theirs (generic CSV X,Y,Z; .fcsv "
              "without a CoordinateSystem line): lps (ITK physical, the default for CSV), ras, or index "
              "(voxel indices of a reference image).")


def check_writable(path: str | None, option: str) -> None:
    """An output file's folder must exist and be writable (checked before any work)."""
    if path is None:
        return
    parent = Path(path).absolute().parent
    if not parent.is_dir():
        raise CombiregError(f"{option} {path}: folder {parent} does not exist")
    if Path(path).is_dir():
        raise CombiregError(f"{option} {path}: is a directory")


def format_statistics(stats: dict) -> list[str]:
    """The statistics block printed by ``tre`` and ``run``."""
    return [
        f"TRE      {stats['mean']:.3f} ± {stats['std']:.3f} mm (median {stats['median']:.3f}, "
        f"p95 {stats['p95']:.3f}, max {stats['max']:.3f}; n = {stats['n']})",
        f"initial  {stats['initial_mean']:.3f} ± {stats['initial_std']:.3f} mm (median {stats['initial_median']:.3f}, "
        f"p95 {stats['initial_p95']:.3f}, max {stats['initial_max']:.3f})",
        f"robustness {stats['robustness']:.3f} (fraction of landmarks whose error went down)",
    ] + ([f"{stats['n_outside_grid']} target landmark(s) outside the field's grid, mapped with its edge values"]
         if stats.get("n_outside_grid") else [])


def format_table(rows: list[dict]) -> list[str]:
    width = max(8, max(len(r["label"]) for r in rows))
    lines = [f"{'label':<{width}}  {'initial (mm)':>12}  {'TRE (mm)':>9}"]
    lines += [f"{r['label']:<{width}}  {r['initial_error_mm']:>12.3f}  {r['error_mm']:>9.3f}" for r in rows]
    return lines


@click.command("tre")
@click.argument("field")
@click.argument("target_landmarks")
@click.argument("source_landmarks")
@click.option("--json", "json_path", metavar="FILE", default=None,
              help="Write the statistics and the per-landmark table as JSON.")
@click.option("--csv", "csv_path", metavar="FILE", default=None,
              help="Write the per-landmark table as CSV.")
@click.option("--landmark-space", type=click.Choice(LANDMARK_SPACES, case_sensitive=False), default=None,
              help=SPACE_HELP)
@click.option("--target-reference", metavar="IMAGE", default=None,
              help="Image that voxel-index target landmarks refer to (default: the field's grid).")
@click.option("--source-reference", metavar="IMAGE", default=None,
              help="Image that voxel-index source landmarks refer to.")
@click.option("-q", "--quiet", is_flag=True, help="Statistics only, no per-landmark table.")
def tre(field: str, target_landmarks: str, source_landmarks: str, json_path: str | None, csv_path: str | None,
        landmark_space: str | None, target_reference: str | None, source_reference: str | None,
        quiet: bool) -> None:
    """Target registration error of FIELD on matched landmarks.

    FIELD is a forward displacement field (ITK vector image on the target grid, LPS mm:
    target point x maps to source point x + u(x)) or the word `identity`. Each target
    landmark x goes through the field (trilinear interpolation) and TRE = |x + u(x) - s| mm
    against its source landmark s. Landmarks (.fcsv, .mrk.json, .csv incl. BraTS-Reg,
    elastix point files) are matched by label, or by order when a file has no labels.
    """
    from combireg.landmarks import tre_from_files

    check_writable(json_path, "--json")
    check_writable(csv_path, "--csv")
    result = tre_from_files(None if field == "identity" else field, target_landmarks, source_landmarks,
                            space=landmark_space, target_reference=target_reference,
                            source_reference=source_reference)
    try:
        if json_path:
            result.write_json(json_path, field=field, target_landmarks=target_landmarks,
                              source_landmarks=source_landmarks)
        if csv_path:
            result.write_csv(csv_path)
    except OSError as exc:
        raise CombiregError(f"cannot write {exc.filename}: {exc.strerror}") from None
    lines = [] if quiet else format_table(result.rows()) + [""]
    click.echo("\n".join(lines + format_statistics(result.statistics)))

