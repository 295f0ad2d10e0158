"""Refill (continuous batching): finished rows take the next prompt while the others go on; results
stream to JSONL, a killed run resumes, data-parallel groups share one output file."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import generate as gen
import sampling
from model import Transformer
from test_tp import CPU, run

ROOT = Path(gen.__file__).parent
LIMITS = [23, 9, 31, 14, 40, 6]  # different output lengths, none a multiple of gamma + 1


@pytest.fixture(scope="module")
def real(smol, greedy_refs):
    """The default model, six prompts, an EOS id, and each prompt's plain greedy tokens under that
    EOS and its limit: the session's reference (anchored to transformers) cut, computed once."""
    model, _ = smol
    prompts, ref64 = greedy_refs
    eos = ref64[2][LIMITS[2] // 2]  # a token the third prompt emits halfway: it ends on EOS
    refs = []
    for r, n in zip(ref64, LIMITS):
        r = r[:n]
        refs.append((r[: r.index(eos) + 1], "eos") if eos in r else (r, "length"))
    return model, prompts, eos, refs


def run_refill(model, prompts, B, **kw):
    dec = gen.Decoder(model, B, max(len(p) + n for p, n in zip(prompts, LIMITS)), max(LIMITS), **kw)
    reqs = [gen.Request(p, n, i) for i, (p, n) in enumerate(zip(prompts, LIMITS))]
    return {r.id: r for r in dec.run(reqs)}, dec


@pytest.mark.parametrize("kw", [dict(gamma=0), dict(gamma=4, budget=16, sink=4), dict(gamma="auto", budget=16, sink=4),
                                dict(gamma=3, budget=24, sink=4, draft_cache="snapkv"),
                                dict(gamma=3, draft=0), dict(gamma=2, draft=24, sink=4)],
                         ids=["plain", "self-spec", "auto", "snapkv", "draft-model", "draft-model-window"])
def test_refill_equals_each_prompt_alone(real, truncated, kw):
    """Greedy, more prompts than rows, EOS and limits ending rows mid-batch: every prompt's tokens
    under refill equal plain decoding's (a separate draft model: on its full cache, or prefilled
    straight into its window)."""
    model, prompts, eos, refs = real
    if "draft" in kw:
        kw = {k: v for k, v in kw.items() if k != "draft"} | {"draft_model": truncated(model, 8), "budget": kw["draft"]}
    out, dec = run_refill(model, prompts, 2, eos_ids=[eos], **kw)
    assert sorted(out) == list(range(len(prompts)))
    reasons = set()
    for i, p in enumerate(prompts):
        assert (out[i].tokens, out[i].finish_reason) == refs[i], i
        assert out[i].prompt_tokens == len(p) and out[i].steps >= 1
        reasons.add(refs[i][1])
    assert reasons == {"eos", "length"}
    s = dec.stats()
    assert s["prompts"] == len(prompts) and s["generated_tokens"] == sum(len(r.tokens) for r in out.values())
    if kw["gamma"]:
        assert sum(r.accepted for r in out.values()) == sum(s["drafts_accepted"])


def test_sampled_refill_is_reproducible(real):
    model, prompts, _, _ = real
    kw = dict(gamma=3, budget=32, sink=4, temperature=0.9, top_p=0.95)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        out, _ = run_refill(model, prompts, 3, **kw)
        runs.append({i: r.tokens for i, r in out.items()})
    assert runs[0] == runs[1]
    assert [len(runs[0][i]) for i in range(len(prompts))] == LIMITS


def write_prompts(path, n=7):
    words = "river stone bread lamp window garden letter mountain harbour candle".split()
    with open(path, "w") as f:
        for i in range(n):
            rec = {"text": " ".join(words[(i + j) % len(words)] for j in range(3 + i)), "id": f"doc-{i}"}
            if i % 2:
                rec["max_new_tokens"] = 5 + 3 * i
            f.write(json.dumps(rec) + "\n")


def cli(*argv, timeout=300):
    return run([sys.executable, str(ROOT / "generate.py"), *map(str, argv), *CPU], timeout)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_output_kill_and_resume(tiny_ckpt, tmp_path):
    """A run killed part-way then resumed holds every prompt exactly once, equal to an
    uninterrupted run's (greedy), with per-line max_new_tokens and ids."""
    prompts = tmp_path / "p.jsonl"
    write_prompts(prompts, 24)
    base = ["--checkpoint", tiny_ckpt, *CPU, "--prompt_file", prompts, "--batch_size", 3, "--max_new_tokens", 40,
            "--gamma", 3, "--draft_budget", 12, "--sink", 2]
    full = tmp_path / "full.jsonl"
    r = cli(*base, "--output", full)
    assert r.returncode == 0, r.stderr
    ref = {x["id"]: x for x in read_jsonl(full)}
    assert len(ref) == 24 and set(ref) == {f"doc-{i}" for i in range(24)}
    for x in ref.values():
        assert set(x) == {"id", "prompt_tokens", "tokens", "text", "finish_reason", "accepted", "steps"}
    assert [len(ref[f"doc-{i}"]["tokens"]) for i in (1, 2, 3)] == [8, 40, 14]  # per-line limits
    part = tmp_path / "part.jsonl"
    p = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), *map(str, base), "--output", str(part)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    while p.poll() is None and (not part.exists() or part.read_text().count("\n") < 5):
        time.sleep(0.05)  # no time limit: a slow machine only waits longer
    p.send_signal(signal.SIGKILL)
    p.wait()
    n_before = part.read_text().count("\n")
    assert 5 <= n_before < 24, n_before
    with open(part, "a") as f:
        f.write('{"id": "doc-23", "prompt_tok')  # as if killed mid-write
    r = cli(*base, "--output", part)
    assert r.returncode == 2 and "--resume" in r.stderr  # never appends to a file by accident
    r = cli(*base, "--output", part, "--resume")
    assert r.returncode == 0, r.stderr
    got = read_jsonl(part)
    assert sorted(x["id"] for x in got) == sorted(ref)  # every prompt exactly once
    assert all(x == ref[x["id"]] for x in got)


