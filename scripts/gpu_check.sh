#!/usr/bin/env bash
# The GPU runbook, in stages of one command each; every stage ends within 10 minutes, compiling
# included: each one sizes its own work to the time it has, and says what it left for another command.
#
#   bash scripts/gpu_check.sh preflight      what a GPU run needs: packages, the model, prompts, the GPU; every
#                                            missing thing named in one line. Exit 0 iff nothing but (at most)
#                                            the GPU is missing. Every other stage runs it first.
#   bash scripts/gpu_check.sh 1              smoke run: generate.py --compile, gamma 4, bf16, 4 rows x 512 prompt
#                                            tokens, 64 new; prints its stats line and keeps its compile time,
#                                            which sizes the later stages. If it fails, stop: they refuse to run.
#   bash scripts/gpu_check.sh probe [L ...]  scripts/step_costs.py: LLaMA-3.1-8B-shaped steps (random weights, 2
#                                            layers measured, 32 extrapolated; decode, verify gamma 1-6, draft
#                                            256/512) at B 16 and 64 and L (default 8192 32768), compiled.
#   bash scripts/gpu_check.sh 2              tests/test_gpu.py, the copy bandwidth and bf16 GEMM rate, and
#                                            compiled attention's K/V read rate (queries of 1 and 5, B 16 and 64, 8K)
#   bash scripts/gpu_check.sh sweep L [B..]  scripts/benchmark.py at prompt length L: batches B (default 16 64 256),
#                                            budgets 256 512, gamma 3 and auto, compiled, bf16, beside transformers;
#                                            the shapes that do not fit its time are named, to run in another command.
# Each stage writes under $OUT (default out/gpu_check) and prints where.
#
# Settings (environment): OUT; PYTHON (default python3); CKPT (default checkpoints/smollm2-135m); GGUF=FILE.gguf,
# converted to CKPT when that is missing (also the transformers peer's weights); WHEELS=DIR, wheels installed
# first with pip --no-index --no-deps into $OUT/site; PROMPT_FILE for the sweep instead of data/prompts_<n>.jsonl;
# BUDGETS (default "256 512").
#
# A machine without network. On a machine with network, for the same Python version as the GPU machine's:
#   python -m pip download gguf sentencepiece tiktoken safetensors regex tqdm pytest --no-deps -d wheels
# (add numpy and transformers if the GPU machine lacks them), and find the default model's GGUF file with
#   python -c 'import convert_checkpoint as c; print(c.default_gguf())'
# Copy wheels/ and that file (98 MB), or the converted directory checkpoints/smollm2-135m, and data/ (the
# sweep's prompts: python scripts/prepare_data.py --prompt_len L) to the GPU machine. Where a transfer has a size
# limit, split the file and join the parts on the other side:
#   split -b 50M SmolLM2.gguf SmolLM2.gguf.part.     # before
#   cat SmolLM2.gguf.part.* > SmolLM2.gguf            # after
# then run the stages with WHEELS=wheels GGUF=SmolLM2.gguf (preflight tells what is still missing).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-out/gpu_check}
CKPT=${CKPT:-checkpoints/smollm2-135m}
LIMIT=570  # seconds one stage may take in all, set-up included: under 10 minutes
say() { echo "gpu_check: $*"; }
usage() { echo "usage: bash scripts/gpu_check.sh preflight | 1 | probe [L ...] | 2 | sweep L [B ...]  (see its header)" >&2; exit 2; }
left() { echo $((LIMIT - SECONDS - ${1:-0})); }

case "${1:-}" in
  preflight|1|2) [ $# -eq 1 ] || usage ;;
  probe) for n in "${@:2}"; do [[ "$n" =~ ^[0-9]+$ ]] || usage; done ;;
  sweep) [ $# -ge 2 ] || usage; for n in "${@:2}"; do [[ "$n" =~ ^[0-9]+$ ]] || usage; done ;;
  *) usage ;;
esac
if ! command -v "$PY" >/dev/null || ! "$PY" -c 'import torch' 2>/dev/null; then
  say "preflight: missing: torch (cannot import it with ${PY}; set PYTHON=...)"; exit 1
fi
export PYTHONUNBUFFERED=1
if [ -n "${WHEELS:-}" ]; then  # offline wheels, installed once beside the output
  mkdir -p "$OUT"
  SITE="$(cd "$OUT" && pwd)/site"
  if [ ! -f "$SITE/.done" ]; then
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl && touch "$SITE/.done" \
      || { say "could not install the wheels of $WHEELS"; exit 1; }
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

