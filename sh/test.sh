#!/usr/bin/env bash
# Set up .venv from requirement.txt, then run the test suite (CPU, a few minutes). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source sh/setup_env.sh
python -m pytest "$@"
