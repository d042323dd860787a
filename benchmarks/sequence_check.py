#!/usr/bin/env python
"""Score every pair of one or more manifests with the sequence-change check (issue 12).

For each pair: prepare it as ``combireg run`` does (normalisation, rigid pre-alignment, working
grid), then print as one JSON line the score, the tissue order (means and per channel pair) and
what :func:`combireg.sequences.settings_for_sequences` would do. Nothing is registered.

Example::

    python benchmarks/sequence_check.py data_samples/manifest.csv bench_varied_dev/manifest.csv \\
        bench_varied/manifest.csv bench_varied_hard/manifest.csv > bench_results/sequence_check.jsonl
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    import torch

    from combireg.api import _prepare, as_image_pair
    from combireg.params import default_settings
    from combireg.sequences import settings_for_sequences

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifests", nargs="+", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = default_settings().replace(sequence_change_detection=True)
    for manifest in args.manifests:
        root = manifest.parent
        for row in csv.DictReader(manifest.open()):
            source = ",".join(str(root / p) for p in row["source"].split(","))
            target = ",".join(str(root / p) for p in row["target"].split(","))
            source_img, target_img = as_image_pair(source, target)
            prepared = _prepare(source_img, target_img, None, None, settings, "cpu")
            _, note = settings_for_sequences(settings, prepared.source, prepared.target, prepared.geometry.spacing)
            keys = ("score", "channel_scores", "tissue_order", "channel_tissue_orders", "action", "reason")
            print(json.dumps({"id": row["id"], **{k: note.get(k) for k in keys}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
