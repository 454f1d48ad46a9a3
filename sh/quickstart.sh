#!/usr/bin/env bash
# Quick start on the embedded Digits dataset (no download): pretrain -> BiP prune at k = 0.1 -> finetune,
# then a summary table (stage, k, test top-1, sparsity). Extra args go to every train.py call.
set -euo pipefail
cd "$(dirname "$0")/.."
source sh/setup_env.sh
OUT="${OUT:-results/quickstart-$(date +%Y%m%d-%H%M%S)}"
common=(--result-dir "$OUT" --exp-name quickstart "$@")
latest() { ls -d "$OUT/quickstart/$1"/*/ | sort -t/ -k1 | tail -n 1; }

python train.py --configs configs/Digits/pretrain.yml "${common[@]}"
PRE="$(latest pretrain)"
python train.py --configs configs/Digits/bip.yml --source-net "$PRE/checkpoint/model_best.pth.tar" "${common[@]}"
PRUNED="$(latest prune)"
python train.py --configs configs/Digits/finetune.yml --source-net "$PRUNED/checkpoint/model_best.pth.tar" "${common[@]}"
FINE="$(latest finetune)"
python -m trainers.run_log "$PRE/summary.json" "$PRUNED/summary.json" "$FINE/summary.json"
