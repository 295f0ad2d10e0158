"""The generate.py command line: prompts, batching, the JSON contract, compile, bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate as gen
import sampling
from model import Transformer
from tokenizer import load_tokenizer

ROOT = Path(gen.__file__).parent
CPU = ["--device", "cpu", "--dtype", "float32"]  # what these tests expect, whatever the machine has


def cli(*argv, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_json_contract_and_prompt_sources(default_ckpt, tmp_path):
    (tmp_path / "a.txt").write_text("The river ran past the mill,\nand the miller")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "Bread is made from"}) + "\n\n"
                                      + json.dumps({"text": "The first law of motion"}) + "\n")
    out = tmp_path / "out.json"
    rows, stats = gen.main(["--checkpoint", str(default_ckpt), *CPU, "--prompt", "Tea or coffee?", "--prompt_file",
                          str(tmp_path / "a.txt"), "--prompt_file", str(tmp_path / "b.jsonl"), "--batch_size", "6",
                          "--max_new_tokens", "9", "--gamma", "3", "--draft_budget", "24", "--sink", "4",
                          "--json", str(out)])
    j = json.loads(out.read_text())
    assert set(j) == {"config", "rows", "stats"}
    for flag in ("checkpoint", "prompt", "prompt_file", "prompt_len", "batch_size", "max_new_tokens", "temperature",
                 "top_k", "top_p", "seed", "device", "dtype", "compile", "json", "draft", "draft_checkpoint",
                 "draft_budget", "sink", "draft_cache", "gamma"):
        assert flag in j["config"]
    assert j["config"]["batch_size"] == 6 and j["config"]["gamma"] == 3
    for key in ("generated_tokens", "seconds", "tokens_per_second", "end_to_end_tokens_per_second",
                "prefill_seconds", "decode_seconds",
                "bandwidth_gb_s", "verify_steps", "mean_accepted", "acceptance_rate", "acceptance_by_position",
                "draft_seconds", "verify_seconds"):
        assert key in j["stats"]
    assert len(j["stats"]["acceptance_by_position"]) == 3
    tok = load_tokenizer(default_ckpt)
    texts = ["Tea or coffee?", "The river ran past the mill,\nand the miller", "Bread is made from",
             "The first law of motion"]
    assert len(j["rows"]) == 6
    for i, r in enumerate(j["rows"]):  # rows cycle through the prompts in order
        assert set(r) == {"prompt_tokens", "tokens", "text", "finish_reason"}
        assert r["prompt_tokens"] == len(tok.encode(texts[i % 4]))
        assert r["text"] == tok.decode(r["tokens"]) and r["finish_reason"] in ("eos", "length")
        assert len(r["tokens"]) == 9 or r["finish_reason"] == "eos"
    assert j["rows"][4]["tokens"] == j["rows"][0]["tokens"]
    assert j["stats"]["generated_tokens"] == sum(len(r["tokens"]) for r in j["rows"])
    assert rows == j["rows"]


def test_prompt_len_cuts_prompts(default_ckpt):
    rows, _ = gen.main(["--checkpoint", str(default_ckpt), *CPU, "--prompt", "one two three four five six seven",
                      "--prompt_len", "4", "--max_new_tokens", "3", "--draft", "none"])
    assert rows[0]["prompt_tokens"] == 4


def test_greedy_cli_speculation_equals_plain(default_ckpt):
    argv = ["--checkpoint", str(default_ckpt), *CPU, "--prompt", "A short history of the bicycle:", "--prompt",
            "Water boils at", "--max_new_tokens", "30"]
    plain, _ = gen.main(argv + ["--draft", "none"])
    spec, stats = gen.main(argv + ["--draft_budget", "20", "--sink", "4", "--gamma", "5"])
    assert [r["tokens"] for r in spec] == [r["tokens"] for r in plain]
    assert stats["verify_steps"] < 30


def test_compile_captures_each_step_once(tiny_ckpt):
    """--compile: one graph for the draft step and one for the verify step, compiled by the warm-up
    and none while generating or on a second run (CPU inductor here; CUDA graphs on GPU)."""
    torch._dynamo.reset()
    n0 = gen.unique_graphs()
    model = Transformer.from_checkpoint(tiny_ckpt, "cpu", torch.float32)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    ref, _, st = gen.generate(model, prompts, 12, gamma=3, budget=8, sink=2)
    assert (st["compiled_graphs"], st["compile_seconds"], st["attention"]) == (0, 0.0, "sdpa")
    out, _, st = gen.generate(model, prompts, 12, gamma=3, budget=8, sink=2, compile=True)
    assert st["compiled_graphs"] == gen.unique_graphs() - n0 == 2 and st["attention"] == "flex"
    out2, _, st = gen.generate(model, prompts[::-1], 20, gamma=3, budget=8, sink=2, compile=True)
    assert st["compiled_graphs"] == 0 and gen.unique_graphs() - n0 == 2  # other rows and lengths, same shapes
    assert out == ref and out2[1][:12] == ref[0]


def test_compiled_is_keyed_by_device_type():
    """A CPU compile first must not leave a later CUDA run without CUDA graphs (and back)."""
    def step(x):
        return x + 1

    cpu = gen.compiled(step, torch.device("cpu"), 1)
    cuda = gen.compiled(step, torch.device("cuda", 0), 1)
    assert cpu is gen.compiled(step, torch.device("cpu"), 1) and cuda is not cpu
    assert {k[1:] for k in gen.compiled.fns if k[0] is step} == {("cpu", None), ("cuda", "reduce-overhead")}


@pytest.mark.parametrize("gamma", ["4", "auto"])
def test_compiled_cli_compiles_only_before_the_clock(tiny_ckpt, gamma):
    """generate.py --compile warms up on the timed run's own shapes (same cache, same S): every
    graph the run uses, each gamma --gamma auto may pick included, is compiled before timing
    starts, so Dynamo compiles nothing during the run; the tokens are the eager run's."""
    prompt = " ".join(["seven"] * 13)  # 14 tokens with the BOS-free tokenizer: + 128 new != warm-up's shapes
    argv = ["--checkpoint", str(tiny_ckpt), *CPU, "--prompt", prompt, "--prompt", "a short one", "--max_new_tokens", "128",
            "--gamma", gamma, "--draft_budget", "16", "--sink", "4"]
    eager, st = gen.main(argv)
    assert st["compiled_graphs"] == 0
    torch._dynamo.reset()
    n0 = gen.unique_graphs()
    rows, st = gen.main(argv + ["--compile"])
    assert st["compiled_graphs"] == gen.unique_graphs() - n0  # all of them before the clock
    assert st["compiled_graphs"] == (len(sampling.AUTO_GAMMAS) + 1 if gamma == "auto" else 2)
    assert st["compile_seconds"] > 0 and st["attention"] == "flex"
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in eager]


