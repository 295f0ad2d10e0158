"""Benchmark sweep: plain decoding vs self-speculation (vs a separate draft model) vs transformers.

Per (prompt length L, batch size B) one call with the largest gamma prefills the cache that later
calls reuse. Speculative configs are grouped by draft cache (method, budget); after --warmup rounds
of a group, each repeat runs plain decoding (AR) and then the group's configs: a speedup is a ratio
of runs moments apart. Rows give medians over --repeats; greedy speculative tokens must equal the AR
tokens of the same repeat (`lossless`). The peer is transformers' `generate` on the same weights,
static cache, compiled with --compile; its decode throughput is B * (N - 1) tokens over the time
from its first new token (made by its prefill) to its last, as they reach the host. Writes
results.json, results.md and two plots to --out. Exit status 1 when a float32 greedy run was not
lossless (a bug), 2 with one line `error: ...`. A GPU sweep:
  python scripts/benchmark.py --batch_size 16 64 256 --prompt_len 4096 8192 --budget 256 512 --gamma 3 auto --compile
"""
import contextlib
import gc
import io
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # runnable from any cwd

import torch
from tqdm import tqdm

import cli
import stats
from cli import ArgParser, check_same_vocab, gamma_arg, read_checkpoint, read_prompt_file, rows_of
from generate import generate
from sampling import max_gamma
from model import Transformer, UsageError
from speedup_model import cpu_name

DEFAULTS = {"batch_size": [1, 8, 32], "prompt_len": [2048, 6144], "budget": [256, 512], "gamma": [2, 4, "auto"],
            "draft_budget": [0], "sink": 16, "max_new_tokens": 64, "repeats": 3, "warmup": 1}
QUICK = {"batch_size": [1, 4], "prompt_len": [512, 1024], "budget": [64], "gamma": [2, 4, "auto"],
         "max_new_tokens": 32, "repeats": 2, "warmup": 1}
AR = ("ar", 0, None, None, None)  # a config: (method, gamma, budget, draft cache, snapkv ring slots or None)
FIELDS = ("tokens_per_second", "latency_ms", "speedup", "forward_speedup", "loop_overhead", "vs_hf",
          "acceptance_rate", "mean_accepted",
          "acceptance_by_position", "gamma_used", "lossless", "decode_step_s", "draft_forward_s", "verify_step_s",
          "compiled_graphs", "compile_seconds", "attention")


def parse_args(argv):
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    d, add = DEFAULTS, ap.add_argument
    fmt = lambda v: " ".join(map(str, v)) if isinstance(v, list) else str(v)
    add("--checkpoint", help="converted checkpoint dir (default: the built-in SmolLM2-135M)")
    add("--device", help="default: cuda when available, else cpu")
    add("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on CUDA, float32 on CPU")
    add("--compile", action="store_true", help="compile our steps (CUDA graphs on GPU) and the peer's forward")
    for k, what in (("batch_size", "rows"), ("prompt_len", "prompt tokens"), ("budget", "self-draft cache slots, "
                    "sinks included"), ("draft_budget", "window slots of --draft_checkpoint's model, 0 = full cache")):
        add(f"--{k}", type=int, nargs="+", metavar="N", help=f"{what} (default: {fmt(d[k])})")
    add("--gamma", type=gamma_arg, nargs="+", help=f"drafts per verification, >= 1 or auto ({fmt(d['gamma'])})")
    add("--draft_cache", nargs="+", choices=["streaming", "snapkv"], default=["streaming"],
        help="the self-draft's cache strategies (default: streaming)")
    add("--ring", type=float, nargs="+", metavar="F", help="snapkv: recent-ring slots as fractions of each budget "
        "(default: generate's default split)")
    for k, what in (("sink", "attention-sink slots of every draft window"), ("max_new_tokens", "tokens per row"),
                    ("repeats", "timed repeats (rows give medians)"), ("warmup", "untimed rounds per config")):
        add(f"--{k}", type=int, help=f"{what} (default: {d[k]})")
    add("--temperature", type=float, default=0.0, help="0 = greedy (default; the lossless check needs it)")
    for k, t, v in (("top_k", int, 0), ("top_p", float, 1.0), ("seed", int, 1234)):
        add(f"--{k}", type=t, default=v)
    add("--prompt_file", help=".jsonl or text file (default: data/prompts_<len>.jsonl, made when missing)")
    add("--draft_checkpoint", help="also benchmark this separate draft model (same vocabulary)")
    add("--no_hf", action="store_true", help="skip the transformers peer")
    add("--hf_model", help="the peer's weights, HF dir or .gguf (default for the built-in model: its GGUF)")
    add("--hf_max_tokens", type=int, help="skip (and report) the peer where batch * prompt_len exceeds this")
    add("--acceptance_only", action="store_true", help="time speculative runs only (an untimed AR checks them)")
    add("--out", help="output directory (default: benchmarks/<device name>)")
    add("--quick", action="store_true", help="small CPU preset: " + " ".join(
        f"--{k} {fmt(v)}" for k, v in QUICK.items()) + " (given flags win)")
    add("--no_plots", action="store_true", help="do not draw the PNG plots")
    add("--time_limit", type=float, help="seconds: do not start a shape that would end past them (judged by the "
        "slowest shape so far); the shapes left are named in a note and on stderr")
    a = ap.parse_args(argv)
    for k, v in DEFAULTS.items():
        if getattr(a, k) is None:
            setattr(a, k, QUICK.get(k, v) if a.quick else v)
    a.gamma = list(dict.fromkeys(a.gamma))
    for k in ("batch_size", "prompt_len", "budget", "draft_budget"):
        setattr(a, k, sorted(set(getattr(a, k))))
    check_args(a)
    return a


