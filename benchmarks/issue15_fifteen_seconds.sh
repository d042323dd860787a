#!/usr/bin/env bash
# Issue 15 item 3, third round: the held-out pairs of issue12_rigid_warmup.sh (seeds 300 and 301,
# all seven variants, one fresh process per cell, elastix's chain on the two 1 mm pairs as the
# anchor of the wall times) after the run got faster, plus params/diffeomorphic.txt on the 1 mm
# pairs. Run alone on the machine: the wall times are the point. Then compare the TRE per pair
# with bench_results/test_warmup (issue 15 allows 0.02 mm); see BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SET=${SET:-bench_varied}
export OUT=${OUT:-bench_results/test_15s}
"$PY" benchmarks/bench_varied.py "$SET/manifest.csv" -o "$OUT" --cases v300_iso1,v301_iso1 \
    -m diffeomorphic="run -p params/diffeomorphic.txt" "$@"
SET="$SET" PY="$PY" benchmarks/issue12_rigid_warmup.sh "$@"
