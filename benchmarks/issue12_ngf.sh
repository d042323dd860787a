#!/usr/bin/env bash
# Issue 12, fourth round: NGF as a default. All 21 held-out pairs (seeds 300-302, seven variants
# each), one fresh process per cell, in one run: "default" is MSE+NCC+NGF with 150 60 30
# iterations (the default as committed in 1f05800, since withdrawn), "previous" the MSE+NCC
# default (the default again), then elastix's rigid -> affine -> B-spline chain; then
# params/cross_sequence.txt on the six cross-sequence pairs. Run alone on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SET=${SET:-bench_varied}
OUT=${OUT:-bench_results/test_ngf}
ALL=$(for s in 300 301 302; do for v in iso1 iso2 thick oblique pose t1_t2 t1_flair; do printf 'v%s_%s,' $s $v; done; done)
CROSS=v300_t1_t2,v301_t1_t2,v302_t1_t2,v300_t1_flair,v301_t1_flair,v302_t1_flair
"$PY" benchmarks/bench_varied.py "$SET/manifest.csv" -o "$OUT" --cases "${ALL%,}" \
    -m default="run -p benchmarks/params/ngf_default.txt" -m previous="run -p benchmarks/params/previous_default.txt" -m elastix="baseline elastix" "$@"
"$PY" benchmarks/bench_varied.py "$SET/manifest.csv" -o "$OUT/cross_sequence" --cases "$CROSS" \
    -m cross_sequence="run -p params/cross_sequence.txt" "$@"
"$PY" benchmarks/paired_summary.py "$OUT/results.jsonl" --methods default,previous,elastix \
    --pairs default:previous,default:elastix
