#!/usr/bin/env bash
# Runs the official Fireworks cookbook against a local workbench backend; see scripts/cookbook.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${WORKBENCH_PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export WORKBENCH_PYTHON=${WORKBENCH_PYTHON:-$PY}
exec "$PY" scripts/cookbook.py "$@"
