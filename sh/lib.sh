#!/usr/bin/env bash
# Shared by the launchers (source it): the interpreter, and run_train, which runs train.py and
# returns the run folder that the run itself printed. Launchers never guess the folder from names
# (sorting "9--..." after "10--..." once picked an old run).
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"

# run_train VAR [train.py args...]: run train.py (its output still shows), then set VAR to its run folder.
run_train() {
  local var="$1"; shift
  local out; out="$(mktemp)"
  # pipefail (set by the caller) makes a failed train.py fail this pipeline, and so the launcher.
  "$PY" train.py "$@" | tee "$out"
  local dir; dir="$(sed -n 's/^run folder: //p' "$out" | head -n 1)"
  rm -f "$out"
  if [ -z "$dir" ]; then
    echo "error: train.py printed no 'run folder:' line" >&2
    return 1
  fi
  printf -v "$var" '%s' "$dir"
}
