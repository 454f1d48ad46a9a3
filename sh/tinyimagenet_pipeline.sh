#!/usr/bin/env bash
# TinyImageNet: pretrain (or PRETRAINED=...) -> BiP prune at K -> finetune, from DATA (tiny-imagenet-200/ or the LMDB pair).
#   sh/tinyimagenet_pipeline.sh DATA [K=0.1] [more train.py flags...]
set -euo pipefail
DATA="${1:?usage: sh/tinyimagenet_pipeline.sh DATA_DIR [K] [train.py flags...]}"; K="${2:-0.1}"; shift $(( $# < 2 ? $# : 2 ))
exec bash "$(dirname "$0")/pipeline.sh" TinyImageNet bip "$K" --data-dir "$DATA" "$@"
