#!/usr/bin/env bash
# Issue 12/15: every method on the varied test set (seeds 300-301, 7 variants each), one fresh
# process per cell, all methods of a case back to back. Make the set first:
#   python scripts/make_varied_set.py --out bench_varied --seeds 300 301 302
# Results: $OUT/results.jsonl and $OUT/tables.md. A second call resumes (finished cells skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SET=${SET:-bench_varied}
OUT=${OUT:-bench_results/test_final}
CASES=${CASES:-14}           # the first 14 rows of the manifest: seeds 300 and 301
DRN=${DRN:-combireg/models/drn_default.pt}
methods=(-m default=run
         -m elastix="baseline elastix"
         -m syn="baseline syn"
         -m yesterday="run -p benchmarks/params/issue12/voxel_default.txt"
         -m diffeomorphic="run -p params/diffeomorphic.txt"
         -m drn_io="run --init $DRN -p params/drn_io.txt")
"$PY" benchmarks/bench_varied.py "$SET/manifest.csv" -o "$OUT" --cases "$CASES" "${methods[@]}" "$@"
# the MI preset, on the cross-sequence variants only
"$PY" benchmarks/bench_varied.py "$SET/manifest.csv" -o "$OUT" --cases "$CASES" --variants t1_t2,t1_flair \
    -m mi="run -p params/mi.txt" "$@"
"$PY" benchmarks/bench_varied.py "$SET/manifest.csv" -o "$OUT" --cases "$CASES" --tables-only \
    "${methods[@]}" -m mi="run -p params/mi.txt"