BAD_LINES = [  # (the second line of a prompt file, what the error line says)
    ("not json", "p.jsonl:2: not JSON"),
    ('{"txt": "hello"}', 'p.jsonl:2: expected a JSON object with a string "text" field'),
    ('{"text": "hello", "max_new_tokens": 0}', "p.jsonl:2: max_new_tokens must be an integer >= 1"),
    ('{"text": "hello", "max_new_tokens": "5"}', "p.jsonl:2: max_new_tokens must be an integer >= 1"),
    ('{"text": "' + "word " * 600 + '"}', "p.jsonl:2: a prompt of"),
    ('{"text": "hello", "id": "a"}', "p.jsonl:2: id 'a' repeats p.jsonl:1"),
]


@pytest.fixture(scope="module")
def bad_line_runs(tiny_ckpt, tmp_path_factory):
    """{case: (its run (tests/forkrun.py), its directory)} of every BAD_LINES case."""
    import forkrun

    dirs = [tmp_path_factory.mktemp("bad-line") for _ in BAD_LINES]
    for d, (line, _) in zip(dirs, BAD_LINES):
        (d / "p.jsonl").write_text('{"text": "fine", "id": "a"}\n' + line + "\n")
    runs = forkrun.run({str(i): [str(ROOT / "generate.py"), "--checkpoint", str(tiny_ckpt), *CPU, "--prompt_file",
                                 str(d / "p.jsonl"), "--output", str(d / "out.jsonl")] for i, d in enumerate(dirs)})
    return {i: (runs[str(i)], d) for i, d in enumerate(dirs)}


@pytest.mark.parametrize("case", range(len(BAD_LINES)), ids=[m for _, m in BAD_LINES])
def test_bad_lines_are_reported_before_any_work(bad_line_runs, case):
    (r, d), message = bad_line_runs[case], BAD_LINES[case][1]
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0].replace(str(d) + "/", "")
    assert not (d / "out.jsonl").exists() or not (d / "out.jsonl").read_text()


def test_unwritable_output_fails_before_the_model_loads(tiny_ckpt, tmp_path):
    f = tmp_path / "p.jsonl"
    write_prompts(f, 2)
    r = cli("--checkpoint", tiny_ckpt, "--prompt_file", f, "--output", tmp_path / "no" / "such" / "dir.jsonl")
    assert r.returncode == 2 and r.stderr.startswith("error: --output") and "cannot write" in r.stderr


