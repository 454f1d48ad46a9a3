#!/usr/bin/env bash
# ImageNet: pretrain (or PRETRAINED=...) -> BiP prune at K -> finetune, from DATA (train/ val/ or train.lmdb val.lmdb).
#   sh/imagenet_pipeline.sh DATA [K=0.1] [more train.py flags...]
set -euo pipefail
DATA="${1:?usage: sh/imagenet_pipeline.sh DATA_DIR [K] [train.py flags...]}"; K="${2:-0.1}"; shift $(( $# < 2 ? $# : 2 ))
exec bash "$(dirname "$0")/pipeline.sh" ImageNet bip "$K" --data-dir "$DATA" "$@"
