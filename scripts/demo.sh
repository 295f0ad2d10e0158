#!/usr/bin/env bash
# One command on a fresh machine: install what is missing, prepare the built-in default model
# (SmolLM2-135M), generate with self-speculative decoding on the CPU (--gamma auto, the default), and
# compare it with plain decoding of the same prompts (the last line). Arguments go to both runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=$(bash scripts/install.sh --python)   # the Python it installed into ($PYTHON, or .venv)
"$PY" scripts/prepare_default_model.py
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
run() {
  "$PY" generate.py --device cpu --batch_size 4 --max_new_tokens 64 --draft_budget 64 --sink 16 \
    --prompt "The old lighthouse keeper climbed the stairs one last time, and" \
    --prompt "Photosynthesis is the process by which plants" \
    --prompt "A short history of the bicycle begins in 1817, when" \
    --prompt "Dear diary, today I finally" "$@"
}
run --json "$tmp/spec.json" "$@"
run --draft none --json "$tmp/plain.json" "$@" > /dev/null
echo -n "demo: "
"$PY" scripts/compare.py "$tmp/plain.json" "$tmp/spec.json"
