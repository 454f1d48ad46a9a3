#!/usr/bin/env bash
# Sort the flat ILSVRC2012 validation folder into one folder per class, from a mapping file.
#
#   sh/prepare_imagenet_val.sh --src VALDIR --mapping FILE --out DIR/val [--mode link|copy]
#
# FILE: one 'IMAGE CLASS' per line (whitespace or comma separated; a header line and extra
# columns are fine, so Kaggle's LOC_val_solution.csv works as is). Images are hard-linked (or
# copied) into DIR/val/<class>/; nothing in VALDIR is moved or deleted. Safe to rerun.
# Set PYTHON to choose the interpreter (default: the repository's .venv, else python3).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m data.imagenet_val "$@"
