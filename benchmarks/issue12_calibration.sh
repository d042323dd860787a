#!/usr/bin/env bash
# Issue 12, fifth round, every step alone on the machine, a fresh process per cell:
#  bspline  elastix's own default (the B-spline map alone, params/elastix_bspline.txt) on the 21
#           held-out pairs of bench_varied (seeds 300-302), beside the chain the tables compare against;
#  default  the default with SequenceChangeDetection on the same 21 pairs;
#  hard     the hard tier (make_varied_set.py --difficulty hard --seeds 400 401 --out bench_varied_hard,
#           never tuned on): the default and elastix's chain, params/cross_sequence.txt on its
#           cross-sequence pairs.
#  hard_baselines  (sixth round) on the hard tier, elastix's own default (the B-spline map alone) on all
#           14 pairs and SyN on seed 401 (seed 400's SyN is bench_results/hard_syn from the fifth round);
#  order    (sixth round) the default with the tissue-order check on the 21 held-out and 14 hard pairs;
#  same_run (sixth round) the default, elastix's chain and SyN in one run on the hard tier's seed 401.
# Usage: bash benchmarks/issue12_calibration.sh [bspline] [default] [hard] [hard_baselines] [order] [same_run]
#        (bspline, default and hard: about 65 min; hard_baselines about 50 min; order about 10 min;
#        same_run about 35 min)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=${*:-bspline default hard hard_baselines order same_run}
pairs() { for s in "$@"; do for v in iso1 iso2 thick oblique pose t1_t2 t1_flair; do printf 'v%s_%s,' "$s" "$v"; done; done; }
HELD=$(pairs 300 301 302)
HARD=$(pairs 400 401)
for step in $STEPS; do
  case $step in
    bspline) "$PY" benchmarks/bench_varied.py bench_varied/manifest.csv -o bench_results/calibration_bspline \
               --cases "${HELD%,}" -m elastix_default="baseline elastix -p params/elastix_bspline.txt" ;;
    default) "$PY" benchmarks/bench_varied.py bench_varied/manifest.csv -o bench_results/test_sequences \
               --cases "${HELD%,}" -m default="run" ;;
    hard) "$PY" benchmarks/bench_varied.py bench_varied_hard/manifest.csv -o bench_results/hard --cases "${HARD%,}" \
            -m default="run" -m elastix="baseline elastix"
          "$PY" benchmarks/bench_varied.py bench_varied_hard/manifest.csv -o bench_results/hard/cross_sequence \
            --cases v400_t1_t2,v401_t1_t2,v400_t1_flair,v401_t1_flair -m cross_sequence="run -p params/cross_sequence.txt"
          "$PY" benchmarks/paired_summary.py bench_results/hard/results.jsonl --methods default,elastix \
            --pairs default:elastix ;;
    hard_baselines)
          "$PY" benchmarks/bench_varied.py bench_varied_hard/manifest.csv -o bench_results/hard_bspline \
            --cases "${HARD%,}" -m elastix_default="baseline elastix -p params/elastix_bspline.txt"
          S401=$(pairs 401)
          "$PY" benchmarks/bench_varied.py bench_varied_hard/manifest.csv -o bench_results/hard_syn \
            --cases "${S401%,}" -m syn="baseline syn" ;;
    order) "$PY" benchmarks/bench_varied.py bench_varied/manifest.csv -o bench_results/test_order \
             --cases "${HELD%,}" -m default="run"
           "$PY" benchmarks/bench_varied.py bench_varied_hard/manifest.csv -o bench_results/hard_order \
             --cases "${HARD%,}" -m default="run" ;;
    same_run) S401=$(pairs 401)
              "$PY" benchmarks/bench_varied.py bench_varied_hard/manifest.csv -o bench_results/hard_same_run_v401 \
                --cases "${S401%,}" -m default="run" -m elastix="baseline elastix" -m syn="baseline syn" ;;
    *) echo "unknown step $step (bspline, default, hard, hard_baselines, order, same_run)" >&2; exit 2 ;;
  esac
done
