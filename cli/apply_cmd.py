"""``combireg apply FIELD INPUT -o OUTPUT``: carry an image or landmarks through a field."""
from __future__ import annotations

import click

from combireg.apply import INTERPOLATIONS
from combireg.landmarks import LANDMARK_SPACES

from .tre_cmd import SPACE_HELP


@click.command("apply")
@click.argument("field")
@click.argument("input_path", metavar="INPUT")
@click.option("-o", "--output", "output", required=True,
              help="Output file: an image format for an image, the input's landmark format for landmarks.")
@click.option("--labels", is_flag=True,
              help="INPUT is a label map or mask: nearest neighbour, the pixel type and label values kept.")
@click.option("--interpolation", type=click.Choice(INTERPOLATIONS), default=None,
              help="Image interpolation [default: linear; nearest with --labels].")
@click.option("--landmark-space", type=click.Choice(LANDMARK_SPACES, case_sensitive=False), default=None,
              help=SPACE_HELP)
@click.option("--reference", metavar="IMAGE", default=None,
              help="Voxel-index landmark files: the image the mapped points lie on (their indices in the output "
                   "refer to it; the input's refer to the field's grid).")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT.")
def apply(field: str, input_path: str, output: str, labels: bool, interpolation: str | None,
          landmark_space: str | None, reference: str | None, overwrite: bool) -> None:
    """Carry INPUT (an image or a landmark file) through FIELD, a displacement field in
    combireg's convention (field.nii.gz or field_inverse.nii.gz of a registration).

    \b
    An image:     OUTPUT lies on FIELD's grid, OUTPUT(x) = INPUT(x + u(x)) in world
                  coordinates (INPUT on any grid; 0 where x + u(x) falls outside it).
    Landmarks:    each point p goes to p + u(p), written in INPUT's format and coordinate
                  system (.fcsv, .mrk.json, BraTS-Reg or generic .csv, elastix points).

    \b
    field.nii.gz          source images -> target grid; target points -> source space
    field_inverse.nii.gz  target images -> source grid; source points -> target space
    """
    from combireg.apply import AppliedImage, apply_field

    result = apply_field(field, input_path, output, labels=labels, interpolation=interpolation,
                         landmark_space=landmark_space, reference=reference, overwrite=overwrite)
    if isinstance(result, AppliedImage):
        kept = f", {result.array.dtype} kept" if labels else ""
        click.echo(f"warped {input_path} onto the field's grid {result.geometry.size} ({result.interpolation}{kept}; "
                   f"{100 * result.inside_fraction:.1f}% of the voxels inside the input) -> {output}")
    else:
        outside = f", {result.n_outside} outside the field's grid (edge values)" if result.n_outside else ""
        click.echo(f"mapped {len(result.landmarks)} landmark(s){outside} -> {output}")
