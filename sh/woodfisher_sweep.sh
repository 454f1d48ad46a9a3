#!/usr/bin/env bash
# Sweep WoodFisher gradual pruning over target sparsities (0.8 0.9 0.95 0.98 unless SPARSITIES is set),
# then print one table of the runs.
#
#   sh/woodfisher_sweep.sh CONFIG SOURCE_NET [more train.py flags]
#   e.g. sh/woodfisher_sweep.sh configs/CIFAR10/woodfisher.yml results/.../model_best.pth.tar --prune-method globalmagnitude
#
# One train.py run per sparsity s with --k = 1 - s (the density kept); each run's summary.json holds
# its test top-1 and sparsity.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 2 || "$1" == -* ]]; then
  echo "usage: $0 CONFIG SOURCE_NET [train.py flags]" >&2
  exit 2
fi
config="$1"; source_net="$2"; shift 2
OUT="${OUT:-results/woodfisher_sweep_$(basename "$(dirname "$config")")_$(basename "$config" .yml)}"
source sh/setup_env.sh
source sh/lib.sh
summaries=()
for s in ${SPARSITIES:-0.8 0.9 0.95 0.98}; do
  k="$("$PY" -c "print(f'{1 - $s:.6g}')")"
  echo "== target sparsity $s (k = $k)" >&2
  run_train RUN --configs "$config" --source-net "$source_net" --k "$k" --result-dir "$OUT" "$@"
  summaries+=("$RUN/summary.json")
done
"$PY" -m engine.run_log "${summaries[@]}"
"$PY" -m study.report "$OUT"
