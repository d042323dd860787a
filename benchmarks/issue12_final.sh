#!/usr/bin/env bash
# Issue 12/15: the methods on the varied test set, one fresh process per cell, all methods of a
# case back to back. Seed 300 (7 variants): every method; seed 301, 1 mm only: the default and
# elastix, on an otherwise idle machine (what a 2-core CPU allowed in one session: seed 300
# alone took 100 minutes; its last two oblique cells, diffeomorphic and drn_io, and the MI preset
# on the cross-sequence cases did not fit and were not run). Make the set first:
#   python scripts/make_varied_set.py --out bench_varied --seeds 300 301 302
# Results: $OUT/results.jsonl and $OUT/tables.md. A second call resumes (finished cells skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SET=${SET:-bench_varied}
OUT=${OUT:-bench_results/test_final}
DRN=${DRN:-combireg/models/drn_default.pt}
SEED300=v300_iso1,v300_t1_t2,v300_t1_flair,v300_iso2,v300_thick,v300_pose,v300_oblique
core=(-m default=run
      -m elastix="baseline elastix"
      -m syn="baseline syn"
      -m yesterday="run -p benchmarks/params/issue12/voxel_default.txt")
more=(-m diffeomorphic="run -p params/diffeomorphic.txt"
      -m drn_io="run --init $DRN -p params/drn_io.txt")
"$PY" benchmarks/bench_varied.py "$SET/manifest.csv" -o "$OUT" --cases "$SEED300" "${core[@]}" "${more[@]}" "$@"
"$PY" benchmarks/bench_varied.py "$SET/manifest.csv" -o "$OUT" --cases v301_iso1 \
    -m default=run -m elastix="baseline elastix" "$@"
"$PY" benchmarks/bench_varied.py "$SET/manifest.csv" -o "$OUT" --cases "$SEED300,v301_iso1" --tables-only \
    "${core[@]}" "${more[@]}"
