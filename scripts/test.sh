#!/usr/bin/env bash
# The one test command: installs what it needs, then runs every test, the tutorial notebooks included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Notebooks run under nbval in lax mode: every cell must run without error (they check what matters
# with asserts); cells marked `# NBVAL_CHECK_OUTPUT` also have their stored output compared.
.venv/bin/python -m pytest tests notebooks --nbval-lax --nbval-current-env "$@"