def check_args(a):
    if min(a.batch_size + a.prompt_len) < 1 or a.repeats < 1 or a.warmup < 0 or a.max_new_tokens < 2:
        raise UsageError("--batch_size, --prompt_len and --repeats must be >= 1, --warmup >= 0, --max_new_tokens >= 2 "
                         "(the peer's first token comes out of its prefill)")
    if a.temperature < 0 or not 0 < a.top_p <= 1 or a.top_k < 0 or a.sink < 0 or (a.hf_max_tokens or 1) < 1:
        raise UsageError("need --temperature >= 0, 0 < --top_p <= 1, --top_k >= 0, --sink >= 0, --hf_max_tokens >= 1")
    for g in a.gamma:
        if g != "auto" and g < 1:
            raise UsageError(f"--gamma {g}: must be >= 1 (plain decoding always runs) or auto")
    need = a.sink + max(map(max_gamma, a.gamma)) + 1  # sinks + a verify's gamma + 1 tokens
    for b in [b for b in a.budget if b < need] + [b for b in a.draft_budget if a.draft_checkpoint and 0 < b < need]:
        raise UsageError(f"--budget {b} leaves fewer than gamma+1 recent slots after --sink {a.sink}"
                         f"{' (auto may draft 6)' if 'auto' in a.gamma else ''}: need >= {need}")
    for b in a.budget if "snapkv" in a.draft_cache else []:
        for r in ring_slots(a, b):
            cli.snap_split(b, a.sink, max(map(max_gamma, a.gamma)), r)
    for flag, f in (("--prompt_file", a.prompt_file), ("--hf_model", a.hf_model)):
        if f is not None and not Path(f).exists():
            raise UsageError(f"{flag} {f}: no such file or directory")


def ring_slots(a, budget: int) -> list:
    """snapkv's ring sizes at this budget: --ring's fractions, or [None] (the default split)."""
    return [round(f * budget) for f in a.ring] if a.ring else [None]


