"""Benchmark sweep: plain decoding vs self-speculation (vs a separate draft model) vs Hugging Face.

For every (prompt length L, batch size B) the target's cache is prefilled ONCE (a first, untimed
speculative call); every timed run after that reuses it (`generate(..., prefilled=True)`). The
speculative configs are grouped by draft window (method, budget): after --warmup untimed rounds of a
group, each repeat runs plain decoding (AR) and the group's configs back to back (AR, spec 1,
spec 2, ..., AR, spec 1, ...), so a speedup is always a ratio of runs taken moments apart, and a
window is never reallocated between timed runs (CUDA graphs would re-record inside the timing).
The table reports medians over --repeats (the AR row: over all its runs). Greedy speculative tokens
are checked against the AR tokens of the same repeat (`lossless`).

The peer is transformers' `generate` on the same weights (the default model: its source GGUF;
another checkpoint: --hf_model), same prompts and batch, greedy, static cache, compiled where that
helps. Its decode throughput is B * (N - 1) / (T(N) - T(1)), T(n) the wall time of
`generate(max_new_tokens=n, min_new_tokens=n)` (both include the prefill).

Outputs in --out (default benchmarks/<device name>): results.json, results.md, and the plots
speedup_vs_batch.png and throughput_vs_latency.png (need matplotlib).

Usage:
  python scripts/benchmark.py --quick                          # small CPU sweep (a few minutes)
  python scripts/benchmark.py --batch_size 1 8 32 --prompt_len 2048 6144 --budget 256 512 \\
      --gamma 2 4 auto --compile                               # the GPU sweep
  python scripts/benchmark.py --acceptance_only --batch_size 8 --prompt_len 1024 4096 7168 --budget 64 256

Exit status: 0; 1 when a float32 greedy run was not lossless (a bug: everything is still written);
2 with one line `error: ...` for bad flags or missing files.
"""
import argparse
import contextlib
import gc
import io
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # runnable from any cwd

import torch

import generate as G
from model import ModelArgs, Transformer
from speedup_model import cpu_name
from speedup_model import kv_bytes_per_token as kv_bytes  # K and V bytes of one token, all layers

PREPARED_LENS = [1024, 2048, 4096, 7168]  # what scripts/prepare_data.py writes by default
DEFAULTS = {"batch_size": [1, 8, 32], "prompt_len": [2048, 6144], "budget": [256, 512], "gamma": [2, 4, "auto"],
            "draft_budget": [0], "sink": 16, "max_new_tokens": 64, "repeats": 3, "warmup": 1}
QUICK = {"batch_size": [1, 4], "prompt_len": [512, 1024], "budget": [64], "gamma": [2, 4, "auto"],
         "max_new_tokens": 32, "repeats": 2, "warmup": 1}
HF_CPU_COMPILE_BUDGET = 90.0  # seconds of HF compile warm-up on CPU before falling back to eager
MEM_FRACTION = 0.85  # of the free memory a shape may plan to use


class BenchError(Exception):
    """A user-facing error: one line `error: ...`, exit status 2."""


# ------------------------------------------------------------------------------------------ flags
class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise BenchError(message)


def _gamma(v: str):
    if v == "auto":
        return v
    try:
        g = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid gamma {v!r} (an integer >= 1 or auto)") from None
    if g < 1:
        raise argparse.ArgumentTypeError(f"gamma {g}: must be >= 1 (plain decoding is always run) or auto")
    return g


def parse_args(argv=None):
    ap = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                 epilog="See the docstring of scripts/benchmark.py for the protocol and the outputs.")
    d = DEFAULTS
    ap.add_argument("--checkpoint", help="converted checkpoint dir (default: the built-in SmolLM2-135M)")
    ap.add_argument("--device", help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--compile", action="store_true", help="compile our draft/verify steps (CUDA graphs on GPU)")
    ap.add_argument("--batch_size", type=int, nargs="+", metavar="B", help=f"default: {_fmt(d['batch_size'])}")
    ap.add_argument("--prompt_len", type=int, nargs="+", metavar="L", help=f"default: {_fmt(d['prompt_len'])}")
    ap.add_argument("--budget", type=int, nargs="+", metavar="N",
                    help=f"self-draft window slots, sinks included (default: {_fmt(d['budget'])})")
    ap.add_argument("--gamma", type=_gamma, nargs="+", metavar="G",
                    help="drafts per verification: integers and/or auto (default: 2 4 auto)")
    ap.add_argument("--sink", type=int, help=f"attention-sink slots of every window (default: {d['sink']})")
    ap.add_argument("--max_new_tokens", type=int, help=f"tokens per row, exactly (default: {d['max_new_tokens']})")
    ap.add_argument("--repeats", type=int, help=f"timed repeats; medians are reported (default: {d['repeats']})")
    ap.add_argument("--warmup", type=int, help=f"untimed rounds of every config per shape (default: {d['warmup']})")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0 = greedy (default; needed for the lossless check)")
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--prompt_file", help=".jsonl (field text, one prompt a line) or .txt (one prompt); default: "
                                          "data/prompts_<len>.jsonl, made by scripts/prepare_data.py when missing")
    ap.add_argument("--draft_checkpoint", help="also benchmark this separate draft model (same vocabulary)")
    ap.add_argument("--draft_budget", type=int, nargs="+", metavar="N",
                    help="window slots of the separate draft model; 0 = its full cache (default: 0)")
    ap.add_argument("--no_hf", action="store_true", help="skip the Hugging Face transformers peer")
    ap.add_argument("--hf_model", help="the peer's weights: HF model dir or .gguf file (default for the built-in "
                                       "model: its source GGUF; other checkpoints need this flag)")
    ap.add_argument("--hf_max_tokens", type=int, help="skip (and report) the peer when batch * prompt_len exceeds this")
    ap.add_argument("--hf_compile", choices=["auto", "on", "off"], default="auto",
                    help="compile the peer's forward. auto: on CUDA; on CPU compiled and eager are compared on the "
                         "first shape and compiling goes on only if it was faster and its compile time stays "
                         "within --hf_compile_budget")
    ap.add_argument("--hf_compile_budget", type=float, default=HF_CPU_COMPILE_BUDGET,
                    help=f"CPU, --hf_compile auto: seconds of compiling the peer may take in all "
                         f"(default {HF_CPU_COMPILE_BUDGET:g})")
    ap.add_argument("--acceptance_only", action="store_true",
                    help="time speculative runs only (acceptance tables): no AR/HF timing; one untimed AR run per "
                         "shape still checks losslessness")
    ap.add_argument("--out", help="output directory (default: benchmarks/<device name>)")
    ap.add_argument("--quick", action="store_true",
                    help="small CPU-friendly preset: " + " ".join(f"--{k} {_fmt(v)}" for k, v in QUICK.items())
                         + " (flags given explicitly win)")
    ap.add_argument("--no_plots", action="store_true", help="do not draw the PNG plots")
    a = ap.parse_args(argv)
    for k, v in DEFAULTS.items():
        if getattr(a, k) is None:
            setattr(a, k, QUICK[k] if a.quick and k in QUICK else v)
    a.gamma = list(dict.fromkeys(a.gamma))
    for k in ("batch_size", "prompt_len", "budget", "draft_budget"):
        setattr(a, k, sorted(set(getattr(a, k))))
    check_args(a)
    return a


