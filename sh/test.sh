#!/usr/bin/env bash
# Set up .venv from requirement.txt, then lint (ruff), type-check (mypy) and run the test suite (CPU, a few
# minutes). Each step stops the script on failure. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source sh/setup_env.sh
python -m ruff check .
python -m mypy
python -m pytest "$@"
