#!/usr/bin/env bash
# Sparsity sweep: prune a pretrained checkpoint at several densities, fine-tune each, print one table, then
# write the results report of OUT (default results/sweep_DATASET_METHOD; sh/study.sh runs whole studies).
#
#   sh/sweep.sh DATASET METHOD PRETRAINED "K1 K2 ..." [more train.py flags...]
#   e.g. sh/sweep.sh CIFAR10 bip results/C10/pretrain/1--.../checkpoint/model_best.pth.tar "0.2 0.1 0.05 0.01" --data-dir ./datasets
#        sh/sweep.sh CIFAR10 hydra PRE.pth.tar "0.5 0.3" --layer-type channel
set -euo pipefail
cd "$(dirname "$0")/.."
source sh/lib.sh
DATASET="${1:?usage: sh/sweep.sh DATASET bip|hydra PRETRAINED \"K1 K2 ...\" [train.py flags...]}"
METHOD="${2:?method: bip or hydra}"
PRE="${3:?path of the pretrained checkpoint}"
KS="${4:?densities to sweep, e.g. \"0.2 0.1 0.05\"}"
shift 4
OUT="${OUT:-results/sweep_${DATASET}_${METHOD}}"
summaries=()
for K in $KS; do
  common=(--result-dir "$OUT" --exp-name "${DATASET}_${METHOD}_sweep_k${K}" "$@")
  run_train PRUNED --configs "configs/$DATASET/$METHOD.yml" --k "$K" --source-net "$PRE" "${common[@]}"
  run_train FINE --configs "configs/$DATASET/finetune.yml" --k "$K" \
    --source-net "$PRUNED/checkpoint/model_best.pth.tar" "${common[@]}"
  summaries+=("$FINE/summary.json")
done
"$PY" -m engine.run_log "${summaries[@]}"
"$PY" -m study.report "$OUT"
