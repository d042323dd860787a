#!/usr/bin/env bash
# Issues 12/15, second round: the default after the torch rigid pre-alignment (combireg.rigid) and
# the Adam warm-up (WarmUpIterations 10), on the same held-out pairs as issue12_final.sh (seeds
# 300 and 301, all seven variants), one fresh process per cell; elastix's chain again on the two
# 1 mm pairs as the anchor of the wall times (its TRE is deterministic: the same as in
# bench_results/test_final). Run alone on the machine: the wall times are the point.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SET=${SET:-bench_varied}
OUT=${OUT:-bench_results/test_warmup}
SEED300=v300_iso1,v300_t1_t2,v300_t1_flair,v300_iso2,v300_thick,v300_pose,v300_oblique
SEED301=${SEED300//v300/v301}
"$PY" benchmarks/bench_varied.py "$SET/manifest.csv" -o "$OUT" --cases v300_iso1,v301_iso1 \
    -m default=run -m elastix="baseline elastix" "$@"
"$PY" benchmarks/bench_varied.py "$SET/manifest.csv" -o "$OUT" --cases "$SEED300,$SEED301" -m default=run "$@"
"$PY" benchmarks/bench_varied.py "$SET/manifest.csv" -o "$OUT" --cases "$SEED300,$SEED301" --tables-only \
    -m default=run -m elastix="baseline elastix"