def machine_info(device: torch.device, dtype: torch.dtype) -> dict:
    m = {"device": device.type, "name": cpu_name(), "cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)),
         "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch.")}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        m |= {"name": p.name, "gpu_memory_gb": round(p.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    if importlib.util.find_spec("transformers"):
        m["transformers"] = importlib.metadata.version("transformers")
    return m


def release():
    gc.collect()
    torch.cuda.empty_cache()  # a no-op where CUDA was never used


# ---------------------------------------------------------------------------------------- prompts
def load_prompts(a, tok) -> dict[int, list[list[int]]]:
    """{L: up to max(batch_size) distinct prompts of exactly L tokens}, from --prompt_file or else from
    scripts/prepare_data.py's data/prompts_<n>.jsonl with n >= L, smallest first (made where missing)."""
    need = max(a.batch_size)
    made = lambda: sorted((int(f.stem[8:]), f) for f in (ROOT / "data").glob("prompts_*.jsonl") if f.stem[8:].isdigit())
    if not a.prompt_file and (missing := [L for L in a.prompt_len if not any(n >= L for n, _ in made())]):
        cmd = [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "--checkpoint", str(a.checkpoint),
               "--prompt_len", *map(str, missing)]
        print(f"preparing prompts: {shlex.join(cmd[1:])}", file=sys.stderr)
        if subprocess.run(cmd).returncode != 0:
            raise UsageError("could not prepare the prompt files (see above); pass --prompt_file instead")
    files, enc, out = [(float("inf"), Path(a.prompt_file))] if a.prompt_file else made(), {}, {}
    for L in a.prompt_len:
        ok = []
        for n, f in files:
            if n >= L and len(ok) < need:
                if f not in enc:
                    enc[f] = [tok.encode(rec["text"]) for _, rec in read_prompt_file(f)[: 4 * need + 16]]
                ok += [ids[:L] for ids in enc[f] if len(ids) >= L][: need - len(ok)]
        if not ok:
            raise UsageError(f"{a.prompt_file or 'data/prompts_*.jsonl'}: no prompt has {L} tokens "
                             f"(the longest has {max((len(e) for v in enc.values() for e in v), default=0)})")
        out[L] = ok
    return out


# ---------------------------------------------------------------------------------------- the peer
def hf_source(a) -> tuple[Path | None, str | None]:
    """-> (the peer's weights, None), or (None, why the peer cannot run)."""
    from convert_checkpoint import DEFAULT_DIR, default_gguf

    if not importlib.util.find_spec("transformers"):
        return None, "transformers is not installed (bash scripts/install.sh bench)"
    if a.hf_model or Path(a.checkpoint).resolve() != DEFAULT_DIR.resolve():
        return (Path(a.hf_model), None) if a.hf_model else (None, "no transformers source for this checkpoint: "
                                                                  "pass --hf_model DIR|FILE.gguf")
    try:
        return default_gguf(), None
    except ValueError as e:
        return None, str(e)


def load_hf(source: Path, device: torch.device, dtype: torch.dtype):
    """transformers' model of the same weights (a .gguf file is dequantized by transformers)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    kw = {"gguf_file": Path(source).name} if Path(source).suffix == ".gguf" else {}
    with contextlib.redirect_stderr(io.StringIO()):  # the GGUF dequantizer draws a progress bar of its own
        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(source).parent if kw else source, dtype=dtype, **kw)
    return hf.to(device).eval()


def hf_run(hf, ids: torch.Tensor, n: int, compile: bool, sampling=(0.0, 0, 1.0), seed=0):
    """transformers' generate of exactly n tokens per row, static cache -> (new tokens, time stamps of
    the prompt and of each new token as its streamer receives them on the host)."""
    import transformers

    temperature, top_k, top_p = sampling
    kw = {"max_new_tokens": n, "min_new_tokens": n, "cache_implementation": "static",
          "max_cache_len": ids.shape[1] + n, "do_sample": temperature > 0}
    if temperature > 0:
        kw |= {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    if compile:
        cc = transformers.CompileConfig(fullgraph=False, mode="reduce-overhead" if ids.is_cuda else "default")
        cc._compile_all_devices = True  # transformers compiles only on accelerators unless told
        kw["compile_config"] = cc
    else:
        kw["disable_compile"] = True
    torch.manual_seed(seed)
    t = []
    stamps = SimpleNamespace(put=lambda tokens: t.append(time.perf_counter()), end=lambda: None)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), streamer=stamps, **kw)
    return out[:, ids.shape[1]:], t


def hf_measure(hf, prompts: list[list[int]], N: int, *, compile=False, repeats=1, warmup=1,
               sampling=(0.0, 0, 1.0), seed=0) -> dict:
    """The peer's decode throughput: per timed call, B * (N - 1) tokens over the time from its first
    new token to its last. A call in which the clock saw no time pass gives no rate but a note,
    "too short to time" (never NaN)."""
    ids = torch.tensor(prompts, device=hf.device)
    B, t0 = ids.shape[0], time.perf_counter()
    for _ in range(max(1, warmup)):
        tokens, _ = hf_run(hf, ids, N, compile, sampling, seed)
    warm, decode, prefill = time.perf_counter() - t0, [], []
    for _ in range(repeats):
        t = hf_run(hf, ids, N, compile, sampling, seed)[1]
        decode.append(t[-1] - t[1])
        prefill.append(t[1] - t[0])
    rates = [B * (N - 1) / d for d in decode if d > 0]
    tps = statistics.median(rates) if rates else None
    return {"tokens": tokens.tolist(), "tokens_per_second": tps, "latency_ms": tps and 1e3 * B / tps,
            "decode_step_s": tps and B / tps, "repeats": rates, "prefill_seconds": statistics.median(prefill),
            "warmup_seconds": warm, "note": None if len(rates) == len(decode) else
            f"{len(decode) - len(rates)} of {len(decode)} timed calls too short to time"}


# ---------------------------------------------------------------------------------------- results
def empty_row(L, B, c, sink) -> dict:
    return {"prompt_len": L, "batch_size": B, "method": c[0], "gamma": c[1], "budget": c[2], "sink": sink,
            "draft_cache": c[3], "ring": c[4],
            **dict.fromkeys(FIELDS), "repeats": [], "skipped": None}


def summarize_runs(c, runs: list[dict], ar_runs: list[dict] | None, B: int, calls: list[dict]) -> dict:
    """A row's measured fields: medians over the timed runs of config c (generate's stats), speedups
    against the AR run of the same repeat, compile counts over every call of c."""
    med = lambda f: statistics.median(f(s) for s in runs)
    row = {"tokens_per_second": med(lambda s: s["tokens_per_second"]),
           "latency_ms": med(lambda s: 1e3 * s["decode_seconds"] * B / s["generated_tokens"]),
           "repeats": [s["tokens_per_second"] for s in runs], "bandwidth_gb_s": med(lambda s: s["bandwidth_gb_s"]),
           "generated_tokens": runs[0]["generated_tokens"], "verify_steps": med(lambda s: s["verify_steps"]),
           "compiled_graphs": sum(s["compiled_graphs"] for s in calls),
           "compile_seconds": sum(s["compile_seconds"] for s in calls), "attention": calls[0]["attention"]}
    fwd = lambda s: (s["draft_seconds"] + s["verify_seconds"]) / max(s["verify_steps"], 1)  # the forwards of a step
    row["loop_overhead"] = med(lambda s: s["decode_seconds"] / max(s["draft_seconds"] + s["verify_seconds"], 1e-9) - 1)
    if ar_runs:
        row["speedup"] = statistics.median(s["tokens_per_second"] / r["tokens_per_second"]
                                           for s, r in zip(runs, ar_runs))
        # what the forwards alone predict: tokens per row per step over the forwards' time, against plain decoding's
        row["forward_speedup"] = statistics.median(s["generated_tokens"] / max(s["row_steps"], 1) * fwd(r) / fwd(s)
                                                   for s, r in zip(runs, ar_runs))
    if c[0] == "ar":
        return row | {"decode_step_s": med(lambda s: s["decode_seconds"] / s["verify_steps"])}
    m = stats.merge_stats(runs)  # the repeats' counts summed: acceptance over all of them
    row |= {k: m[k] for k in ("acceptance_rate", "mean_accepted", "acceptance_by_position")}
    row["fill_seconds"] = med(lambda s: s["prefill_seconds"])  # prefilled runs: the draft cache's fill alone
    row |= {"draft_forward_s": med(lambda s: s["draft_seconds"] / max(s["draft_forwards"], 1)),
            "verify_step_s": med(lambda s: s["verify_seconds"] / max(s["verify_steps"], 1))}
    if "gamma_used" in m:
        row["gamma_used"] = {str(g): n for g, n in m["gamma_used"].items()}
    return row


def first_difference(new, ref) -> dict | None:
    """Where greedy speculation left plain decoding (rows of N tokens each): the rows that differ and
    the first one's first differing token."""
    bad = [i for i, (x, y) in enumerate(zip(new, ref)) if x != y]
    return {"rows": bad, "first_position": next(j for j, (u, v) in enumerate(zip(new[bad[0]], ref[bad[0]]))
                                                if u != v)} if bad else None


