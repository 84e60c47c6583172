#!/usr/bin/env bash
# The main demo on the embedded model: installs, starts the local backend, trains, syncs, samples, promotes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/workbench demo "$@"
