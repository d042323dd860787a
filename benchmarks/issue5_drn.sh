#!/usr/bin/env bash
# Issue 5 benchmark: IO alone vs DRN + IO on the 1 mm set, and the paper's Table 1 grid
# (DRN trained with MSE, NCC or MSE+NCC x IO with none, MSE, NCC or MSE+NCC).
# Needs bench_data/ (scripts/make_benchmark_set.py) and the three models:
#   python scripts/train_shipped_drn.py --metric MSE     -o out/drn/drn_mse.pt
#   python scripts/train_shipped_drn.py --metric NCC     -o out/drn/drn_ncc.pt
#   python scripts/train_shipped_drn.py                  (MSE+NCC, the shipped combireg/models/drn_default.pt)
# Run on a quiet machine: the cells are timed (one at a time, in-process).
set -euo pipefail
cd "$(dirname "$0")/.."
MSE=${MSE:-out/drn/drn_mse.pt}; NCC=${NCC:-out/drn/drn_ncc.pt}; MIX=${MIX:-combireg/models/drn_default.pt}
methods=(-m io=params/default.txt -m io_short=params/drn_io.txt)
for drn in mse ncc mse_ncc; do
  case $drn in mse) model=$MSE;; ncc) model=$NCC;; mse_ncc) model=$MIX;; esac
  methods+=(-m "drn_${drn}=params/drn_only.txt,drn:${model}"
            -m "drn_${drn}+io_mse=benchmarks/params/drn_io_mse.txt,drn:${model}"
            -m "drn_${drn}+io_ncc=benchmarks/params/drn_io_ncc.txt,drn:${model}"
            -m "drn_${drn}+io_mse_ncc=params/drn_io.txt,drn:${model}")
done
combireg evaluate bench_data/manifest.csv "${methods[@]}" \
  --compare io:drn_mse_ncc+io_mse_ncc --compare io:io_short --compare io_short:drn_mse_ncc+io_mse_ncc \
  -o "${OUT:-bench_results/eval_drn}" -q
