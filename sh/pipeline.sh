#!/usr/bin/env bash
# Full pipeline on one dataset: pretrain -> prune (BiP or HYDRA) at density K -> finetune.
#
#   sh/pipeline.sh DATASET [bip|hydra] [K] [more train.py flags...]
#   e.g. sh/pipeline.sh CIFAR10 bip 0.05 --data-dir ./data
#        PRETRAINED=path/model_best.pth.tar sh/pipeline.sh ImageNet bip 0.1 --data-dir /data/imagenet
#
# Configs come from configs/DATASET/{pretrain,<method>,finetune}.yml; flags after K override them.
# Set PRETRAINED to skip pretraining, OUT for the result folder (default ./results), PYTHON for the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET="${1:?usage: sh/pipeline.sh DATASET [bip|hydra] [K] [train.py flags...]}"
METHOD="${2:-bip}"
K="${3:-0.1}"
shift $(( $# < 3 ? $# : 3 ))
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
OUT="${OUT:-results}"
NAME="${NAME:-${DATASET}_${METHOD}_k${K}}"
latest() { ls -d "$OUT/$NAME/$1"/*/ | sort -t/ -k1 | tail -n 1; }

if [ -z "${PRETRAINED:-}" ]; then
  "$PY" train.py --configs "configs/$DATASET/pretrain.yml" --result-dir "$OUT" --exp-name "$NAME" "$@"
  PRETRAINED="$(latest pretrain)checkpoint/model_best.pth.tar"
fi
"$PY" train.py --configs "configs/$DATASET/$METHOD.yml" --k "$K" --source-net "$PRETRAINED" \
  --result-dir "$OUT" --exp-name "$NAME" "$@"
PRUNED="$(latest prune)checkpoint/model_best.pth.tar"
"$PY" train.py --configs "configs/$DATASET/finetune.yml" --k "$K" --source-net "$PRUNED" \
  --result-dir "$OUT" --exp-name "$NAME" "$@"
"$PY" -m trainers.run_log "$(latest prune)summary.json" "$(latest finetune)summary.json"
