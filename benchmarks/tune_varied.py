#!/usr/bin/env python
"""In-process parameter sweeps on varied-benchmark cases (development set only): TRE, not timing.

Each configuration is a set of parameter-file lines on top of a base file (default: the built-in
defaults); every case is read once and registered with each configuration in this process.
Use it to narrow candidates on the development seeds; the defaults are then confirmed with
``bench_varied.py`` (fresh processes, elastix and SyN in the same run) on the test seeds.

Example::

    python benchmarks/tune_varied.py bench_varied_dev/manifest.csv --cases v200_t1_t2,v201_t1_t2 \\
        -c 'ncc=(Metric "NCC")' -c 'ncc_l2=(Metric "NCC")(RegularizationWeight 0.6 0.6 0.2)' -o out/tune.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (str(HERE.parent), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

from bench_core import read_manifest  # noqa: E402
from bench_varied import score  # noqa: E402


def main(argv=None) -> int:
    import tempfile

    import combireg
    from combireg.api import as_image_pair
    from combireg.paramfile import parse_text
    from combireg.params import settings_from_map

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--cases", required=True, help="comma-separated case ids")
    parser.add_argument("-c", "--config", action="append", required=True, help="NAME=PARAMETER LINES")
    parser.add_argument("-o", "--out", type=Path, required=True, help="results (JSON lines, appended)")
    args = parser.parse_args(argv)
    cases = read_manifest(args.manifest, args.cases)
    configs = {}
    for item in args.config:
        name, _, text = item.partition("=")
        text = text.replace(")(", ")\n(")
        configs[name] = settings_from_map(parse_text(text, name), source=name)
    for case in cases:
        source, target = as_image_pair(case["source"], case["target"])
        for name, settings in configs.items():
            start = time.perf_counter()
            result = combireg.register(source, target, settings)
            seconds = time.perf_counter() - start
            with tempfile.TemporaryDirectory() as tmp:
                from combireg import io

                io.write_displacement(Path(tmp) / "field.nii.gz", result.displacement_lps_mm, result.target_geometry)
                tre = score(Path(tmp) / "field.nii.gz", case)
            row = {"case": case["id"], "config": name, "seconds": round(seconds, 1), "tre": tre,
                   "warnings": result.report["quality"]["warnings"]}
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"{case['id']:<16} {name:<18} TRE {tre['mean']:.2f} p95 {tre['p95']:.2f} dense {tre['mean_dense']:.2f} "
                  f"near {tre.get('mean_near', float('nan')):.2f} ({seconds:.0f} s){' WARN' if row['warnings'] else ''}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
