#!/usr/bin/env bash
# The GPU check, in stages of one command each; no stage runs longer than 10 minutes.
#
#   bash scripts/gpu_check.sh 1              smoke run: generate.py --compile, gamma 4, bf16, 4 rows x 512 prompt
#                                            tokens, 64 new tokens; prints its stats line (attention backend,
#                                            compiled graphs and compile seconds, tokens/s) and keeps the compile
#                                            time for the sweep's limits. If it fails, stop: stage 2 and the
#                                            sweep refuse to run until it passes.
#   bash scripts/gpu_check.sh 2              tests/test_gpu.py, the measured copy bandwidth and bf16 GEMM rate, and
#                                            compiled attention's K/V read rate (queries of 1 and 5, B 16 and 64, 8K)
#   bash scripts/gpu_check.sh sweep L [B..]  scripts/benchmark.py at prompt length L: batches B (default 16 64 256),
#                                            budgets 256 512, gamma 3 and auto, compiled, bf16, beside transformers.
#                                            The batches whose compile time (from stage 1) fits the 10 minutes run;
#                                            the command for the others is printed.
# Each stage writes under $OUT (default out/gpu_check) and prints where. Without a CUDA device every
# stage says so in one line and exits with status 1.
#
# Settings (environment): OUT; PYTHON (default python3); GGUF=FILE.gguf, converted to
# checkpoints/smollm2-135m when that is missing (and the transformers peer's weights); WHEELS=DIR, wheels
# installed first with pip --no-index (e.g. gguf's, which converting a GGUF needs); PROMPT_FILE for the
# sweep instead of data/prompts_<n>.jsonl; BUDGETS (default "256 512").
#
# The default model on a machine without network. On a machine with network, the GGUF file is
#   python -c 'import convert_checkpoint as c; print(c.default_gguf())'
# Copy that file (98 MB) to the other machine, or a converted checkpoint directory (checkpoints/smollm2-135m).
# Where a transfer has a size limit, split the file and join the parts on the other side:
#   split -b 50M SmolLM2.gguf SmolLM2.gguf.part.     # before
#   cat SmolLM2.gguf.part.* > SmolLM2.gguf            # after
# and convert it there:
#   python convert_checkpoint.py SmolLM2.gguf --out checkpoints/smollm2-135m --dtype float32
# (or pass GGUF=SmolLM2.gguf to this script). Converting needs the gguf package; without network, download
# its wheel beforehand (python -m pip download gguf --no-deps -d wheels) and pass WHEELS=wheels. The sweep
# reads data/prompts_<n>.jsonl (n >= L): make them with `python scripts/prepare_data.py --prompt_len L`
# where there is network and copy data/ along.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-out/gpu_check}
LIMIT=570  # seconds one stage may take in all, setup included: under 10 minutes
say() { echo "gpu_check: $*"; }
usage() { echo "usage: bash scripts/gpu_check.sh 1 | 2 | sweep L [B ...]  (see its header)" >&2; exit 2; }

case "${1:-}" in
  1|2) [ $# -eq 1 ] || usage ;;
  sweep) [ $# -ge 2 ] || usage; for n in "${@:2}"; do [[ "$n" =~ ^[0-9]+$ ]] || usage; done ;;
  *) usage ;;
esac
if ! "$PY" -c 'import torch' 2>/dev/null; then
  say "cannot import torch with $PY (set PYTHON=...); nothing to check"; exit 1
fi
if [ "$("$PY" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)" != True ]; then
  say "no CUDA device here (torch.cuda.is_available() is False); nothing to check"; exit 1
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ "$1" != 1 ] && [ -f "$OUT/stage1.failed" ]; then
  say "stage 1 failed (see $OUT/stage1/smoke.log): fix that and rerun stage 1 first"; exit 1
fi

