#!/usr/bin/env bash
# One command on a fresh machine: install what is missing, then run the test suite (CPU); arguments
# go to pytest (`bash scripts/test.sh tests/test_tokenizer.py -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
PY=$(bash scripts/install.sh --python)   # the Python it installed into ($PYTHON, or .venv)
"$PY" scripts/prepare_default_model.py
# the real-corpus test of prepare_data.py reads the default corpus (two small Debian packages);
# where apt-get cannot fetch them that one test is skipped, and says why
"$PY" -c 'import sys; sys.path.insert(0, "scripts"); import corpus; corpus.default_corpus()' \
    || echo "warning: default corpus not fetched; tests/test_prepare_data.py::test_default_corpus_real will skip" >&2
# arguments go to pytest; the whole suite (tests/) unless one of them names a file or folder
suite=tests
for a in "$@"; do if [ -e "${a%%::*}" ]; then suite=; fi; done
exec "$PY" -m pytest -q $suite "$@"
