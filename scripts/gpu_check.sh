#!/usr/bin/env bash
# Everything a lent GPU should do, in one call of <= 10 minutes: the CUDA tests (fp32 exactness,
# bf16, compiled steps with CUDA graphs), the measured copy bandwidth and GEMM rate, then the
# benchmark sweep at B in {16, 64, 256}, lengths {4K, 8K}, budgets {256, 512}, gamma fixed and
# auto, compiled, with the transformers peer. Everything is packed into $OUT/gpu_check.tgz (the
# device tool brings back at most 8 files; unpack it under benchmarks/ and commit it) and the
# tables are printed last; without OUT, into out/gpu_check.
#
# Getting the model there (the working tree that travels is at most 64 MiB; the GGUF is 98 MB):
#   here, once:   mkdir -p .gpu && echo /.gpu/ >> .git/info/exclude
#                 split -n 2 -d "$(python3 -c 'import convert_checkpoint as c; print(c.default_gguf())')" .gpu/gguf.
#                 python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                     --implementation cp --platform manylinux2014_x86_64 -d .gpu/whl gguf==0.19.0 matplotlib ...
#                 python3 scripts/prepare_data.py --prompt_len 4096 8000 --num 256
#   call 1:       run(carry=[".gpu/gguf.00"], command="mkdir -p /tmp/m && cp .gpu/gguf.00 /tmp/m/")
#   call 2 (while the machine is still warm, ~30 s):
#                 run(carry=[".gpu/gguf.01", ".gpu/whl", "data/prompts_4096.jsonl", "data/prompts_8000.jsonl"],
#                     command="cat /tmp/m/gguf.00 .gpu/gguf.01 > /tmp/m/model.gguf && \
#                              GGUF=/tmp/m/model.gguf bash scripts/gpu_check.sh")
# The device image has torch 2.11, transformers, safetensors, sentencepiece, tiktoken; not gguf.
set -uo pipefail
cd "$(dirname "$0")/.."
PACK=${OUT:-out/gpu_check}
OUT=/tmp/gpu_check
mkdir -p "$OUT" "$PACK"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/gpu_check.log"; }

if [ -d .gpu/whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

# the default model, fp32 (the tests compare fp32 outputs exactly; benchmarks cast to bf16)
if [ -n "${GGUF:-}" ] && [ ! -f checkpoints/smollm2-135m/model.safetensors ]; then
  "$PY" convert_checkpoint.py "$GGUF" --out checkpoints/smollm2-135m --dtype float32 || exit 1
fi

log "measured ceilings"
"$PY" - <<'EOF' | tee -a "$OUT/gpu.txt"
import torch
x = torch.randn(1 << 28, device="cuda")  # 1 GiB
y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record(); [y.copy_(x) for _ in range(20)]; e.record(); e.synchronize()
print(f"copy bandwidth (read + write): {2 * x.numel() * 4 * 20 / (s.elapsed_time(e) / 1e3) / 1e12:.2f} TB/s")
a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
for _ in range(3): a @ b
s.record(); [a @ b for _ in range(20)]; e.record(); e.synchronize()
print(f"bf16 GEMM: {2 * 8192 ** 3 * 20 / (s.elapsed_time(e) / 1e3) / 1e12:.0f} TFLOP/s")
EOF

log "CUDA tests"
timeout 180 "$PY" -m pytest tests/test_gpu.py -q -rs 2>&1 | tee "$OUT/test_gpu.txt"

# 8K first (the headline: >= 2x at B >= 64 is the target), then 4K; each writes as it goes, and
# the time guards keep the whole call inside 10 minutes
for L in 8000 4096; do
  log "benchmark L=$L"
  timeout 200 "$PY" scripts/benchmark.py --device cuda --dtype bfloat16 --compile \
    --batch_size 16 64 256 --prompt_len $L --budget 256 512 --gamma 3 auto \
    --max_new_tokens 128 --repeats 3 --out "$OUT/L$L" 2>&1 | tail -n 40 | tee "$OUT/benchmark_L$L.log"
done
log "done"
tar czf "$PACK/gpu_check.tgz" -C "$OUT" .
cat "$OUT"/gpu.txt "$OUT"/L*/results.md 2>/dev/null
