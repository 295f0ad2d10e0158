"""scripts/step_costs.py (the LLaMA-shaped step-cost probe) and scripts/gpu_check.sh's preflight, on
the CPU: the probe's JSON contract and its full-depth extrapolation; preflight naming, in one line,
everything a GPU run would miss."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_probe_on_cpu_writes_its_contract(tmp_path):
    out = tmp_path / "out.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "step_costs.py"), "--arch", "smollm2-135m", "--layers",
                        "2", "--batch_size", "2", "--prompt_len", "512", "--device", "cpu", "--eager", "--repeats", "1",
                        "--json", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    j = json.loads(out.read_text())
    assert (j["arch"], j["layers"], j["full_layers"], j["device"]) == ("smollm2-135m", 2, 30, "cpu")
    (row,) = j["rows"]
    assert (row["batch_size"], row["prompt_len"]) == (2, 512)
    assert set(row["verify_ms"]) == {str(g) for g in range(1, 7)} and set(row["draft_ms"]) == {"256", "512"}
    m, one = row["measured"], row["layers_1"]
    for key in ("decode_ms", "verify_ms", "draft_ms"):  # full depth: t1 + (t2 - t1) * 29
        got, t2, t1 = (x[key] if key == "decode_ms" else x[key]["1" if key == "verify_ms" else "256"]
                       for x in (row, m, one))
        assert abs(got - (t1 + (t2 - t1) * 29)) < 1e-6 * max(abs(got), 1)
    # a layer's cost may drown in timing noise at this size: then the row says so instead of predicting
    assert set(row["predicted"]["best"]) == {"256", "512"} if "noisy" not in row else "predicted" not in row
    assert "| 2 | 512 |" in r.stdout


def test_probe_refuses_a_shape_that_does_not_fit(tmp_path):
    out = tmp_path / "out.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "step_costs.py"), "--arch", "smollm2-135m", "--layers",
                        "2", "--batch_size", "100000", "--prompt_len", "8000", "--device", "cpu", "--eager",
                        "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert "needs" in row["skipped"] and "the largest batch that fits is" in row["skipped"]


def test_preflight_names_every_missing_package_in_one_line(tmp_path, default_ckpt):
    """As on a machine with only torch: every other package fails to import; the model is absent."""
    blocked = ["safetensors", "sentencepiece", "tiktoken", "regex", "tqdm", "pytest", "gguf"]
    for m in blocked:
        (tmp_path / f"{m}.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CKPT": str(tmp_path / "none"), "GGUF": "",
           "OUT": str(tmp_path / "out"), "PROMPT_FILE": ""}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "preflight"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT, env=env)
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: preflight: missing: "), r.stdout + r.stderr
    for m in blocked[:-1] + ["the default model"]:
        assert m in lines[0], m
    assert r.returncode == 1
    env.pop("PYTHONPATH")
    env["CKPT"] = str(default_ckpt)
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "preflight"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT, env={**env, "PROMPT_FILE": str(ROOT / "README.md")})
    ok = r.stdout.strip()
    assert r.returncode == 0 and "missing" not in ok.replace("missing: a CUDA device", ""), ok  # at most the GPU