def test_dp2_shares_one_output_file(tiny_ckpt, tmp_path):
    f = tmp_path / "p.jsonl"
    write_prompts(f, 9)
    argv = ["--checkpoint", tiny_ckpt, *CPU, "--prompt_file", f, "--batch_size", 4, "--max_new_tokens", 12,
            "--gamma", 2, "--draft_budget", 8, "--sink", 2]
    one = tmp_path / "one.jsonl"
    assert cli(*argv, "--output", one).returncode == 0
    two = tmp_path / "two.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "generate.py"), *map(str, argv), "--output", str(two)]
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = {x["id"]: x for x in read_jsonl(one)}
    got = read_jsonl(two)
    assert sorted(x["id"] for x in got) == sorted(ref) and all(x == ref[x["id"]] for x in got)


def test_compiled_refills_do_not_recompile(tiny_ckpt):
    """Every graph is compiled by the warm-up; refilling rows (new prompts, other lengths) reuses them.
    (The shapes of test_cli's compiled --gamma auto run, B = 2 rows of 256 slots, window 16 with 4
    sinks: Inductor's cache compiles those graphs once for both.)"""
    torch._dynamo.reset()  # (Dynamo traces again; Inductor's cache has the kernels)
    model = Transformer.from_checkpoint(tiny_ckpt, "cpu", torch.float32)
    torch.manual_seed(0)
    prompts = [torch.randint(3, 400, (n,)).tolist() for n in (5, 17, 9, 30, 3, 12, 21)]
    limits = [7, 15, 4, 11, 19, 6, 9]
    reqs = [gen.Request(p, n, i) for i, (p, n) in enumerate(zip(prompts, limits))]
    kw = dict(gamma="auto", budget=16, sink=4)
    ref = {r.id: r.tokens for r in gen.Decoder(model, 2, 142, 20, **kw).run(reqs)}
    dec = gen.Decoder(model, 2, 142, 20, compile=True, **kw)
    dec.warm_up()
    n = gen.unique_graphs()
    assert dec.compiled_graphs == len(sampling.AUTO_GAMMAS) + 1  # a verify graph per gamma + the draft step
    got = {r.id: r.tokens for r in dec.run(reqs)}
    assert gen.unique_graphs() == n and got == ref


def test_a_second_run_on_an_output_being_written_is_refused(tiny_ckpt, tmp_path, monkeypatch):
    """While a run writes --output (here in this process: the second run starts when the first has
    written its first line), another run on the same file is refused in one line naming the file
    and the running process, with or without --resume; the first run completes every prompt."""
    import os

    import cli as cli_module

    f = tmp_path / "p.jsonl"
    write_prompts(f, 6)
    out = tmp_path / "out.jsonl"
    argv = ["--checkpoint", tiny_ckpt, *CPU, "--prompt_file", f, "--batch_size", 2, "--max_new_tokens", 12,
            "--gamma", 2, "--draft_budget", 8, "--sink", 2]
    seconds = []
    update = cli_module.Progress.update

    def second_run(self, res, acceptance):
        if not seconds:
            seconds.extend([cli(*argv, "--output", out), cli(*argv, "--output", out, "--resume")])
        update(self, res, acceptance)

    monkeypatch.setattr(cli_module.Progress, "update", second_run)
    gen.main(list(map(str, argv + ["--output", out])))
    assert len(seconds) == 2
    for r in seconds:
        assert r.returncode == 2 and "Traceback" not in r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: --output {out} is being written"), r.stderr
        assert f"pid {os.getpid()}" in lines[0]
    got = read_jsonl(out)
    assert sorted(x["id"] for x in got) == [f"doc-{i}" for i in range(6)]
    assert not (tmp_path / "out.jsonl.lock").exists()
    r = cli(*argv, "--output", out, "--resume")  # the lock went with the run
    assert r.returncode == 0 and "already in" in r.stderr, r.stderr


