#!/usr/bin/env bash
# A sparsity study in one command: pretrain once, then for every seed, method and density
# prune -> finetune (each density pruned directly from the dense model), then the results table and
# plots (python -m study.report). Started again after an interruption, it skips every run that finished.
#
#   sh/study.sh [DATASET] [more train.py flags, passed to every run...]
#   e.g. sh/study.sh Digits
#        METHODS="bip hydra" KS="0.2 0.1 0.05" SEEDS="1 2 3" sh/study.sh MNIST5k
#        LAYER_TYPE=filter ARCH=lenet5 sh/study.sh MNIST5k
#
# Settings (environment variables, all optional):
#   METHODS     bip hydra woodfisher globalmagnitude magnitude lth (the default); bip, hydra, or any
#               --prune-method of the gradual pruner (woodfisher, globalmagnitude, magnitude, diagfisher,
#               woodtaylor, l1, random, fpgm, taylorfo, apoz, meanact, slimming, ...: the woodfisher trainer
#               with configs/DATASET/woodfisher.yml), each optionally followed by
#                 +obs    (bip/hydra) --obs-update before fine-tuning;
#                 +sens   (bip/hydra, unstructured) per-layer densities from python -m study.sensitivity on the
#                         dense model with --budget K, trained with --layer-k;
#                 @SHAPE  a density schedule: --k-schedule SHAPE for bip/hydra, --prune-schedule SHAPE for the
#                         gradual pruner (linear, cosine, exponential, onecycle, agp:P, iterative:N, oneshot).
#               e.g. METHODS="fpgm taylorfo l1 random woodfisher@cosine hydra@linear hydra+sens".
#               lth (iterative magnitude pruning with rewinding, unstructured only) runs once per seed, to the
#               smallest density; its rounds (0.8^r) are the other densities of the lottery series.
#   KS          densities k (fraction kept). Default: the lottery series 0.8 ... 0.0092 (unstructured) or
#               0.9 ... 0.1 (filter, channel).
#   LAYER_TYPE  unstructured (default), filter or channel.    ARCH   override the configs' architecture.
#   SEEDS       default "1".   PRETRAINED   a dense checkpoint: no pretraining (lth needs its run's
#               rewind_epoch_R.pth.tar, saved by pretraining with --rewind-epoch R).
#   REWIND_EPOCH  lth's rewind point, epochs into pretraining (default 1).
#   PRE_EPOCHS PRUNE_EPOCHS FT_EPOCHS ROUND_EPOCHS   epochs of pretraining, pruning, fine-tuning and
#               of one lth round (default: the configs'; a round: the pretrain config's). With PRUNE_EPOCHS,
#               the gradual pruner's events are fitted into them (the last at epoch min(6, PRUNE_EPOCHS - 1)).
#   OUT         the results folder (default results/study_DATASET_LAYERTYPE).
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET="${1:-Digits}"
shift $(( $# < 1 ? $# : 1 ))
source sh/setup_env.sh
source sh/lib.sh
LAYER_TYPE="${LAYER_TYPE:-unstructured}"
if [ "$LAYER_TYPE" = unstructured ]; then
  DEFAULT_KS="0.8 0.64 0.512 0.41 0.328 0.262 0.2097 0.1678 0.1342 0.1074 0.0859 0.0687 0.055 0.044 0.035 0.028 0.0225 0.018 0.0144 0.0115 0.0092"
else
  DEFAULT_KS="0.9 0.8 0.7 0.6 0.5 0.4 0.3 0.2 0.1"
fi
KS="${KS:-$DEFAULT_KS}"
METHODS="${METHODS:-bip hydra woodfisher globalmagnitude magnitude lth}"
SEEDS="${SEEDS:-1}"
REWIND_EPOCH="${REWIND_EPOCH:-1}"
OUT="${OUT:-results/study_${DATASET}_${LAYER_TYPE}}"
CONFIGS="configs/$DATASET"
[ -d "$CONFIGS" ] || { echo "error: no configs for dataset $DATASET ($CONFIGS); pick one of: $(ls configs | grep -v '\.py$' | tr '\n' ' ')" >&2; exit 2; }
CRITERIA="$("$PY" -c "from pruning.methods import PRUNE_METHODS; print(' '.join(PRUNE_METHODS.names()))")"
for method in $METHODS; do
  base="${method%%@*}"; base="${base%+obs}"; base="${base%+sens}"
  case " bip hydra lth $CRITERIA " in
    *" $base "*) ;;
    *) echo "error: unknown method '$method' in METHODS; use bip, hydra, lth or a --prune-method ($CRITERIA), optionally with +obs, +sens (bip/hydra) and @SHAPE" >&2; exit 2 ;;
  esac
  case "$method" in
    *+obs*|*+sens*) case "$base" in bip|hydra) ;; *) echo "error: '$method': +obs and +sens apply to bip and hydra" >&2; exit 2 ;; esac ;;
  esac
  case "$method" in
    *+sens*) [ "$LAYER_TYPE" = unstructured ] || { echo "error: '$method': the sensitivity allocation budgets weights: LAYER_TYPE=unstructured" >&2; exit 2; } ;;
  esac