# ---------------------------------------------------------------------------------------- the sweep
class Bench:
    def __init__(self, a, argv, device: torch.device):
        self.a, self.device, self.dtype = a, device, getattr(torch, a.dtype)
        self.command = "python scripts/benchmark.py" + (" " + shlex.join(argv) if argv else "")
        self.elem = torch.tensor([], dtype=self.dtype).element_size()
        self.results, self.notes, self.hf, self.draft = [], [], None, None
        self.cfg, self.tok = read_checkpoint(a.checkpoint)
        if a.draft_checkpoint:
            dcfg, dtok = read_checkpoint(a.draft_checkpoint)
            check_same_vocab(self.tok, self.cfg, dtok, dcfg, f"--draft_checkpoint {a.draft_checkpoint}")
        self.prompts = load_prompts(a, self.tok)
        self.model = Transformer.from_checkpoint(a.checkpoint, device, self.dtype)
        if a.draft_checkpoint:
            self.draft = Transformer.from_checkpoint(a.draft_checkpoint, device, getattr(torch, a.draft_dtype))
        self.hf_src, self.hf_skip = (None, None) if a.no_hf or a.acceptance_only else hf_source(a)
        self.notes += [f"peer skipped: {self.hf_skip}"] if self.hf_skip else []

    def groups(self) -> list[list[tuple]]:
        """The speculative configs by draft cache (method, budget, strategy, ring): a group's runs share one cache."""
        a, out = self.a, {}
        for c in [("self", g, b, k, r) for b in a.budget for k in a.draft_cache
                  for r in (ring_slots(a, b) if k == "snapkv" else [None]) for g in a.gamma] + (
                [("draft", g, b, "streaming", None) for b in a.draft_budget for g in a.gamma] if self.draft else []):
            out.setdefault((c[0], *c[2:]), []).append(c)
        return list(out.values())

    def run_ours(self, prompts, c, prefilled=True, seed=0):
        a = self.a
        kw = dict(gamma=c[1], draft_model=self.draft if c[0] == "draft" else None, budget=c[2] or 0, sink=a.sink,
                  draft_cache=c[3] or "streaming", ring=c[4],
                  temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, compile=a.compile)
        torch.manual_seed(seed)
        return generate(self.model, prompts, a.max_new_tokens, prefilled=prefilled, **kw)

    def run_shape(self, L: int, B: int, bar):
        """Prefill once; AR warm-up; then per draft-cache group: warm-up its configs, and per repeat AR
        followed by the group's configs (so every speculative run has an AR run moments before)."""
        a, N, groups = self.a, self.a.max_new_tokens, self.groups()
        specs = [c for g in groups for c in g]
        rows = {c: empty_row(L, B, c, a.sink if c[2] else None) | (
            {"draft_checkpoint": a.draft_checkpoint} if c[0] == "draft" else {})
            for c in ([] if a.acceptance_only else [AR]) + specs}
        prompts, calls, timed = rows_of(self.prompts[L], B), {}, {c: [] for c in rows}  # timed: (run, its AR, miss)

        def run(c, seed=a.seed, prefilled=True):
            bar.set_postfix_str(f"{c[0]} gamma={c[1]} budget={c[2]} {c[3] or ''}")
            new, _, st = self.run_ours(prompts, c, prefilled, seed)
            calls.setdefault(c, []).append(st)
            return new, st

        try:  # one prefill for the whole shape: a call with the largest gamma sizes the cache
            if L + N > self.cfg.max_seq_len:
                raise UsageError(f"prompt_len + max_new_tokens = {L + N} exceeds the context of {self.cfg.max_seq_len}")
            prefill_s = run(max(specs, key=lambda c: max_gamma(c[1])), prefilled=False)[1]["prefill_seconds"]
        except UsageError as e:  # or generate's memory plan refused the shape
            for r in rows.values():
                r["skipped"] = str(e)
            self.results += rows.values()
            return self.hf_row(L, B, None, str(e))
        ar_new = run(AR)[0] if a.acceptance_only and a.temperature == 0 else None  # untimed lossless reference
        for _ in range(0 if a.acceptance_only else a.warmup):
            run(AR)
        for grp in groups:
            for c in grp * a.warmup:
                run(c)
            for r in range(a.repeats):
                ar_st = None
                if not a.acceptance_only:
                    ar_new, ar_st = run(AR, a.seed + r)
                    timed[AR].append((ar_st, ar_st, None))
                for c in grp:
                    new, st = run(c, a.seed + r)
                    timed[c].append((st, ar_st, first_difference(new, ar_new) if a.temperature == 0 else None))
        for c, row in rows.items():
            ar_runs = None if a.acceptance_only else [x for _, x, _ in timed[c]]
            row |= summarize_runs(c, [s for s, _, _ in timed[c]], ar_runs, B, calls[c]) | {"prefill_seconds": prefill_s}
            bad = [m for *_, m in timed[c] if m]
            if c != AR and a.temperature == 0:
                row["lossless"] = not bad
            if bad:
                row["mismatch"] = bad[0]
                tqdm.write(f"LOSSLESS CHECK FAILED: L={L} B={B} {c}: rows {bad[0]['rows']} differ from plain "
                           f"decoding (the first from token {bad[0]['first_position']})")
        self.results += rows.values()
        self.hf_row(L, B, ar_new, ours=rows)

    def hf_row(self, L, B, ar_tokens, skip=None, ours=None):
        a = self.a
        if a.acceptance_only or a.no_hf:
            return
        row = empty_row(L, B, ("hf", None, None), None)
        self.results.append(row)
        row["skipped"] = skip or self.hf_skip or (f"batch * prompt_len = {B * L} exceeds --hf_max_tokens "
                                                  f"{a.hf_max_tokens}" if B * L > (a.hf_max_tokens or B * L) else None)
        if row["skipped"]:
            return
        for m in filter(None, (self.model, self.draft)):  # ours are done with: the peer gets the memory
            m.free_caches()
        release()
        try:  # the peer's cache and workspace, as generate plans ours
            plan = lambda b: stats.memory_plan(self.cfg, b, L + a.max_new_tokens, self.elem)
            stats.check_memory(plan, B, self.device, resident=plan(B)["weights"] if self.hf else 0)
            self.hf = self.hf or load_hf(self.hf_src, self.device, self.dtype)
            r = hf_measure(self.hf, rows_of(self.prompts[L], B), a.max_new_tokens, compile=a.compile,
                           repeats=a.repeats, warmup=a.warmup, sampling=(a.temperature, a.top_k, a.top_p), seed=a.seed)
        except UsageError as e:
            row["skipped"] = f"the peer: {e}"
        except Exception as e:  # noqa: BLE001 (a peer that cannot run is a result, not a crash)
            row["skipped"] = f"the peer failed: {type(e).__name__}: {str(e)[:200]}"
            if self.hf is None:  # it could not load: do not try again
                self.hf_skip = row["skipped"]
        release()
        if row["skipped"]:
            return
        tps = r["tokens_per_second"]
        row |= {k: r[k] for k in ("tokens_per_second", "latency_ms", "decode_step_s", "repeats", "prefill_seconds")}
        row |= {"vs_hf": 1.0 if tps else None, "hf_note": r["note"], "hf_warmup_seconds": r["warmup_seconds"]}
        if a.temperature == 0 and ar_tokens is not None and self.dtype == torch.float32:  # half precision may differ
            row["hf_agreement"] = sum(h == o for h, o in zip(r["tokens"], ar_tokens)) / len(ar_tokens)
        for o in (ours or {}).values():
            if tps and o["tokens_per_second"]:
                o["vs_hf"] = o["tokens_per_second"] / tps

    def write(self, out: Path, plots=False) -> list[str]:
        a, cfg = self.a, self.cfg
        ck = Path(a.checkpoint).resolve()  # repo-relative where it can be: results name no one's home
        model = {"checkpoint": str(ck.relative_to(ROOT) if ck.is_relative_to(ROOT) else ck), "args": asdict(cfg),
                 "param_bytes": stats.param_bytes(self.model),
                 "kv_bytes_per_token": cfg.kv_bytes_per_token(self.elem), "hf_source": self.hf_src and str(self.hf_src)}
        bad = any(r["lossless"] is False for r in self.results)
        p = {"command": self.command, "machine": machine_info(self.device, self.dtype), "model": model,
             "config": vars(a) | {"checkpoint": model["checkpoint"]}, "notes": self.notes,
             "lossless_all": None if a.temperature else not bad,
             "results": self.results}
        out.mkdir(parents=True, exist_ok=True)
        (out / ".results.json.tmp").write_text(json.dumps(p, indent=1) + "\n")
        os.replace(out / ".results.json.tmp", out / "results.json")
        (out / "results.md").write_text(markdown(p))
        return make_plots(p, out) if plots else []