def _fmt(v):
    return " ".join(map(str, v)) if isinstance(v, list) else str(v)


def check_args(a):
    if min(a.batch_size) < 1 or min(a.prompt_len) < 1:
        raise BenchError("--batch_size and --prompt_len must be >= 1")
    if a.max_new_tokens < 2:
        raise BenchError("--max_new_tokens must be >= 2 (the peer's decode time is T(N) - T(1))")
    if a.repeats < 1 or a.warmup < 0:
        raise BenchError("--repeats must be >= 1 and --warmup >= 0")
    if a.temperature < 0 or not 0 < a.top_p <= 1 or a.top_k < 0:
        raise BenchError("need --temperature >= 0, 0 < --top_p <= 1, --top_k >= 0")
    if a.sink < 0:
        raise BenchError("--sink must be >= 0")
    if a.hf_max_tokens is not None and a.hf_max_tokens < 1:
        raise BenchError("--hf_max_tokens must be >= 1")
    gmax = max_gamma(a.gamma)
    for b in a.budget:
        if b - a.sink < gmax + 1:
            raise BenchError(f"--budget {b} leaves fewer than gamma+1 = {gmax + 1} recent slots after --sink {a.sink}"
                             f"{' (auto may draft 6)' if 'auto' in a.gamma else ''}: need >= {a.sink + gmax + 1}")
    if a.draft_checkpoint:
        for b in a.draft_budget:
            if b < 0 or (b and b - a.sink < gmax + 1):
                raise BenchError(f"--draft_budget {b}: need 0 (full cache) or >= {a.sink + gmax + 1}")
    for f, what in ((a.checkpoint, "--checkpoint"), (a.draft_checkpoint, "--draft_checkpoint")):
        if f is not None and not (Path(f) / "config.json").is_file():
            raise BenchError(f"{what} {f}: no config.json there (make one with convert_checkpoint.py)")
    if a.prompt_file is not None and not Path(a.prompt_file).is_file():
        raise BenchError(f"--prompt_file {a.prompt_file}: no such file")
    if a.hf_model is not None and not Path(a.hf_model).exists():
        raise BenchError(f"--hf_model {a.hf_model}: no such file or directory")


def max_gamma(gammas) -> int:
    return max([g for g in gammas if g != "auto"] + ([max(G.AUTO_GAMMAS)] if "auto" in gammas else []))


