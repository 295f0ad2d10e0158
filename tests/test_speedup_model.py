"""scripts/speedup_model.py: the formula's limits, the paper-setting trends and table, the split-KV
option, and a synthetic results.json whose step times come from known machine numbers."""
import importlib.util
import json
import math
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

import cli
import model
import sampling
import stats
from model import ModelArgs

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("speedup_model", ROOT / "scripts" / "speedup_model.py")
sm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sm)

L38 = sm.MODELS["llama-3.1-8b"]
A100, H100 = sm.PRESETS["a100"], sm.PRESETS["h100"]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """main() behind cli.run, as the script runs it: -> (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: sm.main(argv))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_one_home_per_formula():
    assert sm.expected_tokens is sampling.expected_tokens and sm.cache_len is stats.cache_len
    assert sm.UsageError is model.UsageError and sm.ArgParser is cli.ArgParser
    c = sm.forward_cost(L38, 4, 1000, 1, 2, 1)
    assert c["kv_bytes"] == (4 * 1000 + 4) * L38.kv_bytes_per_token(2)  # reads + the new token's write
    assert L38.kv_bytes_per_token(2) == 128 * 1024


def test_gamma_zero_is_plain_decoding():
    for B, L in ((1, 512), (32, 32000), (128, 100000)):
        r = sm.predict(L38, A100, B, L, 512, 0.8, 0, tp=8)
        assert r["speedup"] == 1.0 and r["E"] == 1.0 and r["t_verify"] == pytest.approx(r["t_decode"])
    assert sm.predict(L38, A100, 32, 32000, 512, 0.0, 3, tp=8)["speedup"] < 1  # nothing accepted: it only costs
    # measured tokens per step replace E(alpha); a gamma mix averages the verify over the steps
    r = sm.predict(L38, A100, 32, 32000, 512, None, {0: 0.5, 4: 0.5}, tp=8, tokens=2.0)
    r0, r4 = (sm.predict(L38, A100, 32, 32000, 512, 0.8, g, tp=8) for g in (0, 4))
    assert r["E"] == 2.0 and r["t_draft"] == pytest.approx(r4["t_draft"])
    assert r0["t_verify"] < r["t_verify"] < r4["t_verify"]


def test_speedup_grows_with_batch_and_length_on_the_papers_settings():
    best = lambda B, L: (lambda g, res: res[g]["speedup"])(*sm.best_gamma(L38, A100, B, L, 512, sm.pg19_alpha(L), tp=8))
    by_batch = [best(B, 32000) for B in (32, 64, 128)]
    assert by_batch == sorted(by_batch) and by_batch[0] > 1.2
    assert [best(32, L) for L in (4000, 8000, 32000, 100000)] == sorted(best(32, L) for L in (4000, 8000, 32000, 100000))
    at3 = [sm.predict(L38, A100, B, 32000, 512, 0.81, 3, tp=8)["speedup"] for B in (32, 64, 128)]
    assert at3 == sorted(at3)
    # short context, batch 1: weights dominate, a self-draft costs as much as a decode step: no gain
    g, res = sm.best_gamma(L38, A100, 1, 512, 512, 0.84, tp=8)
    assert g == 0 and res[g]["speedup"] == 1.0


def test_best_gamma_is_sensible():
    for hw in (A100, H100):
        for B, L in ((32, 8000), (64, 32000), (128, 32000), (32, 100000)):
            g, res = sm.best_gamma(L38, hw, B, L, 512, sm.pg19_alpha(L), tp=8)
            assert (1 if L < 32000 else 2) <= g <= 8 and 1 < res[g]["speedup"] < 4
    g, _ = sm.best_gamma(L38, A100, 128, 32000, 20, 0.95, tp=8, sink=16)  # 4 recent slots cap gamma at 3
    assert g <= 3


def test_tensor_parallel_costs():
    one, eight = sm.forward_cost(L38, 32, 32000, 1, 2, 1), sm.forward_cost(L38, 32, 32000, 1, 2, 8)
    assert eight["kv_bytes"] == pytest.approx(one["kv_bytes"] / 8)  # 8 KV heads over 8 GPUs
    tiny = sm.MODELS["tinyllama-1.1b"]  # 4 KV heads: on 8 GPUs the busiest still holds a quarter
    assert sm.forward_cost(tiny, 32, 8000, 1, 2, 8)["kv_bytes"] == sm.forward_cost(tiny, 32, 8000, 1, 2, 4)["kv_bytes"]
    free = replace(A100, link_bw=math.inf, link_latency_s=0.0)
    assert sm.forward_time(eight, A100) - sm.forward_time(eight, free) > 2 * 32 * A100.link_latency_s
    assert sm.forward_time(one, A100) == sm.forward_time(one, free)


def test_split_kv():
    """Without split-KV, attention runs on B * local KV heads of the SMs: at TP 8 (one KV head per
    rank) and B = 64 on an H100 it takes 132/64 as long; B >= SMs, or a CPU, is unchanged."""
    ns = replace(H100, split_kv=False)
    for B, T in ((64, 1), (64, 5), (16, 1)):
        c = sm.forward_cost(L38, B, 8192, T, 2, 8)
        attn = max(c["kv_bytes"] / H100.bandwidth, c["kv_flops"] / H100.flops)
        assert sm.forward_time(c, ns) - sm.forward_time(c, H100) == pytest.approx(attn * (132 / B - 1))
    c = sm.forward_cost(L38, 256, 8192, 5, 2, 8)
    assert sm.forward_time(c, ns) == sm.forward_time(c, H100)
    cpu = sm.Hardware("cpu", 50e9, 1e12)
    assert sm.forward_time(c, replace(cpu, split_kv=False)) == sm.forward_time(c, cpu)
    # decode and verify pay it alike: tokens/s falls, the speedup does not
    s, n = (sm.predict(L38, hw, 64, 32000, 512, 0.81, 4, tp=8) for hw in (H100, ns))
    assert n["tokens_per_s"] < s["tokens_per_s"] and n["speedup"] >= s["speedup"]


def test_no_argument_table_has_the_papers_numbers(capsys):
    assert sm.main([]) == 0
    out = capsys.readouterr().out
    for *_, B, g, ps in sm.PAPER_ROWS:
        assert f"{ps:>5.2f} {g:>2}" in out
    # the model's numbers, pinned (speedup at its best γ and the paper's, ratio, T_dec, draft/dec, verify/dec)
    for row in ("8xA100 llama-3.1-8b   self        32000   32 |  1.22  3 | 0.810         3  1.69    1.69        1.38 "
                "|     13.6     0.245      1.041 |                1.72",
                "8xA100 llama-2-7b-32k tinyllama   32000   32 |  1.91  4 | 0.810*        8  3.33    2.93        1.54 "
                "|     44.6     0.038      1.017 |                1.64",
                "8xH100 llama-2-7b-32k self         8000  128 |  1.65  4 | 0.830         5  2.05    2.05        1.24 "
                "|     25.4     0.166      1.073 |                1.49",
                "model/paper at the paper's γ: 1.22-1.69, median 1.38", "A100 TP8 context 1      published  328.4, "
                "model  339.0 (+3%)", "132 SMs, KV split"):
        assert row in out
    assert sm.main(["--no_split_kv"]) == 0
    assert "KV not split" in capsys.readouterr().out


# ------------------------------------------------------------------------ synthetic results.json
SMOL = ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, vocab_size=49152,
                 intermediate_size=1536, max_seq_len=8192, tie_embeddings=True)
DRAFT = ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=49152, intermediate_size=256,
                  max_seq_len=8192)
TRUE = sm.Hardware("synthetic", 20e9, 200e9, layer_overhead_s=150e-6, step_overhead_s=3e-3)
N, BUDGET, SINK, ALPHA = 32, 64, 16, 0.7


def synthetic_results(path: Path) -> int:
    """A results.json as scripts/benchmark.py writes it (float32, one process, eager), its step times
    composed here from TRUE's forward times. -> the number of speculative rows."""
    rows, n = [], 0
    gmax = max(sampling.AUTO_GAMMAS)
    t = lambda cfg, B, kv, T, copies=1: sm.step_time(cfg, TRUE, B, kv, T, 4, 1, copies)
    for L in (512, 2048, 6144):
        S = stats.cache_len(L + N, gmax)
        for B in (1, 4, 16):
            t_dec = t(SMOL, B, S, 1) + TRUE.step_overhead_s
            base = {"prompt_len": L, "batch_size": B, "skipped": None, "generated_tokens": B * N}
            rows.append(base | {"method": "ar", "gamma": 0, "budget": None, "sink": None, "tokens_per_second": B / t_dec,
                                "speedup": 1.0, "decode_step_s": t_dec, "gamma_used": None})
            for method, g in (("self", 2), ("self", 4), ("self", "auto"), ("draft", 3)):
                used = {0: 10, 2: 20, 4: 30} if g == "auto" else {g: 1}
                mix = {h: k / sum(used.values()) for h, k in used.items()}
                E = sum(w * sampling.expected_tokens(ALPHA, h) for h, w in mix.items())
                dcfg, copies = (DRAFT, 1) if method == "draft" else (SMOL, 2)
                t_draft = t(dcfg, B, BUDGET, 1)
                t_ver = sum(w * t(SMOL, B, S, h + 1, copies) for h, w in mix.items())
                n_draft = sum(w * h for h, w in mix.items())
                t_drafts = n_draft * t_draft + (t(DRAFT, B, BUDGET, 2) - t_draft if method == "draft" else 0)
                t_step = t_drafts + t_ver + TRUE.step_overhead_s
                n += 1
                rows.append(base | {
                    "method": method, "gamma": g, "budget": BUDGET, "sink": SINK, "tokens_per_second": B * E / t_step,
                    "speedup": E * t_dec / t_step, "acceptance_rate": (E - 1) / n_draft, "mean_accepted": E,
                    "gamma_used": {str(h): k for h, k in used.items()} if g == "auto" else None,
                    "decode_step_s": None, "draft_forward_s": t_drafts / n_draft,
                    "verify_step_s": t_ver + TRUE.step_overhead_s, "verify_steps": N / E})
    res = {"machine": {"device": "cpu", "name": "synthetic", "cores": 2, "dtype": "float32"},
           "model": {"checkpoint": "synthetic/smol", "args": asdict(SMOL), "kv_bytes_per_token": SMOL.kv_bytes_per_token(4),
                     "draft": {"checkpoint": "synthetic/draft", "args": asdict(DRAFT)}},
           "config": {"max_new_tokens": N, "gamma": [2, 4, "auto", 3], "budget": [BUDGET], "sink": SINK,
                      "compile": False},
           "results": rows + [{"prompt_len": 512, "batch_size": 64, "method": "ar", "skipped": "needs ~9 GB"}]}
    path.write_text(json.dumps(res))
    return n