preflight() {  # one line; exit status 0 iff nothing but the GPU is missing
  CKPT=$CKPT GGUF=${GGUF:-} PROMPT_FILE=${PROMPT_FILE:-} "$PY" - <<'EOF'
import glob, importlib, importlib.util, os, sys
import torch
missing, note = [], []
v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
if v < (2, 11):
    missing.append(f"torch >= 2.11 (have {torch.__version__})")
for m, why in (("safetensors", ""), ("sentencepiece", ""), ("tiktoken", ""), ("regex", ""), ("numpy", ""),
               ("tqdm", ""), ("pytest", " (stage 2)")):
    try:
        importlib.import_module(m)
    except Exception:  # absent, or present and broken
        missing.append(m + why)
ck = os.environ["CKPT"]
have = all(os.path.isfile(os.path.join(ck, f)) for f in ("config.json", "model.safetensors")) and any(
    os.path.isfile(os.path.join(ck, f)) for f in ("tokenizer.json", "tokenizer.model"))
if not have:
    g = os.environ.get("GGUF")
    if not g:
        missing.append(f"the default model ({ck}, or GGUF=FILE.gguf to convert)")
    elif not os.path.isfile(g):
        missing.append(f"GGUF file {g}")
    elif importlib.util.find_spec("gguf") is None:
        missing.append("gguf (to convert GGUF=%s)" % g)
if not os.environ.get("PROMPT_FILE") and not glob.glob("data/prompts_*.jsonl"):
    missing.append("data/prompts_<n>.jsonl (the sweep; or PROMPT_FILE)")
if importlib.util.find_spec("transformers") is None:
    note.append("transformers is absent: the sweep runs without its peer")
gpu = torch.cuda.is_available()
out = "missing: " + ", ".join((["a CUDA device"] if not gpu else []) + missing) if missing or not gpu else "ok"
name = f"; {torch.cuda.get_device_name(0)}, torch {torch.__version__}" if gpu else f"; torch {torch.__version__}"
print(f"gpu_check: preflight: {out}{name}" + "".join(f"; {n}" for n in note))
sys.exit(1 if missing else 0)
EOF
}

preflight; pre=$?
[ "$1" = preflight ] && exit $pre
[ $pre -ne 0 ] && { say "stop: bring what preflight names (see the header)"; exit 1; }
if [ "$("$PY" -c 'import torch; print(torch.cuda.is_available())')" != True ]; then
  say "no CUDA device here: nothing to run"; exit 1
fi
mkdir -p "$OUT"
if [ "$1" != 1 ] && [ -f "$OUT/stage1.failed" ]; then
  say "stage 1 failed (see $OUT/stage1/smoke.log): fix that and rerun stage 1 first"; exit 1
fi
if [ ! -f "$CKPT/model.safetensors" ]; then
  "$PY" convert_checkpoint.py "$GGUF" --out "$CKPT" --dtype float32 >/dev/null || { say "could not convert $GGUF"; exit 1; }
fi
per_graph() {  # seconds one compiled graph took in stage 1 (60 without it), rounded up
  local c=60 g=1
  [ -f "$OUT/compile_seconds" ] && read -r c g < "$OUT/compile_seconds"
  echo $(( (${c%.*} + g) / g ))
}

stage1() {
  local d=$OUT/stage1
  mkdir -p "$d"
  rm -f "$OUT/stage1.failed" "$OUT/compile_seconds"
  say "stage 1: generate.py --compile, gamma 4, bf16, 4 rows x 512 prompt tokens, 64 new tokens -> $d"
  timeout -k 10 "$(left 10)" "$PY" generate.py --checkpoint "$CKPT" --device cuda --dtype bfloat16 --compile --gamma 4 \
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
  say "stage 1 passed; its compile time, kept in $OUT/compile_seconds, sizes the later stages"
}

