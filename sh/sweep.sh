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
USAGE='usage: sh/sweep.sh DATASET bip|hydra PRETRAINED "K1 K2 ..." [train.py flags...]'
fail() { echo "error: $1; $USAGE" >&2; exit 2; }
[ $# -ge 4 ] || fail "sh/sweep.sh needs 4 arguments and got $#"
DATASET="$1" METHOD="$2" PRE="$3" KS="$4"
shift 4
[ "$METHOD" = bip ] || [ "$METHOD" = hydra ] || fail "method '$METHOD' is not bip or hydra (sh/study.sh runs the other methods)"
[ -n "$DATASET" ] && [ -f "configs/$DATASET/$METHOD.yml" ] || fail "no config configs/$DATASET/$METHOD.yml (datasets: $(ls configs | grep -v '\.py$' | tr '\n' ' '))"
[ -f "$PRE" ] || fail "the pretrained checkpoint '$PRE' is not a file"
[ -n "${KS// /}" ] || fail "no densities given: pass them as one argument, e.g. \"0.2 0.1 0.05\""
for K in $KS; do
  "$PY" -c 'import sys; k = float(sys.argv[1]); sys.exit(not 0 < k <= 1)' "$K" 2>/dev/null || fail "density '$K' is not a number in (0, 1]"
done
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