def test_compare_reads_every_row_and_sees_another_machine(tmp_path):
    f = tmp_path / "results.json"
    n = synthetic_results(f)
    out = []
    errs = sm.compare(sm.load_results(f), TRUE, out=out.append)
    assert len(errs) == n == 36  # every measured row compared (their errors are 0 by construction)
    assert out[-1].startswith("speedup: median |error|") and "of 36 rows" in out[-1]
    # another machine: the errors show
    errs = sm.compare(sm.load_results(f), replace(TRUE, bandwidth=40e9), out=lambda s: None)
    assert max(map(abs, errs)) > 0.05


def test_cli_on_results(tmp_path, capsys):
    f = tmp_path / "results.json"
    synthetic_results(f)
    code, out, _ = run_cli([str(f), "--bandwidth", "20", "--flops", "0.2", "--layer_overhead_us", "150",
                            "--step_overhead_ms", "3"], capsys)
    assert code == 0 and "speedup: median |error| 0.0%" in out and "auto 0:10,2:20,4:30" in out
    code, out, _ = run_cli([str(f), "--hw", "cpu", "--flops", "0.2"], capsys)  # one copy probe; values not checked
    assert code == 0 and "copy bandwidth probed" in out and "this machine is" in out
    # a CPU results file names no hardware numbers: they must be given
    code, out, err = run_cli([str(f)], capsys)
    assert code == 2 and err.startswith("error: no hardware numbers") and err.count("\n") == 1