# ---------------------------------------------------------------------------------------- reports
def _f(x, spec=".1f", none="–"):
    return none if x is None else format(x, spec)


def markdown(p: dict) -> str:
    m, c = p["machine"], p["config"]
    gpu = f" ({m.get('gpu_memory_gb')} GB), CPU {m['cpu']}" if m["device"] == "cuda" else ""
    peer = f", transformers {m['transformers']}" if m.get("transformers") else ""
    lines = ["# magicdec benchmark", "",
             f"- machine: {m['device']}: {m['name']}{gpu} ({m['cores']} cores); torch {m['torch']}{peer}; {m['dtype']}",
             f"- command: `{p['command']}`",
             f"- model: `{p['model']['checkpoint']}` ({p['model']['param_bytes'] / 1e6:.0f} MB of weights, "
             f"{p['model']['kv_bytes_per_token'] / 1e3:.1f} KB of KV per token)",
             f"- {c['max_new_tokens']} new tokens per row, temperature {c['temperature']}, sink {c['sink']}, "
             f"{c['repeats']} repeats (medians), {c['warmup']} warm-up round(s), compile {c['compile']}"]
    lines += [f"- note: {n}" for n in p["notes"]]
    if p["lossless_all"] is False:
        lines += ["", "**LOSSLESS CHECK FAILED: some greedy speculative runs differ from plain decoding (NO below).**"]
    lines += ["", "tok/s: decode throughput over the batch; speedup: vs plain decoding (AR) in the same repeat; "
                  "from forwards: the speedup the draft and verify forwards alone predict (tokens per step over their "
                  "time, against AR's forward); loop: the run's decode time beyond its forwards; "
                  "vs HF: vs transformers generate (static cache); latency: ms per token of one row; "
                  "acceptance: accepted / proposed drafts; mean acc.: tokens per row per verify step.", "",
              "| length | batch | method | gamma | budget | tok/s | speedup vs AR | from forwards | loop | vs HF "
              "| latency ms/token | acceptance | mean acc. | lossless | notes |", "|---:|---:|---|---|---:" + "|---:" * 8
              + "|---|---|"]
    for r in p["results"]:
        notes = [f"skipped: {r['skipped']}"] if r["skipped"] else []
        if r.get("hf_agreement") is not None:
            notes.append(f"same tokens as ours in {r['hf_agreement']:.0%} of rows")
        notes += [r["hf_note"]] if r.get("hf_note") else []
        if r["gamma_used"]:
            notes.append("gamma used " + " ".join(f"{g}:{n}" for g, n in r["gamma_used"].items()))
        if r["compiled_graphs"]:
            notes.append(f"compiled {r['compiled_graphs']} graphs in {r['compile_seconds']:.0f} s")
        if r.get("fill_seconds") is not None:
            notes.append(f"draft fill {r['fill_seconds']:.2f} s")
        lossless = {True: "yes", False: "**NO**", None: ""}[r["lossless"]]
        method = r["method"] + (f" {r['draft_cache']}" if r.get("draft_cache") == "snapkv" else "") + (
            f" ring {r['ring']}" if r.get("ring") else "")
        lines.append(
            f"| {r['prompt_len']} | {r['batch_size']} | {method} | {_f(r['gamma'], '', '')} | "
            f"{_f(r['budget'], '', '')} | {_f(r['tokens_per_second'])} | {_f(r['speedup'], '.2f')} | "
            f"{_f(r['forward_speedup'], '.2f')} | {_f(r['loop_overhead'] and 100 * r['loop_overhead'], '.1f')}"
            f"{'%' if r['loop_overhead'] is not None else ''} | "
            f"{_f(r['vs_hf'], '.2f')} | {_f(r['latency_ms'])} | {_f(r['acceptance_rate'], '.2f')} | "
            f"{_f(r['mean_accepted'], '.2f')} | {lossless} | {'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


def make_plots(p: dict, out: Path) -> list[str]:
    """speedup_vs_batch.png (the best speculative config per shape) and throughput_vs_latency.png
    (AR, the best speculative config, the peer): a line per prompt length and kind."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (bash scripts/install.sh bench): plots skipped", file=sys.stderr)
        return []
    kinds = {"ar": "AR", "self": "self-speculation", "draft": "draft model", "hf": "transformers"}
    best = {}  # (L, kind, B) -> the fastest row
    for r in sorted((r for r in p["results"] if r["latency_ms"]), key=lambda r: r["tokens_per_second"]):
        best[r["prompt_len"], kinds[r["method"]], r["batch_size"]] = r
    figs = {f: plt.subplots(figsize=(7, 4.5)) for f in ("speedup_vs_batch.png", "throughput_vs_latency.png")}
    (_, ax1), (_, ax2) = figs.values()
    for L, kind in sorted({k[:2] for k in best}):
        pts = [best[k] for k in sorted(best) if k[:2] == (L, kind)]
        ax2.plot([r["latency_ms"] for r in pts], [r["tokens_per_second"] for r in pts], "o-", label=f"L={L} {kind}")
        if sp := [r for r in pts if r["method"] in ("self", "draft") and r["speedup"] is not None]:
            ax1.plot([r["batch_size"] for r in sp], [r["speedup"] for r in sp], "o-", label=f"L={L} {kind}")
        for r in sp:
            ax1.annotate(f"γ{r['gamma']} b{r['budget']}", (r["batch_size"], r["speedup"]), fontsize=7)
    ax1.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax1.set_xscale("log", base=2)
    ax1.set(xlabel="batch size", ylabel="speedup vs plain decoding (best config)")
    ax2.set(xlabel="latency (ms per token of one row)", ylabel="throughput (tokens/s)")
    for name, (fig, ax) in figs.items():
        ax.set_title(f"{Path(p['model']['checkpoint']).name}, {p['machine']['name']}, {p['machine']['dtype']}",
                     fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
    return list(figs)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    try:
        device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise UsageError(f"--device {a.device}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device here")
    if a.checkpoint is None:
        from convert_checkpoint import default_checkpoint

        try:
            a.checkpoint = str(default_checkpoint())
        except ValueError as e:
            raise UsageError(f"default checkpoint: {e}") from None
    # as generate.py: --dtype, else each model's default (bfloat16 on CUDA and for a quantized model)
    a.draft_dtype = a.draft_checkpoint and str(cli.dtype_of(a, device, read_checkpoint(a.draft_checkpoint)[0]))[6:]
    a.device, a.dtype = str(device), str(cli.dtype_of(a, device, read_checkpoint(a.checkpoint)[0]))[6:]
    bench, t0 = Bench(a, argv, device), time.perf_counter()
    name = re.sub(r"[^a-z0-9]+", "-", machine_info(device, bench.dtype)["name"].lower()).strip("-") or "device"
    out = Path(a.out or ROOT / "benchmarks" / name)
    a.out = str(out)
    slowest, left = 0.0, []
    with tqdm(total=len(a.prompt_len) * len(a.batch_size), unit="shape", file=sys.stderr, dynamic_ncols=True) as bar:
        for L in a.prompt_len:
            for B in a.batch_size:
                if a.time_limit and time.perf_counter() - t0 + slowest > a.time_limit:
                    left.append(f"L={L} B={B}")
                    continue
                bar.set_description(f"L={L} B={B}")
                ts = time.perf_counter()
                bench.run_shape(L, B, bar)
                slowest = max(slowest, time.perf_counter() - ts)
                bench.write(out)  # what an interrupted sweep finished survives
                bar.update()
    if left:
        bench.notes.append(f"not run within --time_limit {a.time_limit:g} s: {', '.join(left)}")
        print(f"note: not run within --time_limit {a.time_limit:g} s: {', '.join(left)}", file=sys.stderr)
    bench.notes.append(f"sweep wall time {time.perf_counter() - t0:.0f} s")
    plots = bench.write(out, plots=not a.no_plots)
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}" + "".join(f", {out / f}" for f in plots),
          file=sys.stderr)
    bad = sum(r["lossless"] is False for r in bench.results)
    if bad:  # in half precision the [B, 1] and [B, g + 1] forwards may round a near-tie differently
        print(f"LOSSLESS CHECK FAILED in {bad} configs (see results.md)" + ("" if a.dtype == "float32" else
              f"; in {a.dtype} a near-tie can flip an argmax: rerun in float32 to tell that from a bug"),
              file=sys.stderr)
    return 1 if bad and a.dtype == "float32" else 0


if __name__ == "__main__":
    cli.run(main)