def test_self_drafting_needs_a_window(real):
    from model import UsageError

    model, prompts, _, _ = real
    with pytest.raises(UsageError, match="self-drafting needs a window"):
        gen.Decoder(model, 2, 64, 8, gamma=2, budget=0)


@pytest.mark.parametrize("cache", ["streaming", "snapkv"])
def test_rows_refilled_together_get_their_own_caches_and_leave_the_others(tiny_ckpt, cache):
    """Rows 0 and 2 of 4 refilled in one prefill (an index tensor, not a slice): their full caches
    and draft windows (positions per KV head for snapkv) hold what a prefill of each prompt alone
    writes; rows 1 and 3 are untouched."""
    model = Transformer.from_checkpoint(tiny_ckpt, "cpu", torch.float32)
    torch.manual_seed(0)
    first = [gen.Request(torch.randint(3, 400, (n,)).tolist(), 8, i) for i, n in enumerate((30, 41, 25, 37))]
    new = [gen.Request(torch.randint(3, 400, (n,)).tolist(), 8, 9 + i) for i, n in enumerate((50, 19))]
    dec = gen.Decoder(model, 4, 64, 8, gamma=3, budget=16, sink=2, draft_cache=cache)
    with torch.no_grad():
        dec.prefill([0, 1, 2, 3], first)
        for _ in range(2):
            dec.step()
        caches = lambda: [(b.attention.kv_cache.k.clone(), b.attention.draft_cache.k.clone(),
                           b.attention.draft_cache.pos.clone()) for b in model.layers]
        before = caches()
        dec.prefill([0, 2], new)
        after = caches()
        alone = gen.Decoder(model, 1, 64, 8, gamma=3, budget=16, sink=2, draft_cache=cache)
        for row, req in zip((0, 2), new):
            alone.prefill([0], [req])
            n = len(req.tokens) - 1  # prefilled positions: all but the pending last token
            for (k, w, p), b in zip(after, model.layers):
                torch.testing.assert_close(k[row, :, :n], b.attention.kv_cache.k[0, :, :n], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(p[row], b.attention.draft_cache.pos[0])
                torch.testing.assert_close(w[row], b.attention.draft_cache.k[0], rtol=1e-5, atol=1e-5)
        for (k0, w0, p0), (k1, w1, p1) in zip(before, after):  # the other rows
            assert torch.equal(k0[[1, 3]], k1[[1, 3]]) and torch.equal(w0[[1, 3]], w1[[1, 3]])
            assert torch.equal(p0[[1, 3]], p1[[1, 3]])
    assert dec.rows.pos.tolist()[0::2] == [49, 18] and not dec.rows.done[[0, 2]].any()


def test_gamma_auto_sees_each_rows_progress_once_no_request_is_left(tiny_ckpt, monkeypatch):
    """While a request waits for a row, --gamma auto is told nothing of the rows; once none is left,
    each step it gets every live row's (tokens left, drafts accepted, rejections) as they stand."""
    model = Transformer.from_checkpoint(tiny_ckpt, "cpu", torch.float32)
    torch.manual_seed(0)
    reqs = [gen.Request(torch.randint(3, 400, (n,)).tolist(), m, i) for i, (n, m) in enumerate(((5, 4), (9, 24), (7, 30)))]
    dec = gen.Decoder(model, 2, 64, 30, gamma="auto", budget=12, sink=2)
    seen = []

    def spy(self, covered=False, lag=None):  # (a fixed plan of gammas: no clock decides)
        on = ~dec.rows.done
        now = list(zip(*((dec.limit - dec.rows.n_out)[on].tolist(), dec.row_acc[on].tolist(), dec.row_rej[on].tolist())))
        seen.append((lag, now, dec.prompts_done))
        return (0, 2, 1, 3)[len(seen) % 4]

    monkeypatch.setattr(sampling.AutoGamma, "choose", spy)
    assert sorted(r.id for r in dec.run(reqs)) == [0, 1, 2]
    assert seen[0][0] is None and seen[-1][0] is not None
    for lag, now, done in seen:
        assert (lag is None) == (done == 0)  # request 2 waits until row 0 is done
        assert lag is None or sorted(map(tuple, lag)) == sorted(now)
    assert any(r for lag, _, _ in seen if lag for _, _, r in lag)  # (rejections were counted)
