#!/usr/bin/env bash
# One command on a fresh machine: install what is missing, then run the whole test suite (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh test
"$PY" scripts/prepare_default_model.py
# the real-corpus test of prepare_data.py reads the default corpus (two small Debian packages);
# where apt-get cannot fetch them that one test is skipped, and says why
"$PY" -c 'import sys; sys.path.insert(0, "scripts"); import prepare_data; prepare_data.default_corpus()' \
    || echo "warning: default corpus not fetched; tests/test_prepare_data.py::test_default_corpus_real will skip" >&2
exec "$PY" -m pytest tests -q "$@"
