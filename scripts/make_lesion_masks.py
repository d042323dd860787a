#!/usr/bin/env python
"""Lesion masks and the two extra manifests of the issue-6 benchmarks, for a simulated set.

For every case of ``MANIFEST`` (made by ``scripts/make_benchmark_set.py``) this writes
``target_lesion.nii.gz`` beside its images: on the target grid, the ball around the simulated
tumour's target-space centre (``case.json``: ``tumour.centre_target_lps_mm``) with the
tumour's largest extent as radius (``tumour.max_extent_mm``), a slight over-estimate of the
lesion that the post-operative image shows (cavity plus margin; the oedema reaches further).
Then, beside the manifest:

* ``manifest_lesion.csv``: the manifest plus a ``lesion`` column (``combireg evaluate``
  then reports TRE over the landmarks within 20 mm of the lesion);
* ``manifest_t1_t2.csv``: the same cases as a cross-sequence task, the pre-operative T1
  alone as source against the post-operative T2 alone as target (for the MI benchmark).

Usage::

    python scripts/make_lesion_masks.py [bench_data/manifest.csv]
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from combireg import io  # noqa: E402


def lesion_ball(target_path: Path, centre_lps_mm, radius_mm: float) -> tuple[np.ndarray, object]:
    """A uint8 ball on the target image's grid (world coordinates, any direction)."""
    image = io.read_image(target_path)
    geometry = image.geometry
    points = geometry.world_grid()  # (Z, Y, X, 3) LPS mm
    inside = np.linalg.norm(points - np.asarray(centre_lps_mm, dtype=np.float64), axis=-1) <= radius_mm
    return inside.astype(np.uint8), geometry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", nargs="?", type=Path, default=ROOT / "bench_data" / "manifest.csv")
    args = parser.parse_args()
    root = args.manifest.parent
    with open(args.manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        case_dir = root / row["id"]
        info = json.loads((case_dir / "case.json").read_text())
        tumour = info["tumour"]
        target_t1 = root / row["target"].split(",")[0]
        mask, geometry = lesion_ball(target_t1, tumour["centre_target_lps_mm"], float(tumour["max_extent_mm"]))
        io.write_image(case_dir / "target_lesion.nii.gz", mask, geometry, dtype=np.uint8)
        row["lesion"] = f"{row['id']}/target_lesion.nii.gz"
        print(f"{row['id']}: lesion ball radius {tumour['max_extent_mm']:.1f} mm, {int(mask.sum())} voxels")
    with open(root / "manifest_lesion.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    cross = []
    for row in rows:
        cross.append({**row, "source": row["source"].split(",")[0], "target": row["target"].split(",")[1]})
    with open(root / "manifest_t1_t2.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(cross[0].keys()))
        writer.writeheader()
        writer.writerows(cross)
    print(f"wrote {root / 'manifest_lesion.csv'} and {root / 'manifest_t1_t2.csv'}")


if __name__ == "__main__":
    main()
