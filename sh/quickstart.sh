#!/usr/bin/env bash
# Quick start on the embedded Digits dataset (no download): pretrain -> BiP prune at k = 0.1 -> finetune,
# then a summary table (stage, k, test top-1, sparsity) and the results report (CSV, plots) of the run folder.
# Extra args go to every train.py call.
set -euo pipefail
cd "$(dirname "$0")/.."
source sh/setup_env.sh
source sh/lib.sh
OUT="${OUT:-results/quickstart-$(date +%Y%m%d-%H%M%S)}"
common=(--result-dir "$OUT" --exp-name quickstart "$@")

run_train PRE --configs configs/Digits/pretrain.yml "${common[@]}"
run_train PRUNED --configs configs/Digits/bip.yml --source-net "$PRE/checkpoint/model_best.pth.tar" "${common[@]}"
run_train FINE --configs configs/Digits/finetune.yml --source-net "$PRUNED/checkpoint/model_best.pth.tar" "${common[@]}"
"$PY" -m engine.run_log "$PRE/summary.json" "$PRUNED/summary.json" "$FINE/summary.json"
"$PY" -m study.report "$OUT"