probe() {
  local d=$OUT/probe Ls=("$@")
  [ ${#Ls[@]} -eq 0 ] && Ls=(8192 32768)
  mkdir -p "$d"
  local name=L$(IFS=-; echo "${Ls[*]}")
  say "probe: llama-3.1-8b steps, 2 of 32 layers measured, B 16 64, L ${Ls[*]}, compiled -> $d/$name.json"
  # the probe stops before a shape that would not end in time; a hard limit only guards against a hang
  timeout -k 10 "$(left 5)" "$PY" scripts/step_costs.py --arch llama-3.1-8b --layers 2 --batch_size 16 64 \
    --prompt_len "${Ls[@]}" --time_limit "$(left 30)" --json "$d/$name.json" 2>&1 | tee "$d/$name.log"
  local rc=${PIPESTATUS[0]}
  say "probe exit status $rc; output in $d"
  return "$rc"
}

stage2() {
  local d=$OUT/stage2
  mkdir -p "$d"
  say "stage 2: tests/test_gpu.py, then the measured ceilings -> $d"
  # the two ceilings below take at most 60 + 120 s: the tests get the rest
  timeout -k 10 "$(left 200)" "$PY" -m pytest tests/test_gpu.py -q -rs 2>&1 | tee "$d/test_gpu.txt"
  local rc=${PIPESTATUS[0]}
  timeout -k 5 60 "$PY" - <<'EOF' | tee "$d/ceilings.txt"
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
  # attention alone, compiled (FlexAttention's decoding kernel, GQA folded): K/V bytes read per second at 8K
  # context, LLaMA-3.1-8B's 32 query / 8 KV heads of 128 dims, bf16, beside the copy bandwidth above
  timeout -k 5 120 "$PY" - <<'EOF' | tee -a "$d/ceilings.txt"
import torch
from model import CacheArgs, attend
f = torch.compile(lambda *a: attend(*a, CacheArgs(flex=True)), fullgraph=True, dynamic=False)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
for B in (16, 64):
    k, v = (torch.randn(B, 8, 8192, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for T in (1, 5):
        q = torch.randn(B, 32, T, 128, device="cuda", dtype=torch.bfloat16)
        pos = torch.arange(8192 - T, 8192, device="cuda").expand(B, T)
        for _ in range(3):
            f(q, k, v, pos, None)
        s.record()
        for _ in range(20):
            f(q, k, v, pos, None)
        e.record()
        e.synchronize()
        ms = s.elapsed_time(e) / 20
        print(f"attention B={B} T={T} L=8192: {ms:.3f} ms, K/V read at {2 * k.numel() * 2 / ms / 1e9:.2f} TB/s")
EOF
  say "stage 2: tests exit status $rc; output in $d"
  return "$rc"
}

sweep() {
  local L=$1 budgets=${BUDGETS:-256 512}
  shift
  local bs=("$@")
  [ $# -eq 0 ] && bs=(16 64 256)
  if [ -z "${PROMPT_FILE:-}" ] && ! ls data/prompts_*.jsonl >/dev/null 2>&1; then
    say "no data/prompts_<n>.jsonl here (see the header), or pass PROMPT_FILE"; exit 1
  fi
  # one shape compiles plain decoding's graph and, per budget, a draft graph and a verify graph per gamma
  # auto may pick (6): it must fit the time left by itself, or the sweep runs one budget
  local pg n=$(wc -w <<< "$budgets")
  pg=$(per_graph)
  if [ $(( (1 + 7 * n) * pg + 120 )) -gt "$(left 30)" ] && [ "$n" -gt 1 ]; then
    budgets=${budgets%% *}
    say "one shape with $n budgets would take about $(( (1 + 7 * n) * pg + 120 )) s of compiling and runs: budget"         "$budgets only here; BUDGETS=\"...\" runs the others in another command"
  fi
  local d=$OUT/sweep/L${L}_B$(IFS=-; echo "${bs[*]}")_b${budgets// /-}
  mkdir -p "$d"
  say "sweep L=$L: B=${bs[*]} ($(per_graph) s per compiled graph in stage 1; $(left) s left) -> $d"
  # 120 new tokens: L + 120 + gamma stays in L's 128-slot cache block (L a multiple of 128), so every config
  # of a shape reuses its one prefill; the peer runs where B * L <= 512K tokens. The benchmark starts no shape
  # that would end past its --time_limit and names the ones left.
  timeout -k 10 "$(left 5)" "$PY" scripts/benchmark.py --checkpoint "$CKPT" --device cuda --dtype bfloat16 --compile \
    --prompt_len "$L" --batch_size "${bs[@]}" --budget $budgets --gamma 3 auto --max_new_tokens 120 --repeats 3 \
    --hf_max_tokens 524288 --time_limit "$(left 30)" --out "$d" ${GGUF:+--hf_model "$GGUF"} \
    ${PROMPT_FILE:+--prompt_file "$PROMPT_FILE"} > "$d/benchmark.log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then
    tr '\r' '\n' < "$d/benchmark.log" | tail -n 15
    say "the benchmark exited with status $rc$([ $rc -eq 124 ] && echo ' (out of time)'): the shapes it finished" \
        "are in $d/results.md"
  fi
  [ -f "$d/results.md" ] && cat "$d/results.md"
  grep -h "^note: not run within" "$d/benchmark.log" | sed 's/^/gpu_check: /'
  say "sweep output in $d"
  return "$rc"
}

case "$1" in
  1) stage1 ;;
  probe) shift; probe "$@" ;;
  2) stage2 ;;
  sweep) shift; sweep "$@" ;;
esac
