#!/usr/bin/env bash
# Convert an image tree into OUT/train.lmdb and OUT/val.lmdb in BiP's LMDB layout, verified.
#
#   sh/prepare_lmdb.sh SRC OUT [more flags of python -m data.lmdb_writer]
#
# SRC: an ImageNet-style folder with train/<class>/ and val/<class>/ (sort the flat ImageNet val
# folder first with sh/prepare_imagenet_val.sh), or tiny-imagenet-200 exactly as it unzips.
# Files appear under their final names only when complete and verified; rerun after a kill.
# Set PYTHON to choose the interpreter (default: the repository's .venv, else python3).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -lt 2 || "$1" == -* ]]; then
  echo "usage: $0 SRC OUT [--splits train val] [--overwrite] [--skip-bad-records]" >&2
  exit 2
fi
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m data.lmdb_writer "$@" --verify
