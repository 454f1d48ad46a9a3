#!/usr/bin/env bash
# Full pipeline on one dataset: pretrain -> prune (BiP or HYDRA) at density K -> finetune.
#
#   sh/pipeline.sh DATASET [bip|hydra] [K] [more train.py flags...]
#   e.g. sh/pipeline.sh CIFAR10 bip 0.05 --data-dir ./datasets
#        PRETRAINED=path/model_best.pth.tar sh/pipeline.sh ImageNet bip 0.1 --data-dir /data/imagenet
#
# Configs come from configs/DATASET/{pretrain,<method>,finetune}.yml; flags after K override them.
# Set PRETRAINED to skip pretraining, OUT for the result folder (default results/pipeline_DATASET_METHOD_kK), PYTHON
# for the interpreter. Ends with the results report of OUT (CSV, plots).
set -euo pipefail
cd "$(dirname "$0")/.."
source sh/lib.sh
DATASET="${1:?usage: sh/pipeline.sh DATASET [bip|hydra] [K] [train.py flags...]}"
METHOD="${2:-bip}"
K="${3:-0.1}"
shift $(( $# < 3 ? $# : 3 ))
OUT="${OUT:-results/pipeline_${DATASET}_${METHOD}_k${K}}"
NAME="${NAME:-${DATASET}_${METHOD}_k${K}}"
common=(--result-dir "$OUT" --exp-name "$NAME" "$@")

summaries=()
if [ -z "${PRETRAINED:-}" ]; then
  run_train PRE --configs "configs/$DATASET/pretrain.yml" "${common[@]}"
  PRETRAINED="$PRE/checkpoint/model_best.pth.tar"
  summaries+=("$PRE/summary.json")
fi
run_train PRUNED --configs "configs/$DATASET/$METHOD.yml" --k "$K" --source-net "$PRETRAINED" "${common[@]}"
run_train FINE --configs "configs/$DATASET/finetune.yml" --k "$K" --source-net "$PRUNED/checkpoint/model_best.pth.tar" \
  "${common[@]}"
summaries+=("$PRUNED/summary.json" "$FINE/summary.json")
"$PY" -m engine.run_log "${summaries[@]}"
"$PY" -m study.report "$OUT"
