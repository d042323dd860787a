#!/usr/bin/env bash
# Issue 6 benchmark: each feature beyond the paper with and without, on the 1 mm set with lesion
# masks (TRE over all landmarks and within 20 mm of the lesion, folding), and MI on the
# cross-sequence task (pre-op T1 -> post-op T2).
# Needs bench_data/ (scripts/make_benchmark_set.py, then scripts/make_lesion_masks.py).
# Run on a quiet machine: the cells are timed (one at a time, in-process).
set -euo pipefail
cd "$(dirname "$0")/.."
combireg evaluate bench_data/manifest_lesion.csv \
  -m default=params/default.txt \
  -m masked=params/default.txt,mask:exclude-lesion \
  -m adaptive=benchmarks/params/adaptive.txt \
  -m mse_ncc_mi=benchmarks/params/mse_ncc_mi.txt \
  -m bidir=benchmarks/params/bidir.txt \
  -m bidir_cw=benchmarks/params/bidir_cw.txt \
  --compare default:masked --compare default:adaptive --compare default:mse_ncc_mi --compare bidir:bidir_cw \
  -o "${OUT:-bench_results/eval_features}" -q
combireg evaluate bench_data/manifest_t1_t2.csv \
  -m mse=params/mse.txt -m ncc=params/ncc.txt -m mi=params/mi.txt -m gncc=benchmarks/params/globalncc.txt \
  --compare mi:mse --compare mi:ncc --compare mi:gncc \
  -o "${OUT_XSEQ:-bench_results/eval_t1_t2}" -q