def test_cli_predict(tmp_path, capsys):
    d = tmp_path / "ckpt"
    d.mkdir()
    SMOL.save(d / "config.json")
    code, out, _ = run_cli(["--model", str(d), "--hw", "h100", "--batch", "4", "64", "--length", "4096",
                            "--budget", "64"], capsys)
    assert code == 0 and out.count("tok/s") == 2 and "γ=8" in out
    code, split, _ = run_cli(["--model", "llama-3.1-8b", "--draft", "tinyllama-1.1b", "--tp", "8", "--draft_tp", "4",
                              "--length", "32000", "--batch", "64"], capsys)
    assert code == 0 and "H100" in split
    code, nosplit, _ = run_cli(["--model", "llama-3.1-8b", "--draft", "tinyllama-1.1b", "--tp", "8", "--draft_tp",
                                "4", "--length", "32000", "--batch", "64", "--no_split_kv"], capsys)
    t_dec = lambda out: float(out.splitlines()[-1].split("|")[1].split()[0])
    assert code == 0 and t_dec(nosplit) > 1.5 * t_dec(split)


@pytest.mark.parametrize("argv", [["nope.json"], ["--model", "gpt-9"], ["--model", "llama-3.1-8b", "--hw", "tpu"],
                                  ["--hw", "h100"], ["--batch", "0", "--model", "llama-3.1-8b"], ["--flops", "x"],
                                  ["--model", "llama-3.1-8b", "--hw", "cpu"], ["--alpha", "2", "--model", "tinyllama-1.1b"],
                                  ["--model", "llama-3.1-8b", "--budget", "16"]])
def test_bad_input_is_one_error_line(argv, capsys):
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)


def test_script_entry_point():
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "speedup_model.py"), "nope.json"],
                       capture_output=True, text=True, cwd="/")
    assert p.returncode == 2 and p.stderr.startswith("error: nope.json") and p.stderr.count("\n") == 1
