#!/usr/bin/env python
"""Generate the varied benchmark set (issue 12) into ``bench_varied/`` (gitignored).

Every seed is one harder simulated pre-/post-operative anatomy, written as each variant of
:data:`combireg.synth_varied.VARIANTS` (1 mm and 2 mm isotropic, thick slices, oblique and
mismatched grids, a large pose difference, T1 against T2 and against FLAIR), case ids
``v<seed>_<variant>``, plus ``manifest.csv``. Seeds 200-202 are the development set (tuning);
seeds 300-302 are the test set the tables in BENCHMARKS.md report, never tuned on.
``--difficulty hard`` (seeds 400-401, ``bench_varied_hard``) deforms more strongly; elastix's own
default (the B-spline map alone) is at 1.60 mm mean TRE on it, its rigid-affine-B-spline chain at
1.43 mm (BENCHMARKS.md, issue 12). It too is a test set, never tuned on.

Usage::

    python scripts/make_varied_set.py [--out bench_varied] [--seeds 300 301 302] [--variants iso1 pose] [--difficulty hard]
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from combireg.synth_varied import DIFFICULTIES, VARIANTS, generate_varied_set  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench_varied")
    parser.add_argument("--seeds", type=int, nargs="+", default=[300, 301, 302])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--difficulty", default="standard", choices=list(DIFFICULTIES),
                        help="how strongly the anatomies deform (combireg.synth_varied.DIFFICULTIES)")
    parser.add_argument("--no-ground-truth", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    manifest = generate_varied_set(args.out, args.seeds, variants=args.variants, overwrite=args.overwrite,
                                   write_ground_truth=not args.no_ground_truth, difficulty=args.difficulty,
                                   progress=lambda case_id: print(f"wrote {case_id}", flush=True))
    print(f"manifest: {manifest}")


if __name__ == "__main__":
    main()
