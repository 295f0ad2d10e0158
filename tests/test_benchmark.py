"""scripts/benchmark.py: the sweep on the tiny random model (fast), and the Hugging Face peer's
timing on the default model (one small call)."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)

# Dickens, A Tale of Two Cities (1859): public domain
SENTENCE = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
            "foolishness, it was the epoch of belief, it was the epoch of incredulity. ")
ROW_KEYS = {"prompt_len", "batch_size", "method", "gamma", "budget", "sink", "tokens_per_second", "latency_ms",
            "speedup", "vs_hf", "acceptance_rate", "mean_accepted", "acceptance_by_position", "gamma_used",
            "lossless", "decode_step_s", "draft_forward_s", "verify_step_s", "repeats", "skipped"}


@pytest.fixture
def prompt_file(tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"text": f"Chapter {i + 1}. " + SENTENCE * (3 + i)}) + "\n" for i in range(3)))
    return f


def sweep_args(ckpt, prompt_file, out, *extra):
    return ["--checkpoint", str(ckpt), "--prompt_file", str(prompt_file), "--batch_size", "1", "2",
            "--prompt_len", "48", "--gamma", "2", "auto", "--budget", "32", "--sink", "4", "--max_new_tokens", "8",
            "--repeats", "1", "--warmup", "1", "--no_hf", "--out", str(out), *extra]


def test_sweep_on_tiny_model(tiny_ckpt, prompt_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert benchmark.main(sweep_args(tiny_ckpt, prompt_file, out)) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["command"].startswith("python scripts/benchmark.py --checkpoint")
    assert {"device", "name", "cores", "torch", "dtype"} <= set(res["machine"])
    assert {"checkpoint", "args", "param_bytes", "kv_bytes_per_token"} <= set(res["model"])
    assert res["model"]["args"]["n_layers"] == 2 and res["model"]["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert res["config"]["batch_size"] == [1, 2] and res["config"]["gamma"] == [2, "auto"]
    rows = res["results"]
    assert all(ROW_KEYS <= set(r) for r in rows)
    assert sorted((r["batch_size"], r["method"], str(r["gamma"])) for r in rows) == [
        (B, m, g) for B in (1, 2) for m, g in (("ar", "0"), ("self", "2"), ("self", "auto"))]
    for r in rows:
        assert r["skipped"] is None and r["prompt_len"] == 48
        assert r["tokens_per_second"] > 0 and r["latency_ms"] > 0 and len(r["repeats"]) == 1
        if r["method"] == "ar":
            assert r["speedup"] == 1.0 and r["decode_step_s"] > 0 and r["lossless"] is None
        else:
            assert r["lossless"] is True, r.get("mismatch")
            assert r["speedup"] > 0 and r["budget"] == 32 and r["sink"] == 4
            assert 0 <= r["acceptance_rate"] <= 1 and r["mean_accepted"] >= 1
            assert r["draft_forward_s"] > 0 and r["verify_step_s"] > 0
            assert (r["gamma_used"] is not None) == (r["gamma"] == "auto")
            assert len(r["acceptance_by_position"]) == (6 if r["gamma"] == "auto" else 2)
    assert res["lossless_all"] is True
    md = (out / "results.md").read_text()
    assert res["command"] in md and "| length | batch | method | gamma | budget | tok/s |" in md
    assert md.count("| 48 | ") == 6
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed: the PNG plots are not drawn")
    for f in ("speedup_vs_batch.png", "throughput_vs_latency.png"):
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_check_skips_with_a_reason(tiny_ckpt, prompt_file, tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "available_memory", lambda device: 1000)
    out = tmp_path / "out"
    assert benchmark.main(sweep_args(tiny_ckpt, prompt_file, out, "--no_plots")) == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    assert rows and all("free on cpu" in r["skipped"] and r["tokens_per_second"] is None for r in rows)
    assert "skipped: needs ~" in (out / "results.md").read_text()


@pytest.mark.parametrize("extra,message", [
    (["--gamma", "0"], "gamma 0"),
    (["--budget", "8"], "--budget 8 leaves fewer"),
    (["--prompt_len", "4000"], "no prompt has 4000 tokens"),
    (["--repeats", "0"], "--repeats must be >= 1"),
])
def test_bad_flags_are_one_line_errors(tiny_ckpt, prompt_file, tmp_path, capsys, extra, message):
    assert benchmark.main(sweep_args(tiny_ckpt, prompt_file, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err


def test_hf_peer_timing_on_default_model(default_ckpt):
    pytest.importorskip("transformers")
    import torch

    from convert_checkpoint import default_gguf
    from generate import generate
    from model import Transformer
    from tokenizer import load_tokenizer

    tok = load_tokenizer(default_ckpt)
    ids = tok.encode(SENTENCE * 2)[:32]
    hf = benchmark.load_hf(default_gguf(), torch.device("cpu"), torch.float32)
    res = benchmark.hf_measure(hf, [ids], 4, modes=("eager",), repeats=1, warmup=1)["eager"]
    assert res["tokens_per_second"] > 0 and res["latency_ms"] > 0 and len(res["repeats"]) == 1
    assert res["compile_seconds"] is None and len(res["tokens"][0]) == 4
    ours = generate(Transformer.from_checkpoint(default_ckpt, dtype=torch.float32), [ids], 4)[0]
    assert res["tokens"] == ours  # same weights, greedy, fp32: the same tokens
