#!/bin/bash
# Uniform k (--scope layer), one global threshold (--scope global) and the sensitivity allocation, HYDRA at k=0.1,
# after fine-tuning; Digits and MNIST5k, 3 seeds. Prints one 'done:' line per fine-tuned run (about 40 minutes
# on 2 CPU cores). RESULTS=folder to write elsewhere.
set -e
cd "$(dirname "$0")/.."
source .venv/bin/activate
R=${RESULTS:-results/sensitivity_study}
for DS in Digits MNIST5k; do
for SEED in 1 2 3; do
  python train.py --configs configs/$DS/pretrain.yml --seed $SEED --no-progress --result-dir $R/$DS/s$SEED/pre > /dev/null
  PRE=$(ls $R/$DS/s$SEED/pre/*/pretrain/*/checkpoint/model_best.pth.tar)
  python -m study.sensitivity $PRE --budget 0.1 --no-progress --out $R/$DS/s$SEED/sens > /dev/null
  for MODE in layer global sens; do
    EXTRA="--scope $MODE"
    [ $MODE = sens ] && EXTRA="--scope layer --layer-k $R/$DS/s$SEED/sens/layer_k.json"
    python train.py --configs configs/$DS/hydra.yml --source-net $PRE --k 0.1 --seed $SEED $EXTRA --no-progress --result-dir $R/$DS/s$SEED/$MODE > /dev/null
    P=$(ls $R/$DS/s$SEED/$MODE/*/prune/*/checkpoint/model_best.pth.tar)
    SC=$MODE; [ $MODE = sens ] && SC=layer
    python train.py --configs configs/$DS/finetune.yml --source-net $P --k 0.1 --scope $SC --seed $SEED --no-progress --result-dir $R/$DS/s$SEED/$MODE-ft 2>&1 | grep "^done" | sed "s/^/$DS seed $SEED $MODE: /"
  done
done
done
