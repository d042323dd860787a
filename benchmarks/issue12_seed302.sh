#!/usr/bin/env bash
# Issue 12, third round: seed 302 of the held-out set (generated with seeds 300-301, never run
# before this), all seven variants, one fresh process per cell: the default with the bending
# term, the former default's regularisation, elastix's rigid -> affine -> B-spline chain,
# params/diffeomorphic.txt and affine + SyN, all in one run. Run alone on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SET=${SET:-bench_varied}
OUT=${OUT:-bench_results/test_seed302}
SEED302=v302_iso1,v302_t1_t2,v302_t1_flair,v302_iso2,v302_thick,v302_pose,v302_oblique
"$PY" benchmarks/bench_varied.py "$SET/manifest.csv" -o "$OUT" --cases "$SEED302" -m default=run \
    -m former="run -p benchmarks/params/former_default.txt" -m elastix="baseline elastix" \
    -m diffeomorphic="run -p params/diffeomorphic.txt" -m syn="baseline syn" "$@"
"$PY" benchmarks/paired_summary.py "$OUT/results.jsonl" --methods default,former,elastix,diffeomorphic,syn \
    --pairs default:former,default:elastix,default:diffeomorphic,default:syn
