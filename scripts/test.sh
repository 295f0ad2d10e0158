#!/usr/bin/env bash
# One command on a fresh machine: install what is missing, then run the whole test suite (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh test
"$PY" scripts/prepare_default_model.py
exec "$PY" -m pytest tests -q "$@"
