#!/usr/bin/env bash
# Installs workbench and everything its tests need into ./.venv (created if missing).
# torch is pinned to the 2.13.0 CPU wheel *before* the package, so pip never pulls CUDA builds;
# on a GPU host install your CUDA torch into the venv first and this step keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[test,notebook]"

