#!/usr/bin/env python
"""A 0.5 mm pair for the memory benchmark (issue 7): one 1 mm benchmark case up-sampled.

Both images of ``CASE`` (default ``bench_data/case0100``), every channel, are resampled to
0.5 mm isotropic over the same field of view (:func:`combireg.preprocess.resample_to_spacing`,
linear; 386 x 458 x 386 voxels for the 1 mm MNI grid, about 68 million). The anatomy is the 1 mm
case's (nothing new below 1 mm), so this measures memory and time at the size of a 0.5 mm brain;
the landmarks are world coordinates and stay valid, so TRE is comparable with the 1 mm case.
Writes ``OUT/<case>_05mm/`` and ``OUT/manifest_05mm.csv`` (evaluate/bench_core format).

Usage::

    python scripts/make_halfmm_case.py [--case bench_data/case0100] [--out bench_data]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from combireg import io  # noqa: E402
from combireg.preprocess import resample_to_spacing  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=Path, default=ROOT / "bench_data" / "case0100")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_data")
    parser.add_argument("--spacing", type=float, default=0.5)
    args = parser.parse_args()
    name = f"{args.case.name}_{str(args.spacing).replace('.', '')}mm"
    folder = args.out / name
    folder.mkdir(parents=True, exist_ok=True)
    columns = {}
    for side in ("source", "target"):
        paths = []
        for channel in ("t1", "t2"):
            image = io.read_image(args.case / f"{side}_{channel}.nii.gz")
            fine = resample_to_spacing(image, args.spacing)
            path = folder / f"{side}_{channel}.nii.gz"
            io.write_image(path, fine)
            paths.append(f"{name}/{path.name}")
            print(f"{path}: {fine.geometry.size} voxels at {fine.geometry.spacing} mm", flush=True)
        columns[side] = ",".join(paths)
    for landmarks in ("target_landmarks.fcsv", "source_landmarks.fcsv"):
        shutil.copyfile(args.case / landmarks, folder / landmarks)
    manifest = args.out / f"manifest_{str(args.spacing).replace('.', '')}mm.csv"
    manifest.write_text("id,source,target,target_landmarks,source_landmarks\n"
                        f'{name},"{columns["source"]}","{columns["target"]}",{name}/target_landmarks.fcsv,'
                        f"{name}/source_landmarks.fcsv\n")
    print(f"manifest: {manifest}")


if __name__ == "__main__":
    main()