# ---- set-up: offline wheels, the model
if [ -n "${WHEELS:-}" ]; then
  SITE="$(cd "$OUT" && pwd)/site"
  if [ ! -f "$SITE/.done" ]; then
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl && touch "$SITE/.done" \
      || { say "could not install the wheels of $WHEELS"; exit 1; }
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ ! -f checkpoints/smollm2-135m/model.safetensors ]; then
  if [ -n "${GGUF:-}" ]; then
    "$PY" convert_checkpoint.py "$GGUF" --out checkpoints/smollm2-135m --dtype float32 >/dev/null \
      || { say "could not convert $GGUF (see above)"; exit 1; }
  elif ! "$PY" scripts/prepare_default_model.py >/dev/null; then
    say "no default model here: copy it over (see the header of scripts/gpu_check.sh)"; exit 1
  fi
fi
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0)
print(f"gpu_check: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")'

stage1() {
  local d=$OUT/stage1
  mkdir -p "$d"
  rm -f "$OUT/stage1.failed" "$OUT/compile_seconds"
  say "stage 1: generate.py --compile, gamma 4, bf16, 4 rows x 512 prompt tokens, 64 new tokens -> $d"
  timeout -k 10 $((LIMIT - SECONDS)) "$PY" generate.py --device cuda --dtype bfloat16 --compile --gamma 4 \
    --prompt_file README.md --prompt_len 512 --batch_size 4 --max_new_tokens 64 --json "$d/smoke.json" \
    > "$d/smoke.log" 2>&1
  local rc=$?
  grep '^stats:' "$d/smoke.log"
  if [ $rc -eq 0 ]; then
    "$PY" - "$d/smoke.json" "$OUT/compile_seconds" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))["stats"]
print(f"gpu_check: attention {s['attention']}, compiled {s['compiled_graphs']} graphs in {s['compile_seconds']:.1f} s, "
      f"{s['tokens_per_second']:.1f} tokens/s")
if s["attention"] != "flex" or s["compiled_graphs"] < 1:
    sys.exit("gpu_check: --compile ran no compiled graphs")
open(sys.argv[2], "w").write(f"{s['compile_seconds']:.1f} {s['compiled_graphs']}\n")
EOF
    rc=$?
  fi
  if [ $rc -ne 0 ]; then
    tail -n 15 "$d/smoke.log"
    echo "$rc" > "$OUT/stage1.failed"
    say "STAGE 1 FAILED (exit $rc$([ $rc -eq 124 ] && echo ': out of time')): stop here, the other stages would fail" \
        "the same way; the whole log is $d/smoke.log"
    exit 1
  fi
  say "stage 1 passed; its compile time, kept in $OUT/compile_seconds, sizes the sweep's limits"
}

