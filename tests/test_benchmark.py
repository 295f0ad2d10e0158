"""scripts/benchmark.py: the sweep on the tiny random model (fast), the transformers peer's
measurement (its timing from given time stamps, its tokens on the default model). No assertion here
depends on how fast anything ran."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate as gen
import stats
from model import UsageError

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)

# Dickens, A Tale of Two Cities (1859): public domain
SENTENCE = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
            "foolishness, it was the epoch of belief, it was the epoch of incredulity. ")
ROW_KEYS = {"prompt_len", "batch_size", "method", "gamma", "budget", "sink", "tokens_per_second", "latency_ms",
            "speedup", "vs_hf", "acceptance_rate", "mean_accepted", "acceptance_by_position", "gamma_used",
            "lossless", "decode_step_s", "draft_forward_s", "verify_step_s", "repeats", "skipped",
            "compiled_graphs", "compile_seconds", "attention"}


@pytest.fixture
def prompt_file(tmp_path):
    f = tmp_path / "prompts.jsonl"  # 140, 185 and 230 tokens
    f.write_text("".join(json.dumps({"text": f"Chapter {i + 1}. " + SENTENCE * (3 + i)}) + "\n" for i in range(3)))
    return f


def sweep_args(ckpt, prompt_file, out, *extra):
    # 120 + 8 new tokens: plain decoding's cache (128 slots) is smaller than auto's (128 + 6 rounded
    # up to 256), so the sweep must keep every run exact across cache sizes
    return ["--checkpoint", str(ckpt), "--prompt_file", str(prompt_file), "--batch_size", "1", "2",
            "--prompt_len", "120", "--gamma", "2", "auto", "--budget", "32", "--sink", "4", "--max_new_tokens", "8",
            "--repeats", "1", "--warmup", "1", "--no_hf", "--device", "cpu", "--dtype", "float32", "--out", str(out),
            *extra]


@pytest.fixture(scope="module")
def sweep(tiny_ckpt, tmp_path_factory):
    """One sweep on the tiny model (plots included where matplotlib is present): its output folder."""
    d = tmp_path_factory.mktemp("sweep")
    f = d / "prompts.jsonl"  # 140, 185 and 230 tokens
    f.write_text("".join(json.dumps({"text": f"Chapter {i + 1}. " + SENTENCE * (3 + i)}) + "\n" for i in range(3)))
    assert benchmark.main(sweep_args(tiny_ckpt, f, d / "out")) == 0
    return d / "out"


def test_sweep_on_tiny_model(sweep):
    out = sweep
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
        assert r["skipped"] is None and r["prompt_len"] == 120
        assert r["tokens_per_second"] > 0 and r["latency_ms"] > 0 and len(r["repeats"]) == 1
        assert (r["compiled_graphs"], r["compile_seconds"], r["attention"]) == (0, 0.0, "sdpa")  # eager
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
    assert md.count("| 120 | ") == 6


def test_sweep_draws_its_plots(sweep):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed: the PNG plots are not drawn")
    for f in ("speedup_vs_batch.png", "throughput_vs_latency.png"):
        assert (sweep / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_separate_draft_model(tiny_ckpt, prompt_file, tmp_path):
    out = tmp_path / "out"
    args = sweep_args(tiny_ckpt, prompt_file, out, "--draft_checkpoint", str(tiny_ckpt), "--draft_budget", "0", "32",
                      "--no_plots")
    args[args.index("--batch_size") + 1: args.index("--prompt_len")] = ["2"]
    assert benchmark.main(args) == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    draft = [r for r in rows if r["method"] == "draft"]
    assert sorted((r["budget"], str(r["gamma"])) for r in draft) == [(0, "2"), (0, "auto"), (32, "2"), (32, "auto")]
    for r in draft:  # the draft is the model itself: on its full cache (budget 0) every draft passes
        assert r["lossless"] is True and r["draft_checkpoint"] == str(tiny_ckpt)
        assert r["sink"] == (4 if r["budget"] else None) and (r["budget"] or r["acceptance_rate"] == 1.0)


def test_a_quantized_draft_runs_in_its_own_dtype(tiny_ckpt, tiny_q, prompt_file, tmp_path, monkeypatch):
    """Without --dtype each model gets generate.py's default: the float32 target on the CPU, its
    int8 draft in bfloat16 (torch's fast path for quantized weights); greedy stays exact."""
    loaded, load = [], benchmark.Transformer.from_checkpoint
    monkeypatch.setattr(benchmark.Transformer, "from_checkpoint",
                        lambda path, device, dtype: loaded.append((str(path), dtype)) or load(path, device, dtype))
    out = tmp_path / "out"
    args = sweep_args(tiny_ckpt, prompt_file, out, "--draft_checkpoint", str(tiny_q["int8"]), "--draft_budget", "0",
                      "--gamma", "2", "--no_plots")
    i = args.index("--dtype")
    del args[i:i + 2]
    args[args.index("--batch_size") + 1: args.index("--prompt_len")] = ["2"]
    assert benchmark.main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert (res["config"]["dtype"], res["config"]["draft_dtype"]) == ("float32", "bfloat16")
    assert loaded == [(str(tiny_ckpt), torch.float32), (str(tiny_q["int8"]), torch.bfloat16)]
    assert [r["lossless"] for r in res["results"] if r["method"] == "draft"] == [True]


def test_both_draft_caches(tiny_ckpt, prompt_file, tmp_path):
    """--draft_cache streaming snapkv with --ring fractions: a row per (budget, cache, ring), each
    checked lossless, with its draft cache's fill time (the prefilled runs' only prefill work)."""
    out = tmp_path / "out"
    args = sweep_args(tiny_ckpt, prompt_file, out, "--draft_cache", "streaming", "snapkv", "--ring", "0.25", "0.5",
                      "--acceptance_only", "--no_plots")
    args[args.index("--batch_size") + 1: args.index("--prompt_len")] = ["2"]
    args[args.index("--gamma") + 1: args.index("--budget")] = ["2"]
    assert benchmark.main(args) == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    assert sorted((r["draft_cache"], r["ring"] or 0) for r in rows) == [("snapkv", 8), ("snapkv", 16), ("streaming", 0)]
    assert all(r["lossless"] is True and r["fill_seconds"] > 0 for r in rows)
    assert "| self snapkv ring 8 | 2 | 32 |" in (out / "results.md").read_text()


def test_a_shape_that_does_not_fit_is_skipped_with_generates_reason(tiny_ckpt, prompt_file, tmp_path, monkeypatch):
    monkeypatch.setattr(stats, "free_memory", lambda device: 1000)
    out = tmp_path / "out"
    assert benchmark.main(sweep_args(tiny_ckpt, prompt_file, out, "--no_plots")) == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    assert len(rows) == 6 and all("free" in r["skipped"] and r["tokens_per_second"] is None for r in rows)
    assert "skipped: batch 1 needs" in (out / "results.md").read_text()


@pytest.mark.parametrize("extra,message", [
    (["--gamma", "0"], "--gamma 0: must be >= 1"),
    (["--budget", "8"], "--budget 8 leaves fewer"),
    (["--prompt_len", "4000"], "no prompt has 4000 tokens"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--max_new_tokens", "1"], "--max_new_tokens >= 2"),
    (["--draft_cache", "snapkv", "--ring", "0.05"], "snapkv: a ring of 2 slots"),
])
def test_bad_flags_are_usage_errors(tiny_ckpt, prompt_file, tmp_path, extra, message):
    with pytest.raises(UsageError, match=message):
        benchmark.main(sweep_args(tiny_ckpt, prompt_file, tmp_path / "out", *extra))


def test_cli_reports_a_usage_error_in_one_line(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--gamma", "0"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == ["error: --gamma 0: must be >= 1 (plain "
                                                                   "decoding always runs) or auto"], p.stderr


class FakeHF:
    """Stands in for the peer: given tokens, given time stamps (prompt, then each new token)."""
    device = "cpu"

    def __init__(self, stamps):
        self.stamps = stamps


def fake_run(hf, ids, n, compile, sampling, seed):
    import torch

    return torch.zeros(ids.shape[0], n, dtype=torch.long), hf.stamps


def test_peer_rate_from_its_token_stamps(monkeypatch):
    monkeypatch.setattr(benchmark, "hf_run", fake_run)
    # B = 2 rows, N = 5 tokens: 2 * 4 decoded tokens from the first new token (t=1.5) to the last (t=3.5)
    r = benchmark.hf_measure(FakeHF([1.0, 1.5, 2.0, 2.5, 3.0, 3.5]), [[1, 2], [3, 4]], 5, repeats=3)
    assert r["tokens_per_second"] == 4.0 and r["repeats"] == [4.0] * 3 and r["note"] is None
    assert r["latency_ms"] == 500.0 and r["decode_step_s"] == 0.5 and r["prefill_seconds"] == 0.5


def test_peer_too_short_to_time_says_so(monkeypatch):
    monkeypatch.setattr(benchmark, "hf_run", fake_run)
    r = benchmark.hf_measure(FakeHF([1.0, 2.0, 2.0, 2.0]), [[1, 2]], 3, repeats=2)
    assert r["tokens_per_second"] is None and r["latency_ms"] is None and r["repeats"] == []
    assert "too short to time" in r["note"]


def test_peer_on_default_model_gives_our_tokens(default_ckpt):
    pytest.importorskip("transformers")
    import torch

    from convert_checkpoint import default_gguf
    from model import Transformer
    from tokenizer import load_tokenizer

    tok = load_tokenizer(default_ckpt)
    ids = tok.encode(SENTENCE * 2)[:32]
    hf = benchmark.load_hf(default_gguf(), torch.device("cpu"), torch.float32)
    res = benchmark.hf_measure(hf, [ids], 4, repeats=1, warmup=1)
    assert {"tokens", "tokens_per_second", "latency_ms", "decode_step_s", "repeats", "prefill_seconds",
            "note"} <= set(res)
    # a rate when the clock saw time pass, else an explicit note; never NaN
    assert (res["tokens_per_second"] > 0 and res["latency_ms"] > 0) if res["tokens_per_second"] is not None \
        else "too short to time" in res["note"]
    ours = gen.generate(Transformer.from_checkpoint(default_ckpt, "cpu", torch.float32), [ids], 4)[0]
    assert res["tokens"] == ours  # same weights, greedy, fp32: the same tokens
