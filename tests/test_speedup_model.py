"""scripts/speedup_model.py: the formula's limits, the paper-setting trends, and --calibrate on a
synthetic results.json whose step times come from known machine numbers. No probe of this machine."""
import importlib.util
import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest

import generate
from model import ModelArgs

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("speedup_model", ROOT / "scripts" / "speedup_model.py")
sm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sm)

L38 = sm.MODELS["llama-3.1-8b"]
A100 = sm.PRESETS["a100"]


def test_expected_tokens_is_generates_and_its_limits():
    assert sm.expected_tokens is generate.expected_tokens
    for g in (1, 3, 8):
        assert sm.expected_tokens(1e-12, g) == pytest.approx(1.0)
        assert sm.expected_tokens(1.0, g) == g + 1
        assert sm.expected_tokens(0.999999, g) == pytest.approx(g + 1, rel=1e-4)
    assert sm.expected_tokens(0.8, 3) == pytest.approx(1 + 0.8 + 0.64 + 0.512)
    for E, mix in ((sm.expected_tokens(0.7, 4), {4: 1.0}), (2.2, {0: 0.25, 2: 0.25, 6: 0.5})):
        a = sm.alpha_for_tokens(E, mix)
        assert sum(w * sm.expected_tokens(a, g) for g, w in mix.items()) == pytest.approx(E, rel=1e-9)


def test_gamma_zero_is_plain_decoding():
    for B, L in ((1, 512), (32, 32000), (128, 100000)):
        r = sm.predict(L38, A100, B, L, 512, 0.8, 0, tp=8)
        assert r["speedup"] == 1.0 and r["E"] == 1.0
        assert r["t_verify"] == pytest.approx(r["t_decode"])
    # nothing accepted: speculation only costs
    assert sm.predict(L38, A100, 32, 32000, 512, 0.0, 3, tp=8)["speedup"] < 1


def test_speedup_grows_with_batch_and_length_on_the_papers_settings():
    best = lambda B, L: sm.best_gamma(L38, A100, B, L, 512, sm.pg19_alpha(L), tp=8)
    by_batch = [best(B, 32000)[1]["speedup"] for B in (32, 64, 128)]
    assert by_batch == sorted(by_batch) and by_batch[0] > 1.2
    by_len = [best(32, L)[1]["speedup"] for L in (4000, 8000, 32000, 100000)]
    assert by_len == sorted(by_len)
    at3 = [sm.predict(L38, A100, B, 32000, 512, 0.81, 3, tp=8)["speedup"] for B in (32, 64, 128)]
    assert at3 == sorted(at3)
    # short context, batch 1: weights dominate, a self-draft costs as much as a decode step: no gain
    g, r = sm.best_gamma(L38, A100, 1, 512, 512, 0.84, tp=8)
    assert g == 0 and r["speedup"] == 1.0


def test_best_gamma_is_sensible():
    for hw in ("a100", "h100"):
        for B, L in ((32, 8000), (64, 32000), (128, 32000), (32, 100000)):
            g, r = sm.best_gamma(L38, sm.PRESETS[hw], B, L, 512, sm.pg19_alpha(L), tp=8)
            assert (1 if L < 32000 else 2) <= g <= 8 and 1 < r["speedup"] < 4  # GQA at 8K: barely worth it
    # a tiny window caps gamma (gamma + 1 recent slots after the sinks)
    g, _ = sm.best_gamma(L38, A100, 128, 32000, 20, 0.95, tp=8, sink=16)
    assert g <= 3


def test_tensor_parallel_costs():
    one = sm.forward_cost(L38, 32, 32000, 1, 2, 1)
    eight = sm.forward_cost(L38, 32, 32000, 1, 2, 8)
    assert eight.attn_bytes == pytest.approx(one.attn_bytes / 8, rel=0.01)  # 8 KV heads over 8 GPUs
    tiny = sm.MODELS["tinyllama-1.1b"]  # 4 KV heads: on 8 GPUs the busiest still holds a quarter
    assert sm.forward_cost(tiny, 32, 8000, 1, 2, 8).attn_bytes == pytest.approx(
        sm.forward_cost(tiny, 32, 8000, 1, 2, 4).attn_bytes)
    assert sm.comm_time(eight, A100) > 64 * A100.link_latency_s and sm.comm_time(one, A100) == 0


