#!/usr/bin/env bash
# Robust pruning sweep (HYDRA's setting): from a dense adversarially trained checkpoint, at each density
# HYDRA-robust prune + finetune, BiP-robust, and the magnitude baseline (top-k of |w| per layer, then robust
# finetune), all with configs/DATASET/robust_*.yml (TRADES, PGD evaluation); then one table with the PGD column and
# the results report of OUT (default results/robust_sweep_DATASET).
#
#   sh/robust_sweep.sh DATASET PRETRAINED "K1 K2 ..." [more train.py flags...]
#   e.g. sh/robust_sweep.sh Digits results/.../model_best.pth.tar "0.1 0.01"
#        sh/robust_sweep.sh CIFAR10 ADV_PRETRAINED.pth.tar "0.1 0.05 0.01" --arch wrn_28_4
# Make PRETRAINED with: python train.py --configs configs/DATASET/robust_pretrain.yml
set -euo pipefail
cd "$(dirname "$0")/.."
source sh/lib.sh
DATASET="${1:?usage: sh/robust_sweep.sh DATASET PRETRAINED \"K1 K2 ...\" [train.py flags...]}"
PRE="${2:?path of the dense (adversarially trained) checkpoint}"
KS="${3:?densities to sweep, e.g. \"0.1 0.01\"}"
shift 3
OUT="${OUT:-results/robust_sweep_${DATASET}}"
summaries=()
for K in $KS; do
  common=(--result-dir "$OUT" --k "$K" "$@")
  run_train PRUNED --configs "configs/$DATASET/robust_hydra.yml" --exp-name "${DATASET}_robust_hydra_k${K}" \
    --source-net "$PRE" "${common[@]}"
  run_train FINE --configs "configs/$DATASET/robust_finetune.yml" --exp-name "${DATASET}_robust_hydra_k${K}" \
    --source-net "$PRUNED/checkpoint/model_best.pth.tar" "${common[@]}"
  run_train BIP --configs "configs/$DATASET/robust_bip.yml" --exp-name "${DATASET}_robust_bip_k${K}" \
    --source-net "$PRE" "${common[@]}"
  run_train MAG --configs "configs/$DATASET/robust_magnitude.yml" --exp-name "${DATASET}_robust_magnitude_k${K}" \
    --source-net "$PRE" "${common[@]}"
  summaries+=("$FINE/summary.json" "$BIP/summary.json" "$MAG/summary.json")
done
"$PY" -m engine.run_log "${summaries[@]}"
"$PY" -m study.report "$OUT"
