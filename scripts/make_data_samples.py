#!/usr/bin/env python
"""Regenerate the committed sample data in ``data_samples/``.

Two simulated pre-/post-operative cases at 2 mm isotropic spacing, seeds 0 and 1 (case ids
``case0000`` and ``case0001``), without the dense ground-truth field (it would triple the size;
the landmarks carry the ground truth). The template is downloaded once with pip into
``.cache/autoafids`` (or ``$COMBIREG_DATA_CACHE``).

Usage::

    python scripts/make_data_samples.py [--out data_samples]
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from combireg.synth import generate_dataset  # noqa: E402

FIRST_SEED = 0  # cases use seeds 0 and 1
N_CASES = 2
SPACING_MM = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data_samples")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    manifest = generate_dataset(args.out, n_cases=N_CASES, seed=FIRST_SEED, spacing=SPACING_MM,
                                write_ground_truth=False, overwrite=True)
    print(f"manifest: {manifest}")


if __name__ == "__main__":
    main()