# ---------------------------------------------------------------------------------------- machine
def machine_info(device: torch.device, dtype: torch.dtype) -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    m = {"device": device.type, "name": cpu_name(), "cores": cores, "torch": torch.__version__,
         "dtype": str(dtype).replace("torch.", ""), "cpu": cpu_name(), "threads": torch.get_num_threads(),
         "python": platform.python_version()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        m |= {"name": p.name, "gpu_memory_gb": round(p.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    try:
        import transformers

        m["transformers"] = transformers.__version__
    except ImportError:
        pass
    return m


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def available_memory(device: torch.device) -> int:
    """Bytes a new allocation may take: free GPU memory (plus what torch's allocator holds unused),
    or the kernel's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not skip


def ours_bytes(cfg: ModelArgs, elem: int, B: int, S: int, window: int, dcfg: ModelArgs | None) -> int:
    """A generous estimate of what one shape allocates: full caches, the largest window, a prefill
    chunk's attention scores and activations, the verify logits; a draft model's own caches."""
    chunk = max(1, min(512, G.PREFILL_TOKENS // B))
    n = kv_bytes(cfg, elem) * B * (S + window)
    n += 2 * B * cfg.n_heads * chunk * S * max(elem, 4)  # scores + probabilities of a prefill chunk
    n += B * chunk * (6 * cfg.dim + 3 * cfg.intermediate_size) * elem
    n += 3 * B * (max(G.AUTO_GAMMAS) + 2) * cfg.vocab_size * 4  # logits, probabilities
    if dcfg is not None:
        n += kv_bytes(dcfg, elem) * B * (S + window)
    return n


def hf_bytes(cfg: ModelArgs, elem: int, B: int, L: int, N: int, device: torch.device) -> int:
    """The peer prefills the whole prompt in one forward: its static cache, a [B, 1, L, L + N] mask
    and the activations (SDPA does not materialize the scores: measured on CPU, B=4, L=4096)."""
    S = L + N
    n = kv_bytes(cfg, elem) * B * S + B * L * S * elem + B * L * (6 * cfg.dim + 3 * cfg.intermediate_size) * elem
    return n + 2 * B * cfg.vocab_size * 4


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def free_caches(model, device):
    for b in model.layers:
        b.attention.window = None
        b.attention.kv_cache = None
    model.max_batch_size = model.max_seq_len = -1
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def raise_recompile_limits():
    """Each (batch, cache size, gamma, window) is its own graph (dynamic=False): a sweep needs many
    more than dynamo's default of 8 per function, past which it silently runs eager."""
    import torch._dynamo.config as dc

    for name, n in (("recompile_limit", 4096), ("cache_size_limit", 4096),
                    ("accumulated_recompile_limit", 65536), ("accumulated_cache_size_limit", 65536)):
        if hasattr(dc, name) and getattr(dc, name) < n:
            setattr(dc, name, n)


# ---------------------------------------------------------------------------------------- prompts
def _texts_of(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    t = json.loads(line)["text"]
                    if not isinstance(t, str):
                        raise TypeError
                except (ValueError, KeyError, TypeError):
                    raise BenchError(f'{path}:{i + 1}: expected a JSON object with a string "text" field') from None
                texts.append(t)
        return texts
    return [path.read_text(encoding="utf-8")]


def _prepared_files(data: Path) -> list[tuple[int, Path]]:
    out = []
    for p in data.glob("prompts_*.jsonl"):
        m = re.fullmatch(r"prompts_(\d+)\.jsonl", p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def prepare_prompt_files(lens: list[int], checkpoint: str, data: Path):
    """Run scripts/prepare_data.py for the lengths no prepared file covers."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "scripts" / "prepare_data.py")
    pd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pd)
    argv = ["--checkpoint", str(checkpoint), "--prompt_len", *map(str, lens)]
    if data.resolve() != (ROOT / "data").resolve():
        argv += ["--out", str(data / "prompts_{len}.jsonl")]
    print(f"preparing prompts: python scripts/prepare_data.py {shlex.join(argv)}", file=sys.stderr)
    if pd.main(argv) != 0:
        raise BenchError("could not prepare the prompt files (see above); pass --prompt_file instead")


def load_prompts(a, tok, data: Path = ROOT / "data") -> dict[int, list[list[int]]]:
    """{L: up to max(batch_size) distinct prompts of exactly L tokens}. Default source: the smallest
    prepared file of at least L tokens (longer ones cut with the tokenizer), then larger files."""
    need = max(a.batch_size)
    out = {}
    if a.prompt_file:
        texts = _texts_of(Path(a.prompt_file))
        enc = [tok.encode(t) for t in texts[: max(need * 4, need + 16)]]
        for L in a.prompt_len:
            ok = [ids[:L] for ids in enc if len(ids) >= L][:need]
            if not ok:
                longest = max((len(e) for e in enc), default=0)
                raise BenchError(f"--prompt_file {a.prompt_file}: no prompt has {L} tokens (the longest has {longest})")
            out[L] = ok
        return out
    missing = [L for L in a.prompt_len if not any(n >= L for n, _ in _prepared_files(data))]
    if missing:
        lens = PREPARED_LENS if max(missing) <= max(PREPARED_LENS) else sorted(set(PREPARED_LENS + missing))
        prepare_prompt_files([n for n in lens if n not in dict(_prepared_files(data))], a.checkpoint, data)
    files = _prepared_files(data)
    cache = {}
    for L in a.prompt_len:
        ok = []
        for n, p in files:
            if n < L:
                continue
            if p not in cache:
                cache[p] = [tok.encode(t) for t in _texts_of(p)[: need + 8]]
            ok += [ids[:L] for ids in cache[p] if len(ids) >= L][: need - len(ok)]
            if len(ok) >= need:
                break
        if not ok:
            raise BenchError(f"no prepared prompt has {L} tokens under this tokenizer; "
                             f"run scripts/prepare_data.py --prompt_len {L} or pass --prompt_file")
        out[L] = ok
    return out


def batch_of(prompts: list[list[int]], B: int) -> list[list[int]]:
    return [prompts[i % len(prompts)] for i in range(B)]


# ---------------------------------------------------------------------------------------- the peer
def hf_source(a) -> Path | None:
    if a.hf_model:
        return Path(a.hf_model)
    from convert_checkpoint import DEFAULT_DIR, default_gguf

    if Path(a.checkpoint).resolve() == Path(DEFAULT_DIR).resolve():
        return default_gguf()
    return None


def load_hf(source: Path, device: torch.device, dtype: torch.dtype):
    """transformers' model for the same weights (a .gguf file is dequantized by transformers)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    source = Path(source)
    kw = {"gguf_file": source.name} if source.suffix == ".gguf" else {}
    where = source.parent if source.suffix == ".gguf" else source
    buf = io.StringIO()  # the GGUF dequantizer draws a tqdm bar of its own
    try:
        with contextlib.redirect_stderr(buf):
            model = transformers.AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw)
    except Exception:
        sys.stderr.write(buf.getvalue())
        raise
    return model.to(device).eval()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_generate(hf, ids: torch.Tensor, n: int, cache_len: int, compiled: bool, sampling=(0.0, 0, 1.0), seed=0):
    """-> (seconds, new tokens [B, n]). Static cache of `cache_len` slots (the same for T(N) and
    T(1), so the compiled forward sees one cache shape); never stops before n tokens."""
    import transformers

    temperature, top_k, top_p = sampling
    kw = {"max_new_tokens": n, "min_new_tokens": n, "cache_implementation": "static"}
    if hasattr(transformers.GenerationConfig(), "max_cache_len"):
        kw["max_cache_len"] = cache_len
    if temperature > 0:
        kw |= {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    else:
        kw["do_sample"] = False
    if compiled:
        cc = transformers.CompileConfig(fullgraph=False, mode="reduce-overhead" if ids.is_cuda else "default")
        if not ids.is_cuda:
            cc._compile_all_devices = True  # transformers compiles only on accelerators unless told
        kw["compile_config"] = cc
    else:
        kw["disable_compile"] = True
    gc_ = hf.generation_config
    pad = gc_.pad_token_id if gc_.pad_token_id is not None else gc_.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    torch.manual_seed(seed)
    _sync(ids.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=pad, **kw)
    _sync(ids.device)
    return time.perf_counter() - t0, out[:, ids.shape[1]:]


def hf_measure(hf, prompts: list[list[int]], N: int, *, modes=("eager",), repeats=1, warmup=1,
               sampling=(0.0, 0, 1.0), seed=0, tick=lambda what: None) -> dict:
    """Decode throughput of transformers' generate: per repeat T_mode(N) for each mode and one T(1)
    (the prefill, eager in either mode), decode = T(N) - T(1) for B * (N - 1) tokens.
    -> {mode: {tokens_per_second, latency_ms, decode_step_s, repeats, compile_seconds, tokens}
        or {error}}; a mode that raises is reported, not fatal."""
    device = hf.device
    ids = torch.tensor(prompts, device=device)
    B, L = ids.shape
    res = {m: {"compile_seconds": None, "repeats": [], "t_n": [], "tokens": None} for m in modes}
    live = list(modes)
    for m in modes:  # warm-up (and compile) each mode once at least
        try:
            t0 = time.perf_counter()
            for i in range(max(1, warmup)):
                _, tokens = hf_generate(hf, ids, N, L + N, m == "compiled", sampling, seed)
                tick(f"hf {m} warm-up")
                if i == 0 and m == "compiled":
                    res[m]["compile_seconds"] = time.perf_counter() - t0
            res[m]["tokens"] = tokens.tolist()
        except Exception as e:  # noqa: BLE001 (a peer that cannot run is a result, not a crash)
            res[m] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
            live.remove(m)
    if not live:
        return res
    t1s = []
    for r in range(repeats):
        for m in live:
            t, _ = hf_generate(hf, ids, N, L + N, m == "compiled", sampling, seed)
            res[m]["t_n"].append(t)
            tick(f"hf {m}")
        t1, _ = hf_generate(hf, ids, 1, L + N, False, sampling, seed)
        t1s.append(t1)
        for m in live:
            dt = res[m]["t_n"][-1] - t1
            res[m]["repeats"].append(B * (N - 1) / dt if dt > 0 else float("nan"))
    for m in live:
        decode = statistics.median(res[m]["t_n"]) - statistics.median(t1s)
        tps = statistics.median(res[m]["repeats"])
        res[m] |= {"tokens_per_second": tps, "decode_seconds": decode,
                   "latency_ms": 1e3 * B / tps if tps > 0 else None,
                   "decode_step_s": B / tps if tps > 0 else None,
                   "prefill_seconds": statistics.median(t1s)}
    return res


# ---------------------------------------------------------------------------------------- our runs
def run_ours(model, prompts, N, cfg, a, draft_model, prefilled=True, seed=None):
    method, gamma, budget = cfg
    torch.manual_seed(a.seed if seed is None else seed)
    new, _, stats = G.generate(
        model, prompts, N, gamma=gamma, draft_model=draft_model if method == "draft" else None,
        budget=budget if budget is not None else 0, sink=a.sink, temperature=a.temperature, top_k=a.top_k,
        top_p=a.top_p, eos_ids=(), compile=a.compile, prefilled=prefilled)
    return new, stats


def label(c) -> str:
    return "ar" if c[0] == "ar" else f"{c[0]} g={c[1]} b={c[2]}"


def first_gamma(gammas):
    """The first (prefilling) call must size the cache for every later call's largest gamma."""
    ints = [g for g in gammas if g != "auto"]
    if "auto" in gammas and (not ints or max(ints) <= max(G.AUTO_GAMMAS)):
        return "auto"
    return max(ints)


def mismatch(spec, ar) -> dict | None:
    bad = [i for i, (s, r) in enumerate(zip(spec, ar)) if s != r]
    if not bad:
        return None
    i = bad[0]
    first = next((j for j, (x, y) in enumerate(zip(spec[i], ar[i])) if x != y), min(len(spec[i]), len(ar[i])))
    return {"rows": bad, "first_row": i, "first_position": first}


def summarize_runs(method, gamma, budget, sink, runs: list[dict], ar_runs: list[dict] | None, B: int) -> dict:
    """One results row from the timed repeats of one config (runs: generate's stats)."""
    tps = [s["tokens_per_second"] for s in runs]
    lat = [1e3 * s["decode_seconds"] / (s["generated_tokens"] / B) for s in runs]
    row = empty_row(None, B, method, gamma, budget, sink)
    row |= {"tokens_per_second": statistics.median(tps), "latency_ms": statistics.median(lat), "repeats": tps,
            "latency_repeats": lat, "bandwidth_gb_s": statistics.median(s["bandwidth_gb_s"] for s in runs),
            "generated_tokens": runs[0]["generated_tokens"],
            "verify_steps": statistics.median(s["verify_steps"] for s in runs)}
    if ar_runs:
        sp = [s["tokens_per_second"] / r["tokens_per_second"] for s, r in zip(runs, ar_runs)]
        row["speedup"] = statistics.median(sp)
        row["speedup_repeats"] = sp
    if method == "ar":
        row["decode_step_s"] = statistics.median(s["decode_seconds"] / s["verify_steps"] for s in runs)
        row["speedup"] = 1.0 if ar_runs else None
        return row
    tried = [sum(x) for x in zip(*(s["drafts_tried"] for s in runs))]
    passed = [sum(x) for x in zip(*(s["drafts_accepted"] for s in runs))]
    proposed = sum(s["drafts_proposed"] for s in runs)
    row |= {
        "acceptance_rate": sum(passed) / max(proposed, 1),
        "mean_accepted": sum(s["generated_tokens"] for s in runs) / max(sum(s["row_steps"] for s in runs), 1),
        "acceptance_by_position": [p / max(t, 1) for p, t in zip(passed, tried)],
        "draft_forward_s": statistics.median(s["draft_seconds"] / max(s["draft_forwards"], 1) for s in runs),
        "verify_step_s": statistics.median(s["verify_seconds"] / max(s["verify_steps"], 1) for s in runs),
    }
    if gamma == "auto":
        used = {}
        for s in runs:
            for g, n in s.get("gamma_used", {}).items():
                used[g] = used.get(g, 0) + n
        row["gamma_used"] = {str(g): n for g, n in sorted(used.items())}
    return row


def empty_row(L, B, method, gamma, budget, sink, skipped=None) -> dict:
    return {"prompt_len": L, "batch_size": B, "method": method, "gamma": gamma, "budget": budget, "sink": sink,
            "tokens_per_second": None, "latency_ms": None, "speedup": None, "vs_hf": None,
            "acceptance_rate": None, "mean_accepted": None, "acceptance_by_position": None, "gamma_used": None,
            "lossless": None, "decode_step_s": None, "draft_forward_s": None, "verify_step_s": None,
            "repeats": [], "skipped": skipped}


# ---------------------------------------------------------------------------------------- progress
class Progress:
    def __init__(self, total: int):
        self.total, self.done, self.t0 = max(total, 1), 0, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def tick(self, what: str, n: int = 1):
        self.done = min(self.done + n, self.total)
        el = time.perf_counter() - self.t0
        eta = el / self.done * (self.total - self.done) if self.done else 0
        line = f"[{self.done}/{self.total}] {what} | elapsed {_hms(el)} | ETA {_hms(eta)}"
        if self.tty:
            print("\r\033[K" + line, end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def note(self, msg: str):
        print(("\n" if self.tty else "") + msg, file=sys.stderr, flush=True)

    def close(self):
        if self.tty:
            print(file=sys.stderr)


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---------------------------------------------------------------------------------------- the sweep
class Bench:
    def __init__(self, a, argv):
        self.a = a
        self.command = "python scripts/benchmark.py" + (" " + shlex.join(argv) if argv else "")
        self.device = torch.device(a.device)
        self.dtype = getattr(torch, a.dtype)
        self.elem = torch.tensor([], dtype=self.dtype).element_size()
        self.results: list[dict] = []
        self.notes: list[str] = []
        self.hf = None
        self.hf_state = {}  # mode decision and compile time spent (CPU auto)

    # ---- setup
    def load(self):
        a = self.a
        from tokenizer import load_tokenizer

        self.cfg = ModelArgs.load(Path(a.checkpoint) / "config.json")
        self.tok = load_tokenizer(a.checkpoint)
        self.dcfg = None
        if a.draft_checkpoint:
            self.dcfg = ModelArgs.load(Path(a.draft_checkpoint) / "config.json")
            probe = "Speculation needs one vocabulary: 12 apples, naïve café."
            if self.dcfg.vocab_size != self.cfg.vocab_size or \
                    load_tokenizer(a.draft_checkpoint).encode(probe) != self.tok.encode(probe):
                raise BenchError(f"--draft_checkpoint {a.draft_checkpoint} has another vocabulary than {a.checkpoint}")
        self.prompts = load_prompts(a, self.tok)
        self.model = Transformer.from_checkpoint(a.checkpoint, self.device, self.dtype)
        self.draft = None
        if a.draft_checkpoint:
            self.draft = Transformer.from_checkpoint(a.draft_checkpoint, self.device, self.dtype)
        self.hf_src = None
        self.hf_skip = None
        if a.no_hf or a.acceptance_only:
            self.hf_skip = "--no_hf" if a.no_hf else "--acceptance_only"
        else:
            try:
                import transformers  # noqa: F401
            except ImportError:
                self.hf_skip = "transformers is not installed (bash scripts/install.sh bench)"
            else:
                self.hf_src = hf_source(a)
                if self.hf_src is None:
                    self.hf_skip = "no Hugging Face source for this checkpoint (pass --hf_model DIR|FILE.gguf)"
        if self.hf_skip and not (a.no_hf or a.acceptance_only):
            self.notes.append(f"HF peer skipped: {self.hf_skip}")
        if a.compile:
            raise_recompile_limits()

    def configs(self):
        a = self.a
        spec = [("self", g, b) for b in a.budget for g in a.gamma]
        if self.draft is not None:
            spec += [("draft", g, b) for b in a.draft_budget for g in a.gamma]
        return spec

    def hf_modes(self) -> list[str]:
        a, st = self.a, self.hf_state
        if a.hf_compile == "off":
            return ["eager"]
        if a.hf_compile == "on" or self.device.type == "cuda":
            return ["eager"] if st.get("compile_failed") else ["compiled"]
        # CPU, auto: compare on the first shape, then keep the winner while compiling stays cheap
        if "choice" not in st:
            return ["eager", "compiled"]
        spent, n = st.get("compile_seconds", 0.0), st.get("compiles", 0)
        if st["choice"] == "compiled" and n and spent + spent / n > a.hf_compile_budget:  # each shape recompiles
            if not st.get("budget_noted"):
                st["budget_noted"] = True
                self.notes.append(f"HF peer on CPU: {n} compile warm-up(s) took {spent:.0f} s; another would pass "
                                  f"--hf_compile_budget {a.hf_compile_budget:g} s: eager from here on")
            return ["eager"]
        return [st["choice"]]

    def groups(self) -> list[list[tuple]]:
        """Speculative configs grouped by their draft window: a group's runs share one window (a new
        budget allocates a new one, which CUDA graphs would have to re-record inside a timed run)."""
        out = {}
        for c in self.configs():
            out.setdefault((c[0], c[2]), []).append(c)
        return list(out.values())

    def shape_units(self) -> int:
        a = self.a
        ar = 0 if a.acceptance_only else 1
        n = 1 + ar * a.warmup + (1 if a.acceptance_only else 0)  # prefill, AR warm-up, AR reference
        for grp in self.groups():
            if a.compile and any(c[1] == "auto" for c in grp):
                n += 1
            n += a.warmup * len(grp) + a.repeats * (ar + len(grp))
        return n

    def plan(self) -> int:
        a = self.a
        hf = 0 if a.acceptance_only or a.no_hf else max(1, a.warmup) + a.repeats
        return len(a.prompt_len) * len(a.batch_size) * (self.shape_units() + hf)

    # ---- one shape
    def run_shape(self, L: int, B: int, prog: Progress):
        """Prefill once; AR warm-up; then per window group: warm-up its configs, and per repeat AR
        followed by the group's configs (so every speculative run has an AR run moments before)."""
        a, cfg = self.a, self.cfg
        N = a.max_new_tokens
        AR = ("ar", 0, None)
        specs = self.configs()
        methods = ([] if a.acceptance_only else [AR]) + specs
        rows = {c: empty_row(L, B, c[0], c[1], c[2], None if c[0] == "ar" or c[2] == 0 else a.sink) for c in methods}
        for c, r in rows.items():
            if c[0] == "draft":
                r["draft_checkpoint"] = a.draft_checkpoint
        gmax = max_gamma(a.gamma)
        S = -(-(L + N + gmax) // 64) * 64
        skip = None
        if L + N > cfg.max_seq_len:
            skip = f"prompt_len + max_new_tokens = {L + N} exceeds the model's context of {cfg.max_seq_len}"
        else:
            free_caches(self.model, self.device)
            if self.draft is not None:
                free_caches(self.draft, self.device)
            need = ours_bytes(cfg, self.elem, B, S, max(a.budget + a.draft_budget), self.dcfg)
            have = available_memory(self.device)
            if need > MEM_FRACTION * have:
                skip = (f"needs ~{gb(need)} (KV cache {gb(kv_bytes(cfg, self.elem) * B * S)}), "
                        f"{gb(have)} free on {self.device.type}")
        if skip:
            for r in rows.values():
                r["skipped"] = skip
            self.results += list(rows.values())
            prog.tick(f"L={L} B={B}: skipped ({skip})", self.shape_units())
            self.hf_row(L, B, None, prog, skip=skip)
            return
        prompts = batch_of(self.prompts[L], B)

        def run(c, n=N, seed=None):
            return run_ours(self.model, prompts, n, c, a, self.draft, seed=seed)

        # one prefill for everything at this shape: a speculative call with the largest gamma
        first = ("self", first_gamma(a.gamma), a.budget[0])
        _, st = run_ours(self.model, prompts, N, first, a, self.draft, prefilled=False)
        prefill_s = st["prefill_seconds"]
        prog.tick(f"L={L} B={B} prefill {prefill_s:.1f} s ({label(first)})")
        for r in rows.values():
            r["prefill_seconds"] = prefill_s
        ref = None
        if a.acceptance_only:  # an untimed AR run for the lossless check
            if a.temperature == 0:
                ref, _ = run(AR)
            prog.tick(f"L={L} B={B} AR reference")
        else:
            for _ in range(a.warmup):
                run(AR)
                prog.tick(f"L={L} B={B} warm-up ar")
        runs = {c: [] for c in methods}
        pair = {c: [] for c in specs}  # the AR run each speculative run is compared with
        losses = {c: [] for c in specs}
        ar_tokens = None
        for grp in self.groups():
            if a.compile and any(c[1] == "auto" for c in grp):  # every gamma auto may pick: one graph each
                m, _, b = grp[0]
                for g in G.AUTO_GAMMAS:
                    run((m, g, b), min(N, 2 * g + 2))
                prog.tick(f"L={L} B={B} compiled auto's gammas ({m} b={b})")
            for _ in range(a.warmup):
                for c in grp:
                    run(c)
                    prog.tick(f"L={L} B={B} warm-up {label(c)}")
            for r in range(a.repeats):
                ar_st = None
                if not a.acceptance_only:
                    ar_tokens, ar_st = run(AR, seed=a.seed + r)
                    runs[AR].append(ar_st)
                    prog.tick(f"L={L} B={B} rep {r + 1}/{a.repeats} ar: {ar_st['tokens_per_second']:.1f} tok/s")
                for c in grp:
                    new, st = run(c, seed=a.seed + r)
                    runs[c].append(st)
                    pair[c].append(ar_st)
                    if a.temperature == 0:
                        losses[c].append(mismatch(new, ar_tokens if ar_tokens is not None else ref))
                    prog.tick(f"L={L} B={B} rep {r + 1}/{a.repeats} {label(c)}: {st['tokens_per_second']:.1f} tok/s")
        for c in methods:
            ar_runs = None if a.acceptance_only else (runs[AR] if c == AR else pair[c])
            row = summarize_runs(c[0], c[1], c[2], rows[c]["sink"], runs[c], ar_runs, B)
            row = rows[c] | {k: v for k, v in row.items() if k not in ("prompt_len", "sink")}
            if c in losses and a.temperature == 0:
                bad = [m for m in losses[c] if m]
                row["lossless"] = not bad
                if bad:
                    row["mismatch"] = bad[0]
                    prog.note(f"LOSSLESS CHECK FAILED: L={L} B={B} {label(c)}: rows {bad[0]['rows']} differ from "
                              f"plain decoding (row {bad[0]['first_row']} from token {bad[0]['first_position']})")
            rows[c] = row
        self.results += list(rows.values())
        self.hf_row(L, B, ar_tokens, prog, ours=rows)

    def hf_row(self, L, B, ar_tokens, prog, skip=None, ours=None):
        a = self.a
        if a.acceptance_only or a.no_hf:
            return
        units = max(1, a.warmup) + a.repeats
        row = empty_row(L, B, "hf", None, None, None)
        reason = self.hf_skip or skip
        if reason is None and a.hf_max_tokens is not None and B * L > a.hf_max_tokens:
            reason = f"batch * prompt_len = {B * L} exceeds --hf_max_tokens {a.hf_max_tokens}"
        if reason is None:
            need = hf_bytes(self.cfg, self.elem, B, L, a.max_new_tokens, self.device)
            free_caches(self.model, self.device)  # our caches are done with: the peer gets the memory
            if self.draft is not None:
                free_caches(self.draft, self.device)
            have = available_memory(self.device)
            if need > MEM_FRACTION * have:
                reason = f"the peer needs ~{gb(need)}, {gb(have)} free on {self.device.type}"
        if reason is None and self.hf is None:
            try:
                t0 = time.perf_counter()
                self.hf = load_hf(self.hf_src, self.device, self.dtype)
                prog.note(f"loaded the HF peer from {self.hf_src} in {time.perf_counter() - t0:.1f} s")
            except Exception as e:  # noqa: BLE001
                self.hf_skip = f"transformers could not load {self.hf_src}: {type(e).__name__}: {e}"[:300]
                self.notes.append(f"HF peer skipped: {self.hf_skip}")
                reason = self.hf_skip
        if reason is not None:
            row["skipped"] = reason
            self.results.append(row)
            prog.tick(f"L={L} B={B} hf skipped", units)
            return
        modes = self.hf_modes()
        prompts = batch_of(self.prompts[L], B)
        res = hf_measure(self.hf, prompts, a.max_new_tokens, modes=modes, repeats=a.repeats, warmup=a.warmup,
                         sampling=(a.temperature, a.top_k, a.top_p), seed=a.seed,
                         tick=lambda what: prog.tick(f"L={L} B={B} {what}", 1 if len(modes) == 1 else 0))
        if len(modes) > 1:
            prog.tick(f"L={L} B={B} hf", units)
        if self.device.type == "cpu" and len(modes) > 1 and a.hf_compile == "auto":
            ok = {m: r for m, r in res.items() if "tokens_per_second" in r}
            if "compiled" not in ok:
                note = f"HF peer on CPU: compiling failed ({res['compiled'].get('error')}): eager"
            else:
                e, c = ok.get("eager", {}).get("tokens_per_second", 0), ok["compiled"]["tokens_per_second"]
                self.hf_state["choice"] = "compiled" if c > e else "eager"
                note = (f"HF peer on CPU, first shape L={L} B={B}: compiled {c:.1f} tok/s (compile "
                        f"{ok['compiled']['compile_seconds']:.0f} s) vs eager {e:.1f} tok/s: "
                        f"{self.hf_state['choice']} from here on")
            self.hf_state.setdefault("choice", "eager")
            self.notes.append(note)
            prog.note(note)
        for m, r in res.items():
            if m == "compiled" and r.get("compile_seconds") is not None:
                self.hf_state["compile_seconds"] = self.hf_state.get("compile_seconds", 0.0) + r["compile_seconds"]
                self.hf_state["compiles"] = self.hf_state.get("compiles", 0) + 1
            if "error" in r and m == "compiled":
                self.hf_state["compile_failed"] = True
                if not any("compil" in n and "fail" in n for n in self.notes):
                    self.notes.append(f"HF peer: compiling failed ({r['error']}): eager instead")
        ok = {m: r for m, r in res.items() if "tokens_per_second" in r}
        if "compiled" in res and "compiled" not in ok and "eager" not in res:  # compile failed: measure eager now
            res |= hf_measure(self.hf, prompts, a.max_new_tokens, modes=("eager",), repeats=a.repeats,
                              warmup=a.warmup, sampling=(a.temperature, a.top_k, a.top_p), seed=a.seed)
            ok = {m: r for m, r in res.items() if "tokens_per_second" in r}
        if not ok:
            row["skipped"] = "the peer failed: " + "; ".join(f"{m}: {r['error']}" for m, r in res.items())
            self.results.append(row)
            return
        mode = max(ok, key=lambda m: ok[m]["tokens_per_second"])
        r = ok[mode]
        row |= {"tokens_per_second": r["tokens_per_second"], "latency_ms": r["latency_ms"], "vs_hf": 1.0,
                "decode_step_s": r["decode_step_s"], "repeats": r["repeats"], "hf_mode": mode,
                "hf_compile_seconds": r["compile_seconds"], "prefill_seconds": r["prefill_seconds"],
                "hf_modes": {m: ({"tokens_per_second": x["tokens_per_second"], "repeats": x["repeats"],
                                  "compile_seconds": x["compile_seconds"]} if "tokens_per_second" in x else x)
                             for m, x in res.items()}}
        if "compiled" in res and mode == "eager":
            row["hf_note"] = ("compiling failed: " + res["compiled"]["error"]) if "error" in res["compiled"] \
                else "eager was faster than compiled"
        # the peer's greedy tokens vs ours (fp32 only: half precision legitimately differs)
        if a.temperature == 0 and ar_tokens is not None and self.dtype == torch.float32:
            same, prefix = 0, []
            for h, o in zip(r["tokens"], ar_tokens):
                k = next((j for j, (x, y) in enumerate(zip(h, o)) if x != y), min(len(h), len(o)))
                prefix.append(k)
                same += k == len(o)
            row["hf_agreement"] = same / len(ar_tokens)
            row["hf_match_prefix_mean"] = sum(prefix) / len(prefix)
        self.results.append(row)
        if ours:
            for o in ours.values():
                if o.get("tokens_per_second") is not None:
                    o["vs_hf"] = o["tokens_per_second"] / r["tokens_per_second"]
        free_caches_hf()

    # ---- outputs
    def payload(self) -> dict:
        a, cfg = self.a, self.cfg
        model = {"checkpoint": str(a.checkpoint), "args": asdict(cfg), "param_bytes": G.param_bytes(self.model),
                 "kv_bytes_per_token": kv_bytes(cfg, self.elem)}
        if self.draft is not None:
            model["draft"] = {"checkpoint": str(a.draft_checkpoint), "args": asdict(self.dcfg),
                              "param_bytes": G.param_bytes(self.draft),
                              "kv_bytes_per_token": kv_bytes(self.dcfg, self.elem)}
        if self.hf_src is not None:
            model["hf_source"] = str(self.hf_src)
        bad = [r for r in self.results if r.get("lossless") is False]
        return {"command": self.command, "machine": machine_info(self.device, self.dtype), "model": model,
                "config": {k: v for k, v in vars(a).items()}, "notes": self.notes,
                "lossless_all": None if a.temperature else not bad, "results": self.results}

    def write(self, out: Path, plots=False):
        out.mkdir(parents=True, exist_ok=True)
        p = self.payload()
        tmp = out / ".results.json.tmp"
        tmp.write_text(json.dumps(p, indent=1) + "\n")
        os.replace(tmp, out / "results.json")
        (out / "results.md").write_text(markdown(p))
        if plots:
            return make_plots(p, out)
        return []


def free_caches_hf():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------- reports
def _f(x, spec=".1f", none="–"):
    return none if x is None else format(x, spec)


def markdown(p: dict) -> str:
    m = p["machine"]
    desc = f"{m['device']}: {m['name']}" + (f" ({m['cores']} cores)" if m["device"] == "cpu" else
                                            f" ({m.get('gpu_memory_gb')} GB), CPU {m['cpu']} ({m['cores']} cores)")
    lines = ["# magicdec benchmark", "", f"- machine: {desc}; torch {m['torch']}"
             + (f", transformers {m['transformers']}" if m.get("transformers") else "") + f"; {m['dtype']}",
             f"- command: `{p['command']}`",
             (f"- model: `{p['model']['checkpoint']}` ({p['model']['param_bytes'] / 1e6:.0f} MB of weights, "
              f"{p['model']['kv_bytes_per_token'] / 1e3:.1f} KB of KV per token)")]
    c = p["config"]
    lines.append(f"- {c['max_new_tokens']} new tokens per row, temperature {c['temperature']}, sink {c['sink']}, "
                 f"{c['repeats']} repeats (medians), {c['warmup']} warm-up round(s), compile {c['compile']}")
    if p.get("lossless_all") is False:
        lines += ["", ("**LOSSLESS CHECK FAILED: some greedy speculative runs differ from plain decoding "
                       "(rows marked NO below).**")]
    for n in p.get("notes", []):
        lines.append(f"- note: {n}")
    lines += ["", ("tok/s: decode throughput over the batch; speedup: vs plain decoding (AR) in the same repeat; "
                   "vs HF: vs transformers generate (static cache); latency: ms per token of one row; "
                   "acceptance: accepted / proposed drafts; mean acc.: tokens per row per verify step."), "",
              ("| length | batch | method | gamma | budget | tok/s | speedup vs AR | vs HF | latency ms/token "
               "| acceptance | mean acc. | lossless | notes |"),
              "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in p["results"]:
        note = r.get("skipped") and f"skipped: {r['skipped']}" or ""
        if r["method"] == "hf" and not r.get("skipped"):
            note = r.get("hf_mode", "") + (f", {r['hf_note']}" if r.get("hf_note") else "")
            if r.get("hf_agreement") is not None:
                note += f", same tokens as ours in {r['hf_agreement']:.0%} of rows"
        if r.get("gamma_used"):
            note += ("; " if note else "") + "gamma used " + " ".join(f"{g}:{n}" for g, n in r["gamma_used"].items())
        lossless = {True: "yes", False: "**NO**", None: ""}[r.get("lossless")]
        method = r["method"] + (" (draft model)" if r["method"] == "draft" else "")
        lines.append(
            f"| {r['prompt_len']} | {r['batch_size']} | {method} | {_f(r['gamma'], '', '')} | "
            f"{_f(r['budget'], '', '')} | {_f(r['tokens_per_second'])} | {_f(r['speedup'], '.2f')} | "
            f"{_f(r['vs_hf'], '.2f')} | {_f(r['latency_ms'], '.1f')} | {_f(r['acceptance_rate'], '.2f')} | "
            f"{_f(r['mean_accepted'], '.2f')} | {lossless} | {note} |")
    return "\n".join(lines) + "\n"


def _spec_label(r):
    return f"γ{r['gamma']} b{r['budget']}" + (" draft" if r["method"] == "draft" else "")


def make_plots(p: dict, out: Path) -> list[str]:
    """speedup_vs_batch.png and throughput_vs_latency.png; [] (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install matplotlib, or bash scripts/install.sh bench): "
              "plots skipped", file=sys.stderr)
        return []
    rows = [r for r in p["results"] if r.get("tokens_per_second") is not None and not r.get("skipped")]
    lens = sorted({r["prompt_len"] for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    title = f"{Path(p['model']['checkpoint']).name}, {p['machine']['name']}, {p['machine']['dtype']}"
    written = []

    def best(L, B, methods, key):
        c = [r for r in rows if r["prompt_len"] == L and r["batch_size"] == B and r["method"] in methods
             and r.get(key) is not None]
        return max(c, key=lambda r: r[key]) if c else None

    # speedup vs batch: the best speculative config per (length, batch); one line per length
    fig, ax = plt.subplots(figsize=(7, 4.5))
    any_line = False
    for i, L in enumerate(lens):
        for methods, ls, tag in ((("self",), "-", "self-spec"), (("draft",), "--", "draft model")):
            pts = [(B, best(L, B, methods, "speedup")) for B in sorted({r["batch_size"] for r in rows})]
            pts = [(B, r) for B, r in pts if r is not None]
            if not pts:
                continue
            any_line = True
            ax.plot([B for B, _ in pts], [r["speedup"] for _, r in pts], ls, marker="o", color=colors[i % len(colors)],
                    label=f"L={L} {tag} (best config)")
            for B, r in pts:
                ax.annotate(_spec_label(r), (B, r["speedup"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if any_line:
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        bs = sorted({r["batch_size"] for r in rows})
        ax.set_xticks(bs, [str(b) for b in bs])
        ax.set_xlabel("batch size")
        ax.set_ylabel("speedup vs plain decoding")
        ax.set_title(f"Speculative speedup\n{title}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "speedup_vs_batch.png", dpi=120)
        written.append("speedup_vs_batch.png")
    plt.close(fig)

    # throughput vs per-token latency: AR, best speculative, HF; points labelled by batch size
    fig, ax = plt.subplots(figsize=(7, 4.5))
    any_line = False
    for i, L in enumerate(lens):
        for methods, ls, mk, tag in ((("ar",), "--", "o", "AR"), (("self", "draft"), "-", "^", "speculative (best)"),
                                     (("hf",), ":", "s", "HF transformers")):
            pts = [best(L, B, methods, "tokens_per_second") for B in sorted({r["batch_size"] for r in rows})]
            pts = [r for r in pts if r is not None and r.get("latency_ms") is not None]
            if not pts:
                continue
            any_line = True
            ax.plot([r["latency_ms"] for r in pts], [r["tokens_per_second"] for r in pts], ls, marker=mk,
                    color=colors[i % len(colors)], label=f"L={L} {tag}")
            for r in pts:
                ax.annotate(f"B{r['batch_size']}", (r["latency_ms"], r["tokens_per_second"]),
                            textcoords="offset points", xytext=(4, -8), fontsize=7)
    if any_line:
        ax.set_xlabel("latency (ms per token of one row)")
        ax.set_ylabel("throughput (tokens/s)")
        ax.set_title(f"Throughput vs latency\n{title}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "throughput_vs_latency.png", dpi=120)
        written.append("throughput_vs_latency.png")
    plt.close(fig)
    return written


# ---------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        a = parse_args(argv)
        a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(a.device)
        except RuntimeError as e:
            raise BenchError(f"--device {a.device}: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BenchError("--device cuda: no CUDA device here")
        a.dtype = a.dtype or ("bfloat16" if device.type == "cuda" else "float32")
        if a.checkpoint is None:
            from convert_checkpoint import default_checkpoint

            try:
                a.checkpoint = str(default_checkpoint())
            except Exception as e:  # noqa: BLE001
                raise BenchError(f"default checkpoint: {e}") from None
        bench = Bench(a, argv)
        out = Path(a.out) if a.out else ROOT / "benchmarks" / slug(machine_info(device, bench.dtype)["name"])
        a.out = str(out)
        bench.load()
    except (BenchError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    prog = Progress(bench.plan())
    try:
        for L in a.prompt_len:
            for B in a.batch_size:
                bench.run_shape(L, B, prog)
                bench.write(out)
    except KeyboardInterrupt:
        prog.close()
        bench.notes.append("interrupted: partial results")
        bench.write(out)
        print(f"interrupted: partial results in {out}", file=sys.stderr)
        return 130
    prog.close()
    bench.notes.append(f"sweep wall time {time.perf_counter() - t0:.0f} s")
    plots = bench.write(out, plots=not a.no_plots)
    print(markdown(bench.payload()))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}" + "".join(f", {out / f}" for f in plots),
          file=sys.stderr)
    bad = [r for r in bench.results if r.get("lossless") is False]
    if bad:
        print(f"LOSSLESS CHECK FAILED in {len(bad)} configs (see results.md)"
              + ("" if bench.dtype == torch.float32 else
                 f": in {a.dtype} a near-tie argmax can flip between the [B,1] and [B,g+1] forwards; "
                 "rerun in float32 to tell numerics from a bug"), file=sys.stderr)
        if bench.dtype == torch.float32:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