done
common=(--result-dir "$OUT" ${ARCH:+--arch "$ARCH"} "$@")
masked=(--layer-type "$LAYER_TYPE")
TAG="${DATASET}${ARCH:+_$ARCH}_${LAYER_TYPE}"

# stage VAR EXP MODE [train.py args...]: VAR = the finished run of OUT/EXP/MODE, running it first if
# there is none (an interrupted run is started again from scratch; its folder stays, unfinished).
stage() {
  local var="$1" exp="$2" mode="$3"; shift 3
  local done_dir
  if done_dir="$("$PY" -m study.runs "$OUT" "$exp" "$mode")"; then
    echo "== $exp ($mode): finished before, in $done_dir" >&2
    printf -v "$var" '%s' "$done_dir"
    return 0
  fi
  echo "== $exp ($mode)" >&2
  run_train "$var" --exp-name "$exp" --exp-mode "$mode" --seed "$seed" "$@" "${common[@]}"
}

seed="$(echo "$SEEDS" | awk '{print $1}')"
if [ -z "${PRETRAINED:-}" ]; then
  stage PRE "${TAG}_pretrain" pretrain --configs "$CONFIGS/pretrain.yml" --rewind-epoch "$REWIND_EPOCH" \
    ${PRE_EPOCHS:+--epochs "$PRE_EPOCHS"}
  PRETRAINED="$PRE/checkpoint/model_best.pth.tar"
fi

smallest="$(printf '%s\n' $KS | sort -g | head -n 1)"
case " $METHODS " in  # IMP's rounds to the smallest density: one Python start, not one per seed
  *" lth "*) rounds="$("$PY" -c "from trainers.lth import imp_densities; print(len(imp_densities($smallest, 0.2)))")" ;;
esac
for seed in $SEEDS; do
  for method in $METHODS; do
    if [ "$method" = lth ]; then
      if [ "$LAYER_TYPE" != unstructured ]; then
        echo "== lth prunes single weights: skipped for --layer-type $LAYER_TYPE" >&2
        continue
      fi
      per_round="${ROUND_EPOCHS:-$(sed -n 's/^epochs: *//p' "$CONFIGS/pretrain.yml")}"
      stage RUN "${TAG}_lth_k${smallest}_s${seed}" prune --configs "$CONFIGS/lth.yml" "${masked[@]}" \
        --k "$smallest" --epochs "$(( rounds * per_round ))" --rewind-epoch "$REWIND_EPOCH" --source-net "$PRETRAINED"
      continue
    fi
    shape=""; [ "${method#*@}" != "$method" ] && shape="${method#*@}"
    plain="${method%%@*}"; base="${plain%+obs}"; base="${base%+sens}"
    obs=(); source_file=model_best.pth.tar
    if [ "${plain%+obs}" != "$plain" ]; then obs=(--obs-update); source_file=model_obs.pth.tar; fi
    case "$base" in
      bip|hydra) prune=(--configs "$CONFIGS/$base.yml" ${shape:+--k-schedule "$shape"}) ;;
      *) prune=(--configs "$CONFIGS/woodfisher.yml" --prune-method "$base" ${shape:+--prune-schedule "$shape"})
         if [ -n "${PRUNE_EPOCHS:-}" ]; then  # the gradual schedule fitted into the epochs given: last event at
           # epoch min(6, E - 1) (the configs' 6 when it fits), about 4 events from epoch 0
           last=$(( PRUNE_EPOCHS > 7 ? 6 : PRUNE_EPOCHS - 1 ))
           prune+=(--prune-start 0 --prune-end "$last" --prune-freq "$(( last >= 3 ? last / 3 : 1 ))")
         fi ;;
    esac
    for K in $KS; do
      exp="${TAG}_${method//:/_}_k${K}_s${seed}"
      layer_k=()
      if [ "${plain%+sens}" != "$plain" ]; then  # the allocation of the dense model at this K (deterministic: once per K)
        sens="$OUT/sensitivity_${TAG}_k${K}"
        [ -f "$sens/layer_k.json" ] || "$PY" -m study.sensitivity "$PRETRAINED" --budget "$K" --out "$sens" --no-progress
        layer_k=(--layer-k "$sens/layer_k.json")
      fi
      stage PRUNED "$exp" prune "${prune[@]}" "${masked[@]}" "${obs[@]}" "${layer_k[@]}" --k "$K" \
        --source-net "$PRETRAINED" ${PRUNE_EPOCHS:+--epochs "$PRUNE_EPOCHS"}
      stage FINE "$exp" finetune --configs "$CONFIGS/finetune.yml" "${masked[@]}" --k "$K" \
        --source-net "$PRUNED/checkpoint/$source_file" ${FT_EPOCHS:+--epochs "$FT_EPOCHS"}
    done
  done
done
"$PY" -m study.report "$OUT"