def test_no_argument_table_has_the_papers_numbers(capsys):
    assert sm.main([]) == 0
    out = capsys.readouterr().out
    for *_, B, g, ps, _src in sm.PAPER_ROWS:
        assert f"{ps:>5.2f} {g:>2}" in out
    for s in ("1.22", "1.38", "1.47", "1.84", "1.18", "1.48", "1.63", "2.00", "1.29", "1.57", "1.66", "1.91",
              "Where and why", "gpt-fast"):
        assert s in out


# ------------------------------------------------------------------------ synthetic results.json
SMOL = ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, vocab_size=49152,
                 intermediate_size=1536, max_seq_len=8192, tie_embeddings=True)
TRUE = sm.Hardware("synthetic", 20e9, 200e9, layer_overhead_s=150e-6, step_overhead_s=3e-3)
N, BUDGET, SINK, ALPHA = 32, 64, 16, 0.7


def synthetic_results(path: Path, noise=0.01) -> list[float]:
    """A results.json as scripts/benchmark.py writes it, its times from TRUE (float32, one process),
    each measured time off by up to +-noise. -> the speculative rows' true speedups."""
    rows, speedups, k = [], [], 0

    def jitter(t):
        nonlocal k
        k += 1
        return t * (1 + noise * math.sin(7.3 * k))

    for L in (512, 2048, 6144):
        S = -(-(L + N + max(generate.AUTO_GAMMAS)) // 64) * 64
        for B in (1, 4, 16):
            t_dec = sm.step_time(SMOL, TRUE, B, S, 1, dtype_bytes=4) + TRUE.step_overhead_s
            base = {"prompt_len": L, "batch_size": B, "skipped": None, "repeats": [1.0], "lossless": None,
                    "vs_hf": None, "generated_tokens": B * N}
            rows.append(base | {
                "method": "ar", "gamma": 0, "budget": None, "sink": None, "tokens_per_second": B / t_dec,
                "latency_ms": 1e3 * t_dec, "speedup": 1.0, "acceptance_rate": None, "mean_accepted": None,
                "acceptance_by_position": None, "gamma_used": None, "decode_step_s": jitter(t_dec),
                "draft_forward_s": None, "verify_step_s": None})
            t_draft = sm.step_time(SMOL, TRUE, B, BUDGET, 1, dtype_bytes=4)
            for g in (2, 4, "auto"):
                used = {0: 10, 2: 20, 4: 30} if g == "auto" else {g: 1}
                tot = sum(used.values())
                mix = {h: n / tot for h, n in used.items()}
                E = sum(w * sm.expected_tokens(ALPHA, h) for h, w in mix.items())
                t_ver = sum(w * sm.step_time(SMOL, TRUE, B, S, h + 1, dtype_bytes=4, kv_copies=2)
                            for h, w in mix.items())
                n_draft = sum(w * h for h, w in mix.items())
                t_step = n_draft * t_draft + t_ver + TRUE.step_overhead_s
                sp = E * t_dec / t_step
                speedups.append(sp)
                rows.append(base | {
                    "method": "self", "gamma": g, "budget": BUDGET, "sink": SINK, "tokens_per_second": B * E / t_step,
                    "latency_ms": 1e3 * t_step / E, "speedup": sp, "acceptance_rate": (E - 1) / n_draft,
                    "mean_accepted": E, "acceptance_by_position": [ALPHA] * (6 if g == "auto" else g),
                    "lossless": True, "gamma_used": {str(h): n for h, n in used.items()} if g == "auto" else None,
                    "decode_step_s": None, "draft_forward_s": jitter(t_draft), "verify_step_s": jitter(t_ver),
                    "verify_steps": N / E})
    res = {"command": "synthetic", "machine": {"device": "cpu", "name": "synthetic", "cores": 2, "torch": "x",
                                               "dtype": "float32"},
           "model": {"checkpoint": "synthetic/smol", "args": asdict(SMOL),
                     "param_bytes": 4 * sm.param_count(SMOL), "kv_bytes_per_token": sm.kv_bytes_per_token(SMOL, 4)},
           "config": {"max_new_tokens": N, "gamma": [2, 4, "auto"], "budget": [BUDGET], "sink": SINK,
                      "dtype": "float32"},
           "results": rows + [{"prompt_len": 512, "batch_size": 64, "method": "ar", "skipped": "needs ~9 GB"}]}
    path.write_text(json.dumps(res))
    return speedups


def test_calibrate_recovers_the_machine(tmp_path):
    f = tmp_path / "results.json"
    true_speedups = synthetic_results(f)
    res = sm.load_results(f)
    st = sm.bench_setup(res)
    rms, notes = sm.row_models(res, st)
    assert len(rms) == 9 * 4 and not notes
    hw, rep = sm.calibrate(st, rms)
    assert hw.bandwidth == pytest.approx(TRUE.bandwidth, rel=0.03)
    assert rep["flops_identifiable"] and hw.flops == pytest.approx(TRUE.flops, rel=0.03)
    assert hw.layer_overhead_s == pytest.approx(TRUE.layer_overhead_s, rel=0.05)
    assert hw.step_overhead_s == pytest.approx(TRUE.step_overhead_s, rel=0.10)
    assert rep["bandwidth_determined"] and rep["rms_rel_error"] < 0.015
    out = []
    cmp = sm.compare(res, st, rms, hw, out=out.append)
    assert len(cmp["speedup_err"]) == len(true_speedups)
    assert max(abs(e) for e in cmp["speedup_err"]) < 0.02
    # with the true numbers given as flags the predictions are the synthetic speedups exactly
    cmp = sm.compare(res, st, rms, TRUE, out=lambda s: None)
    assert max(abs(e) for e in cmp["speedup_err"]) < 1e-9


def test_cli_on_results(tmp_path, capsys):
    f = tmp_path / "results.json"
    synthetic_results(f, noise=0.0)
    assert sm.main([str(f), "--calibrate"]) == 0
    out = capsys.readouterr().out
    assert "Calibration" in out and "20.00 GB/s" in out and "speedup: median |error| 0.0%" in out
    # not measured on this machine: no numbers to predict with unless given
    assert sm.main([str(f)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert sm.main([str(f), "--bandwidth", "20", "--flops", "0.2", "--layer_overhead_us", "150",
                    "--step_overhead_ms", "3"]) == 0
    assert "speedup: median |error| 0.0%" in capsys.readouterr().out


def test_cli_predict_and_errors(tmp_path, capsys):
    d = tmp_path / "ckpt"
    d.mkdir()
    SMOL.save(d / "config.json")
    assert sm.main(["--checkpoint", str(d), "--hw", "h100", "--batch", "4", "64", "--length", "4096",
                    "--budget", "64", "--gamma", "3"]) == 0
    out = capsys.readouterr().out
    assert "best" in out and "γ=3:" in out
    assert sm.main(["--model", "llama-3.1-8b", "--draft", "tinyllama", "--tp", "8", "--draft_tp", "4",
                    "--length", "32000"]) == 0
    capsys.readouterr()
    for argv in (["nope.json"], ["--model", "gpt-9"], ["--hw", "tpu"], ["--calibrate"], ["--batch", "0", "--model",
                                                                                     "llama-3.1-8b"]):
        assert sm.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (argv, err)


def test_calibrate_holds_what_the_rows_cannot_tell(tmp_path):
    """Batch 1 at one short length: every forward moves about the same bytes and little compute, so
    within 5% timing noise bandwidth and the per-layer overhead trade off and flops are unbounded;
    with a known machine both are held at its values and the overheads refit."""
    f = tmp_path / "results.json"
    synthetic_results(f, noise=0.05)
    res = sm.load_results(f)
    res["results"] = [r for r in res["results"] if r.get("prompt_len") == 512 and r.get("batch_size") == 1]
    st = sm.bench_setup(res)
    rms, _ = sm.row_models(res, st)
    _, free = sm.calibrate(st, rms)
    assert not free["bandwidth_determined"] and not free["flops_identifiable"]
    hw, rep = sm.calibrate(st, rms, base=TRUE)
    assert hw.bandwidth == pytest.approx(TRUE.bandwidth) and hw.flops == pytest.approx(TRUE.flops)
    assert len(rep["held"]) == 2
    assert hw.layer_overhead_s == pytest.approx(TRUE.layer_overhead_s, rel=0.1)
    with pytest.raises(sm.ModelError, match="needs more than"):
        sm.calibrate(st, [rm for rm in rms if rm.kind == "ar"])
