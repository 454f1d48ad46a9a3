#!/usr/bin/env bash
# Create .venv and install requirement.txt into it (skipped when requirement.txt is unchanged).
# Sourced by sh/quickstart.sh and sh/test.sh; afterwards `python` is the venv's.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  python3 -m venv "$VENV"
fi
STAMP="$VENV/.requirement.sha256"
WANT="$(sha256sum "$ROOT/requirement.txt" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "setup: installing requirement.txt (torch/torchvision are large: a few minutes the first time)" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$ROOT/requirement.txt"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