def test_a_batch_that_cannot_fit_is_refused_before_loading(default_ckpt):
    r = cli("--checkpoint", default_ckpt, "--prompt", "Hello", "--batch_size", "50000", "--max_new_tokens", "8000")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: batch 50000 needs "), r.stderr
    assert "free: the largest batch that fits is " in lines[0] and "kv cache" in lines[0]
    fit = int(lines[0].rsplit(" ", 1)[1])
    assert 0 < fit < 50000


BAD_INPUT = [  # (argv, what the error line says)
    (["--checkpoint", "/nonexistent/ckpt"], "no config.json"),
    (["--prompt", "word " * 9000], "exceeds the model's context of 8192"),
    (["--prompt", "Hello there", "--prompt_len", "50"], "--prompt_len 50: a prompt has only"),
    (["--gamma", "0"], "--gamma must be >= 1"),
    (["--gamma", "fast"], "invalid gamma 'fast'"),
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    (["--resume"], "--resume needs --output"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--top_p", "0"], "--device cuda: no CUDA device"
     if not torch.cuda.is_available() else "0 < --top_p <= 1"),
    (["--draft_budget", "8", "--sink", "16"], "--draft_budget 8"),
    (["--draft_cache", "h2o"], "argument --draft_cache: invalid choice: 'h2o'"),
    (["--draft_cache", "snapkv", "--draft_budget", "24", "--sink", "16"], "snapkv: a ring of 12 slots"),
    (["--prompt_file", "/nonexistent.jsonl"], "no such file"),
]


@pytest.fixture(scope="module")
def bad_input_runs(default_ckpt):
    """Every BAD_INPUT case run as `generate.py ARGV --max_new_tokens 4` (tests/forkrun.py)."""
    import forkrun

    return forkrun.run({str(i): [str(ROOT / "generate.py"), *argv, "--max_new_tokens", "4"]
                        for i, (argv, _) in enumerate(BAD_INPUT)})


@pytest.mark.parametrize("case", range(len(BAD_INPUT)), ids=[m for _, m in BAD_INPUT])
def test_bad_input_is_one_line(bad_input_runs, case):
    r, message = bad_input_runs[str(case)], BAD_INPUT[case][1]
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


def test_draft_with_another_vocabulary_is_refused(default_ckpt, tiny_ckpt, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_ckpt, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["vocab_size"] = 32000
    (other / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    w = load_file(other / "model.safetensors")  # a well-formed checkpoint, only its vocabulary differs
    w = {k: t[:32000].contiguous() if t.shape[0] == 49152 else t for k, t in w.items()}
    save_file(w, other / "model.safetensors")
    r = cli("--draft_checkpoint", other, "--max_new_tokens", "4")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: ") and "another vocabulary" in r.stderr