stage2() {
  local d=$OUT/stage2
  mkdir -p "$d"
  say "stage 2: tests/test_gpu.py, then the measured ceilings -> $d"
  timeout -k 10 $((LIMIT - SECONDS - 60)) "$PY" -m pytest tests/test_gpu.py -q -rs 2>&1 | tee "$d/test_gpu.txt"
  local rc=${PIPESTATUS[0]}
  timeout 60 "$PY" - <<'EOF' | tee "$d/ceilings.txt"
import torch
x = torch.randn(1 << 28, device="cuda")  # 1 GiB
y = torch.empty_like(x)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
for _ in range(3):
    y.copy_(x)
s.record()
for _ in range(20):
    y.copy_(x)
e.record()
e.synchronize()
print(f"copy bandwidth (read + write): {2 * x.numel() * 4 * 20 / (s.elapsed_time(e) / 1e3) / 1e12:.2f} TB/s")
a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
for _ in range(3):
    a @ b
s.record()
for _ in range(20):
    a @ b
e.record()
e.synchronize()
print(f"bf16 GEMM 8192^3: {2 * 8192 ** 3 * 20 / (s.elapsed_time(e) / 1e3) / 1e12:.0f} TFLOP/s")
EOF
  # attention alone, compiled (FlexAttention's decoding kernel): K/V bytes read per second at 8K context,
  # LLaMA-3.1-8B's 32 query / 8 KV heads of 128 dims, bf16, beside the copy bandwidth above
  timeout 240 "$PY" - <<'EOF' | tee -a "$d/ceilings.txt"
import torch
from model import attend
f = torch.compile(attend, fullgraph=True, dynamic=False)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
for B in (16, 64):
    k, v = (torch.randn(B, 8, 8192, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for T in (1, 5):
        q = torch.randn(B, 32, T, 128, device="cuda", dtype=torch.bfloat16)
        pos = torch.arange(8192 - T, 8192, device="cuda").expand(B, T)
        for _ in range(3):
            f(q, k, v, pos, None, True)
        s.record()
        for _ in range(20):
            f(q, k, v, pos, None, True)
        e.record()
        e.synchronize()
        ms = s.elapsed_time(e) / 20
        print(f"attention B={B} T={T} L=8192: {ms:.3f} ms, K/V read at {2 * k.numel() * 2 / ms / 1e9:.2f} TB/s")
EOF
  say "stage 2: tests exit status $rc; output in $d"
  return "$rc"
}

sweep() {
  local L=$1 budgets=${BUDGETS:-256 512} c=60 g=1 run=() rest=() spent=0
  shift
  local bs=("$@")
  [ $# -eq 0 ] && bs=(16 64 256)
  if [ -f "$OUT/compile_seconds" ]; then
    read -r c g < "$OUT/compile_seconds"
  else
    say "no stage-1 compile time in $OUT/compile_seconds: assuming 60 s per compiled graph"
  fi
  local per_graph=$(( (${c%.*} + g) / g ))  # seconds per compiled graph, with a second of margin
  # graphs one batch size compiles: plain decoding 1, per budget the draft step and a verify step for each
  # gamma auto may pick (6), the peer's forward ~2; plus ~90 s of prefills and timed runs
  local each=$(( (3 + 7 * $(wc -w <<< "$budgets")) * per_graph + 90 )) left=$((LIMIT - SECONDS - 20))
  for B in "${bs[@]}"; do  # the first always; the others while the estimate fits
    if [ ${#run[@]} -eq 0 ] || [ $((spent + each)) -le "$left" ]; then
      run+=("$B"); spent=$((spent + each))
    else
      rest+=("$B")
    fi
  done
  if [ -z "${PROMPT_FILE:-}" ] && ! ls data/prompts_*.jsonl >/dev/null 2>&1; then
    say "no data/prompts_<n>.jsonl here: make it with python scripts/prepare_data.py --prompt_len $L where there is" \
        "network and copy data/ along, or pass PROMPT_FILE"; exit 1
  fi
  local d=$OUT/sweep/L${L}_B$(IFS=-; echo "${run[*]}")$([ -n "${BUDGETS:-}" ] && echo "_b${budgets// /-}")
  mkdir -p "$d"
  say "sweep L=$L: B=${run[*]} (about ${each} s each at ${per_graph} s per compiled graph; ${left} s left) -> $d"
  [ "$each" -gt "$left" ] && say "B=${run[0]} alone may not fit: if it is cut (the shapes finished are kept)," \
    "run one budget per command, e.g. BUDGETS=256 bash scripts/gpu_check.sh sweep $L ${run[0]}"
  # 120 new tokens: L + 120 + gamma stays in L's 128-slot cache block (L a multiple of 128), so every config
  # of a shape reuses its one prefill; the peer runs where B * L <= 512K tokens
  timeout -k 10 "$left" "$PY" scripts/benchmark.py --device cuda --dtype bfloat16 --compile --prompt_len "$L" \
    --batch_size "${run[@]}" --budget $budgets --gamma 3 auto --max_new_tokens 120 --repeats 3 \
    --hf_max_tokens 524288 --out "$d" ${GGUF:+--hf_model "$GGUF"} ${PROMPT_FILE:+--prompt_file "$PROMPT_FILE"} \
    > "$d/benchmark.log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then
    tr '\r' '\n' < "$d/benchmark.log" | tail -n 15
    say "the benchmark exited with status $rc$([ $rc -eq 124 ] && echo ' (out of time)'): the shapes it finished" \
        "are in $d/results.md"
  fi
  [ -f "$d/results.md" ] && cat "$d/results.md"
  [ ${#rest[@]} -gt 0 ] && say "not run in this command's 10 minutes: bash scripts/gpu_check.sh sweep $L ${rest[*]}"
  say "sweep output in $d"
  return "$rc"
}

case "$1" in
  1) stage1 ;;
  2) stage2 ;;
  sweep) shift; sweep "$@" ;;
esac
