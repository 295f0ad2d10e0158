"""Analytic speedup model for batched (self-)speculative decoding (MagicDec, arXiv 2408.11049).

Usage:
  python scripts/speedup_model.py                                # the paper's settings beside its numbers
  python scripts/speedup_model.py --model llama-3.1-8b --hw h100 --tp 8 --batch 32 64 --length 32000
  python scripts/speedup_model.py --model checkpoints/smollm2-135m --hw cpu --flops 0.2 --dtype float32
  python scripts/speedup_model.py benchmarks/X/results.json      # measured rows beside the model
  python scripts/speedup_model.py benchmarks/X/results.json --hw cpu --flops 0.2 --layer_overhead_us 100

One forward of T new tokens per row over B rows whose attention reads K slots per row costs, on the
busiest of N tensor-parallel ranks,
    t = max(W/BW, 2*P*B*T/F) + max(KV/BW, 4*B*T*K*L*H*D/F) / e + comm + L * overhead
W: weights (embedding rows only), the activations' passes through memory (~10 [B, T, dim] and 3
[B, T, ffn/N] per layer) and the logits; P: matmul parameters; KV: K/V bytes read (B*K slots) and
written (B*T; twice when the verify also fills the self-draft's window), split by whole KV heads;
comm: 2 all-reduces of [B, T, dim] per layer, each latency + 2(N-1)/N * bytes / link bandwidth;
overhead: launches and small kernels, per layer, plus acceptance and commit once per step. GEMMs and
attention run one after the other, so each is bound by its own max(bytes, flops).

e is the attention kernel's share of the GPU. A split-KV decoding kernel (FlexAttention compiled:
model.py under --compile) spreads each row's KV over all SMs: e = 1. A kernel that does not split
the KV sequence for short queries (SDPA with a dense mask: memory-efficient or cuDNN) runs B x local
KV heads blocks: e = min(1, B * Hkv_local / SMs) (--no_split_kv). At TP 8 with one KV head per rank,
B = 64 fills 64 of an H100's 132 SMs: decode, draft and verify attention all run at under half the
bandwidth, so tokens/s falls while the speedup over equally slowed plain decoding does not.

With per-token acceptance alpha and gamma drafts, a verify step commits E = (1 - alpha^(gamma+1)) /
(1 - alpha) tokens per row, and
    speedup = E * T_decode / (gamma * T_draft + T_verify(gamma + 1)),
T_decode and T_verify including the per-step overhead; gamma = 0 is plain decoding (speedup 1).
"""
import json
import math
import platform
import statistics
import sys
import timeit
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # generate.py and model.py, from any cwd

import numpy as np

from cli import ArgParser, run
from sampling import expected_tokens, max_gamma
from stats import cache_len
from model import ModelArgs, UsageError

MODELS = {
    "llama-2-7b-32k": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, intermediate_size=11008,
                                vocab_size=32000, max_seq_len=32768),
    "llama-3.1-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336,
                              vocab_size=128256, max_seq_len=131072),
    "tinyllama-1.1b": ModelArgs(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, intermediate_size=5632,
                                vocab_size=32000, max_seq_len=2048),
    "llama-2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, intermediate_size=11008,
                            vocab_size=32000, max_seq_len=4096),
    "llama-3.1-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=28672,
                               vocab_size=128256, max_seq_len=131072, rope_base=500000.0),
    "smollm2-135m": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate_size=1536,
                              vocab_size=49152, max_seq_len=8192, rope_base=100000.0, tie_embeddings=True),
}
ELEM = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass
class Hardware:
    name: str
    bandwidth: float  # bytes/s a long streaming kernel moves (reads + writes)
    flops: float  # FLOP/s of the run's dtype in GEMMs
    layer_overhead_s: float = 0.0  # per layer per forward
    step_overhead_s: float = 0.0  # per decode / verify step: acceptance, commit, host sync
    link_bw: float = math.inf  # all-reduce bus bandwidth, bytes/s
    link_latency_s: float = 0.0  # per all-reduce
    sms: int = 0  # streaming multiprocessors (0: not a GPU)
    split_kv: bool = True  # the attention kernel splits the KV sequence over the SMs

    def __str__(self):
        s = (f"{self.name}: {self.bandwidth / 1e9:,.1f} GB/s, {self.flops / 1e12:,.3g} TFLOP/s, "
             f"{self.layer_overhead_s * 1e6:.1f} us/layer + {self.step_overhead_s * 1e3:.3g} ms/step")
        if self.link_bw < math.inf:
            s += f", all-reduce {self.link_latency_s * 1e6:.0f} us + bytes / {self.link_bw / 1e9:.0f} GB/s"
        return s + (f", {self.sms} SMs, KV {'split' if self.split_kv else 'not split'}" if self.sms else "")


# H100, H200: copy bandwidth (read + write) and bf16 GEMM rate as measured on one of each. A100-80GB,
# not measured by us: bandwidth and per-layer overhead fitted to gpt-fast's batch-1 decoding at TP
# 1/2/4/8 (GPTFAST below), GEMMs at the H100's 81 % of spec. The per-layer overhead (~10 small
# kernels per layer, a few us each even in a CUDA graph) is taken to be the same on all three.
# All-reduce: 10 us + bytes over the NVLink bus bandwidth.
PRESETS = {
    "a100": Hardware("A100-80GB", 1.62e12, 0.81 * 312e12, 37e-6, 0.1e-3, 230e9, 10e-6, 108),
    "h100": Hardware("H100-80GB", 3.0e12, 800e12, 37e-6, 0.1e-3, 400e9, 10e-6, 132),
    "h200": Hardware("H200", 4.3e12, 790e12, 37e-6, 0.1e-3, 400e9, 10e-6, 132),
}
FP32_FLOPS = {"a100": 19.5e12, "h100": 67e12, "h200": 67e12}  # CUDA-core fp32, spec


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("model name")] \
        if info.is_file() else []
    return names[0] if names else platform.processor() or platform.machine()


def copy_bandwidth() -> float:
    """This machine's copy bandwidth, bytes/s, read + write counted: the best of 5 copies of 128 MiB."""
    import torch
    src, dst = torch.ones(32 << 20), torch.empty(32 << 20)
    return 2 * src.numel() * 4 / min(timeit.repeat(lambda: dst.copy_(src), number=1, repeat=6)[1:])  # [0]: warm-up


def hardware(a, dtype: str, machine: dict | None = None, default: str | None = None) -> Hardware:
    """--hw (a preset, or cpu: this machine's copy bandwidth), else a results file's GPU, else the
    flags alone, else `default`; --bandwidth, --flops and the overheads override what they name."""
    gpu = machine and machine.get("device") == "cuda" and str(machine.get("name", "")).lower()
    key = a.hw or next((k for k in PRESETS if gpu and k in gpu), None) or (None if a.bandwidth and a.flops else default)
    if key == "cpu":
        if not a.flops:
            raise UsageError("--hw cpu measures the copy bandwidth only: give --flops (TFLOP/s) too")
        hw = Hardware(f"cpu ({cpu_name()}, copy bandwidth probed)", copy_bandwidth(), 0.0)
    elif key:
        if key not in PRESETS:
            raise UsageError(f"unknown --hw {key!r} (known: {', '.join(PRESETS)}, cpu)")
        hw = PRESETS[key] if dtype != "float32" else replace(PRESETS[key], flops=FP32_FLOPS[key])
    elif a.bandwidth and a.flops:
        hw = Hardware("given", 0.0, 0.0)
    else:
        where = f" for {machine.get('device')} {machine.get('name')!r}" if machine else ""
        raise UsageError(f"no hardware numbers{where}: pass --hw {'|'.join(PRESETS)}|cpu, or --bandwidth and --flops")
    kw = {k: v * u for k, v, u in (("bandwidth", a.bandwidth, 1e9), ("flops", a.flops, 1e12),
                                   ("layer_overhead_s", a.layer_overhead_us, 1e-6),
                                   ("step_overhead_s", a.step_overhead_ms, 1e-3)) if v is not None}
    return replace(hw, **kw, split_kv=not a.no_split_kv)


# ------------------------------------------------------------------------------------- one forward
def forward_cost(cfg: ModelArgs, B: int, kv: int, T: int, elem: int = 2, tp: int = 1, copies: int = 1) -> dict:
    """One forward of T new tokens per row on the busiest of tp ranks. kv: slots each row's attention
    reads (the new tokens included); copies: caches the new K/V are written to."""
    D, Dh, H, Hkv, L, I = cfg.dim, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers, cfg.intermediate_size
    hkv, V, BT = -(-Hkv // tp), cfg.vocab_size, B * T  # KV heads on the busiest rank: whole GQA groups
    mm = L * ((D * (H + 2 * Hkv) * Dh + H * Dh * D) * hkv / Hkv + 3 * D * I / tp) + V * D / tp  # matmul params
    act = BT * L * (10 * D + 3 * I / tp)  # norms, RoPE, residuals, q/k/v/o; gate, up, product
    return {"w_bytes": (mm + L * 2 * D + D + BT * D + BT * V / tp + act) * elem, "w_flops": 2 * BT * mm,
            "kv_bytes": (B * kv + BT * copies) * cfg.kv_bytes_per_token(elem, hkv),
            "kv_flops": 4 * T * B * kv * L * H * Dh * hkv / Hkv,
            "blocks": B * hkv, "comm_bytes": BT * D * elem, "tp": tp, "layers": L}


def forward_time(c: dict, hw: Hardware) -> float:
    e = 1.0 if hw.split_kv or not hw.sms else min(1.0, c["blocks"] / hw.sms)  # attention's share of the SMs
    t = (max(c["w_bytes"] / hw.bandwidth, c["w_flops"] / hw.flops)
         + max(c["kv_bytes"] / hw.bandwidth, c["kv_flops"] / hw.flops) / e)
    if c["tp"] > 1:
        t += 2 * c["layers"] * (hw.link_latency_s + 2 * (c["tp"] - 1) / c["tp"] * c["comm_bytes"] / hw.link_bw)
    return t + c["layers"] * hw.layer_overhead_s


def step_time(cfg, hw, B, kv, T, elem=2, tp=1, copies=1) -> float:
    """Seconds of one forward (predict adds the per-step overhead)."""
    return forward_time(forward_cost(cfg, B, kv, T, elem, tp, copies), hw)


# ----------------------------------------------------------------------------------- the speedup
def predict(cfg: ModelArgs, hw: Hardware, B: int, L: int, budget: int, alpha: float | None, gamma: int | dict,
            dcfg: ModelArgs | None = None, tp: int = 1, dtp: int | None = None, elem: int = 2,
            S: int | None = None, tokens: float | None = None, two_token: bool = False) -> dict:
    """One speculative step at context L (tokens cached per row). gamma: an int or {gamma: share of
    steps} (--gamma auto). dcfg None: self-speculation on a `budget`-slot window; else a separate
    draft model on its window (budget > 0) or its full cache (budget 0); two_token: its first draft
    forward of a step carries 2 tokens (as in generate.py). S: the target reads this many slots every
    step (our static cache) instead of the visible L + gamma + 1. tokens: measured tokens per row per
    step instead of E(alpha, gamma).
    -> {E, t_decode, t_draft (one draft forward), t_verify (mean), t_step, speedup, tokens_per_s}"""
    mix = gamma if isinstance(gamma, dict) else {gamma: 1.0}
    if min(mix) < 0 or (dcfg is None and max(mix) > 0 and not budget):
        raise UsageError(f"gamma {gamma}, budget {budget}: need gamma >= 0 and a self-draft window budget > 0")
    kv = lambda g: S or L + g + 1
    t_dec = step_time(cfg, hw, B, kv(0), 1, elem, tp) + hw.step_overhead_s
    copies = 2 if dcfg is None and max(mix) > 0 else 1  # the verify also fills the self-draft's window
    t_ver = sum(w * step_time(cfg, hw, B, kv(g), g + 1, elem, tp, copies) for g, w in mix.items())
    n = sum(w * g for g, w in mix.items())  # draft forwards per step
    dkv = min(budget, L + 1) if budget else kv(0)
    t_d = step_time(dcfg or cfg, hw, B, dkv, 1, elem, dtp or tp) if n else 0.0
    t_drafts = n * t_d
    if two_token and n:
        t_drafts += sum(w for g, w in mix.items() if g) * (step_time(dcfg, hw, B, dkv, 2, elem, dtp or tp) - t_d)
    E = tokens if tokens is not None else sum(w * expected_tokens(alpha, g) for g, w in mix.items())
    t_step = t_drafts + t_ver + hw.step_overhead_s
    return {"E": E, "t_decode": t_dec, "t_draft": t_drafts / n if n else 0.0, "t_verify": t_ver + hw.step_overhead_s,
            "t_step": t_step, "speedup": E * t_dec / t_step, "tokens_per_s": B * E / t_step}


def best_gamma(cfg, hw, B, L, budget, alpha, dcfg=None, tp=1, sink=16, gammas=range(13), **kw) -> tuple[int, dict]:
    """-> (the gamma with the highest predicted speedup (0: do not speculate), {gamma: predict(...)});
    a window keeps gamma + 1 recent slots past its sinks."""
    res = {g: predict(cfg, hw, B, L, budget, alpha, g, dcfg, tp, **kw) for g in gammas
           if g == 0 or not budget or budget - sink >= g + 1}
    return max(res, key=lambda g: res[g]["speedup"]), res


# ---------------------------------------------------------------------------------- the paper
# MagicDec (arXiv 2408.11049 v3, project page): PG-19 acceptance of Llama-3.1-8B self-speculation,
# StreamingLLM budget 512, by context length.
PG19_ALPHA = [(4000, 0.84), (8000, 0.83), (16000, 0.82), (32000, 0.81), (64000, 0.79), (100000, 0.79)]


def pg19_alpha(L: float) -> float:
    """Linear in log(L) between the published points, flat outside them."""
    return float(np.interp(math.log(max(L, 1)), [math.log(x) for x, _ in PG19_ALPHA], [a for _, a in PG19_ALPHA]))


PAPER_BUDGET, PAPER_SINK, PAPER_TP, PAPER_GEN = 512, 16, 8, 96
L2, L3, TL = "llama-2-7b-32k", "llama-3.1-8b", "tinyllama-1.1b"
# (GPUs, target, draft, prefill, batch, best gamma, throughput speedup), from the project page.
# TinyLlama has 4 KV heads: the reference runs it tensor-parallel over 4 of the 8 GPUs.
PAPER_ROWS = [
    ("a100", L3, None, 32000, 32, 3, 1.22), ("a100", L3, None, 32000, 64, 3, 1.38),
    ("a100", L3, None, 32000, 128, 4, 1.47), ("a100", L3, None, 100000, 32, 5, 1.84),
    ("a100", L2, None, 8000, 32, 3, 1.18), ("a100", L2, None, 8000, 64, 3, 1.48),
    ("a100", L2, None, 8000, 128, 4, 1.63), ("a100", L2, None, 32000, 32, 4, 2.00),
    ("a100", L2, TL, 8000, 32, 3, 1.29), ("a100", L2, TL, 8000, 64, 3, 1.57),
    ("a100", L2, TL, 8000, 128, 4, 1.66), ("a100", L2, TL, 32000, 32, 4, 1.91),
    ("h100", L3, None, 32000, 32, 3, 1.23), ("h100", L3, None, 32000, 64, 3, 1.43),
    ("h100", L2, None, 8000, 32, 3, 1.19), ("h100", L2, None, 8000, 64, 4, 1.42),
    ("h100", L2, None, 8000, 128, 4, 1.65), ("h100", L2, TL, 8000, 32, 2, 1.32),
    ("h100", L2, TL, 8000, 64, 3, 1.48), ("h100", L2, TL, 8000, 128, 3, 1.64),
]
# gpt-fast's README, batch 1, bf16, Llama-2-7B: (GPUs, TP, context, tok/s), the presets outside speculation
GPTFAST = [("a100", 1, 1, 104.9), ("a100", 2, 1, 168.8), ("a100", 4, 1, 254.0), ("a100", 8, 1, 328.4),
           ("h100", 1, 1024, 142.6), ("h100", 1, 8192, 125.4), ("h100", 1, 32768, 87.7)]


def paper_table(split_kv=True, out=print) -> list[dict]:
    out(f"Predicted vs published speedups: 8 GPUs tensor-parallel, bf16, StreamingLLM draft budget {PAPER_BUDGET} "
        f"({PAPER_SINK} sinks), context = prefill + {PAPER_GEN // 2}; alpha: PG-19 acceptance of Llama-3.1-8B "
        "self-speculation, also for Llama-2-7B and (* no published figure) the TinyLlama draft.")
    hdr = (f"{'GPUs':6} {'target':14} {'draft':9} {'prefill':>7} {'B':>4} | {'paper':>5} {'γ':>2} | {'alpha':>6} "
           f"{'model γ*':>8} {'@γ*':>5} {'@paperγ':>7} {'model/paper':>11} | {'T_dec ms':>8} {'draft/dec':>9} "
           f"{'verify/dec':>10} | {'verify/dec to match':>19}")
    out(hdr + "\n" + "-" * len(hdr))
    rows = []
    for hwk, tgt, drf, prefill, B, pg, ps in PAPER_ROWS:
        hw = replace(PRESETS[hwk], split_kv=split_kv)
        cfg, dcfg, L = MODELS[tgt], MODELS.get(drf), prefill + PAPER_GEN // 2  # mid-generation
        alpha, kw = pg19_alpha(L), {"dtp": 4 if drf else None}
        g, res = best_gamma(cfg, hw, B, L, PAPER_BUDGET, alpha, dcfg, PAPER_TP, PAPER_SINK, **kw)
        r = predict(cfg, hw, B, L, PAPER_BUDGET, alpha, pg, dcfg, PAPER_TP, **kw)
        dr, vr = r["t_draft"] / r["t_decode"], r["t_verify"] / r["t_decode"]
        need = r["E"] / ps - pg * dr  # the verify cost, in decode steps, that gives the published speedup
        rows.append({"self": drf is None, "hw": hwk, "ratio": r["speedup"] / ps, "verify": vr, "need": need})
        out(f"{'8x' + hwk.upper():6} {tgt:14} {(drf or 'self')[:9]:9} {prefill:>7} {B:>4} | {ps:>5.2f} {pg:>2} | "
            f"{alpha:>5.3f}{'*' if drf else ' '} {g:>8} {res[g]['speedup']:>5.2f} {r['speedup']:>7.2f} "
            f"{r['speedup'] / ps:>11.2f} | {r['t_decode'] * 1e3:>8.1f} {dr:>9.3f} {vr:>10.3f} | {need:>19.2f}")
    sel = lambda k, f=lambda x: True: [x[k] for x in rows if f(x)]
    med, span = lambda f: f"{statistics.median(sel('ratio', f)):.2f}", lambda v: f"{min(v):.2f}-{max(v):.2f}"
    out(f"model/paper at the paper's γ: {span(sel('ratio'))}, median {med(lambda x: True)} (self-speculation: A100 "
        f"{med(lambda x: x['self'] and x['hw'] == 'a100')}, H100 {med(lambda x: x['self'] and x['hw'] == 'h100')}; "
        f"TinyLlama {med(lambda x: not x['self'])}); verify/dec: model {span(sel('verify'))}, to match the paper "
        f"{span(sel('need', lambda x: x['self']))} (self-speculation)")
    return rows


def gptfast_check(out=print):
    out("\nPresets outside speculation: gpt-fast's published batch-1 bf16 decoding of Llama-2-7B (tok/s).")
    for hwk, tp, ctx, tps in GPTFAST:
        hw = PRESETS[hwk]
        tok = 1 / (step_time(MODELS[L2], hw, 1, ctx, 1, tp=tp) + hw.step_overhead_s)
        out(f"  {hwk.upper()} TP{tp} context {ctx:<6} published {tps:6.1f}, model {tok:6.1f} ({tok / tps - 1:+.0%})")


# ------------------------------------------------------------------------------ benchmark results
def load_results(path: str) -> dict:
    try:
        res = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(res, dict) or not all(k in res for k in ("machine", "model", "results")):
        raise UsageError(f"{path}: not a results.json of scripts/benchmark.py (no machine, model or results)")
    return res


def compare(res: dict, hw: Hardware, out=print) -> list[float]:
    """The measured speculative rows of a results.json beside the model, given each row's measured
    tokens per step and gamma mix (so it tests the step times, not the acceptance). -> speedup errors."""
    c, m, dtype = res.get("config", {}), res["model"], str(res["machine"].get("dtype", "float32"))
    try:
        cfg, elem = ModelArgs(**m["args"]), ELEM[dtype]
        dcfg = ModelArgs(**m["draft"]["args"]) if m.get("draft") else None
    except (KeyError, TypeError) as e:
        raise UsageError(f"results.json: no model args, or an unknown dtype ({e!r})") from None
    N, gs = int(c.get("max_new_tokens", 0)), c.get("gamma") or [0]
    gmax = max(max_gamma(g) for g in (gs if isinstance(gs, list) else [gs]))  # the first call sizes the cache
    flex = bool(c.get("compile"))  # the model is taken mid-generation, at L + N / 2
    rows = [r for r in res["results"] if not r.get("skipped")]
    ar = {(r["prompt_len"], r["batch_size"]): r.get("decode_step_s") for r in rows if r.get("method") == "ar"}
    out(f"model {Path(str(m.get('checkpoint'))).name}, {dtype}, {cfg.kv_bytes_per_token(elem) / 1e3:.1f} "
        f"KB KV per token; the target reads " + ("each row's own KV blocks (compiled: FlexAttention)" if flex
                                                  else f"all cache_len(L + {N}, {gmax}) slots (eager: SDPA)"))
    out(f"hardware: {hw}")
    hdr = (f"{'L':>6} {'B':>4} {'method':6} {'gamma':22} {'budget':>6} {'E':>5} | {'decode ms':>13} {'draft ms':>13} "
           f"{'verify ms':>13} | {'speedup':>7} {'model':>6} {'error':>7}")
    out("times: model/measured ms; E: measured tokens per row per step\n" + hdr + "\n" + "-" * len(hdr))
    pm = lambda p, m: f"{p * 1e3:6.1f}/" + (f"{m * 1e3:<6.1f}" if m else f"{'-':<6}")
    errs = []
    for r in rows:
        used = {int(k): v for k, v in (r.get("gamma_used") or {}).items() if v}
        g = r.get("gamma")
        mix = {g: 1.0} if isinstance(g, int) else {k: v / sum(used.values()) for k, v in used.items()}
        if r.get("method") not in ("self", "draft") or not r.get("speedup") or not mix:
            continue
        L, B, gen, steps = r["prompt_len"], r["batch_size"], r.get("generated_tokens"), r.get("verify_steps")
        E = gen / (steps * B) if gen and steps else r["mean_accepted"]  # tokens per row per step
        sep = r["method"] == "draft"  # a separate draft model
        p = predict(cfg, hw, B, L + N // 2, int(r.get("budget") or 0), None, mix, dcfg if sep else None, elem=elem,
                    S=None if flex else cache_len(L + N, gmax), tokens=E, two_token=sep)
        errs.append(p["speedup"] / r["speedup"] - 1)
        gl = str(g) if isinstance(g, int) else "auto " + ",".join(f"{k}:{v}" for k, v in sorted(used.items()))
        out(f"{L:>6} {B:>4} {r['method']:6} {gl:22} {r.get('budget') or 0:>6} {E:>5.2f} | "
            f"{pm(p['t_decode'], ar.get((L, B)))} {pm(p['t_draft'], r.get('draft_forward_s'))} "
            f"{pm(p['t_verify'], r.get('verify_step_s'))} | "
            f"{r['speedup']:>7.3f} {p['speedup']:>6.3f} {errs[-1]:>+7.1%}")
    if not errs:
        raise UsageError("results.json: no measured speculative rows")
    out(f"speedup: median |error| {statistics.median(map(abs, errs)):.1%}, worst {max(errs, key=abs):+.1%}, "
        f"within 20% in {sum(abs(e) <= 0.2 for e in errs)} of {len(errs)} rows")
    return errs


# ------------------------------------------------------------------------------------------- CLI
def predict_table(a, out=print):
    load = lambda name: MODELS.get(name.lower()) or ModelArgs.load(Path(name) / "config.json")  # preset or checkpoint
    cfg, dcfg = load(a.model), None if a.draft == "self" else load(a.draft)
    hw = hardware(a, a.dtype, default="h100")
    if dcfg is None and a.budget - a.sink < 2:
        raise UsageError(f"--budget {a.budget} leaves no recent slots after --sink {a.sink}")
    out(f"{a.model}, draft {a.draft}, budget {a.budget} ({a.sink} sinks), TP {a.tp}, {a.dtype}\n"
        f"hardware: {hw}")
    gs, kw = range(9), {"dtp": a.draft_tp, "elem": ELEM[a.dtype], "two_token": dcfg is not None}
    out(f"{'L':>7} {'B':>5} {'alpha':>6} | {'T_dec ms':>8} {'draft/dec':>9} {'verify/dec':>10} | "
        + " ".join(f"{'γ=' + str(g):>5}" for g in gs) + " | best")
    for L in a.length:
        alpha = pg19_alpha(L) if a.alpha is None else a.alpha
        for B in a.batch:
            gb, sp = best_gamma(cfg, hw, B, L, a.budget, alpha, dcfg, a.tp, a.sink, gs, **kw)
            r = sp.get(4) or sp[max(sp)]
            out(f"{L:>7} {B:>5} {alpha:>6.3f} | {r['t_decode'] * 1e3:>8.2f} {r['t_draft'] / r['t_decode']:>9.3f} "
                f"{r['t_verify'] / r['t_decode']:>10.3f} | "
                + " ".join(f"{sp[g]['speedup']:>5.2f}" if g in sp else f"{'-':>5}" for g in gs)
                + f" | γ={gb} {sp[gb]['speedup']:.2f}x, {sp[gb]['tokens_per_s']:,.0f} tok/s")


def parse_args(argv):
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="?", help="a results.json of scripts/benchmark.py")
    ap.add_argument("--hw", type=str.lower, help=f"{' | '.join(PRESETS)} | cpu (copy bandwidth probed; give --flops)")
    for k, h in (("bandwidth", "GB/s, read + write"), ("flops", "TFLOP/s"), ("layer_overhead_us", "per layer per "
                 "forward"), ("step_overhead_ms", "per decode or verify step"), ("alpha", "per-token acceptance "
                 "(default: the paper's PG-19 figure at L)")):
        ap.add_argument("--" + k, type=float, help=h)
    ap.add_argument("--no_split_kv", action="store_true",
                    help="GPU attention does not split KV: its bandwidth x min(1, B * local KV heads / SMs)")
    ap.add_argument("--model", help=f"predict for a preset ({', '.join(MODELS)}) or a checkpoint directory")
    ap.add_argument("--draft", default="self", help="self (default), a preset name or a checkpoint directory")
    ap.add_argument("--batch", type=int, nargs="+", default=[32], metavar="B")
    ap.add_argument("--length", type=int, nargs="+", default=[8000], metavar="L", help="tokens cached per row")
    ap.add_argument("--budget", type=int, default=512, help="draft window slots incl. sinks (0: draft's full cache)")
    ap.add_argument("--sink", type=int, default=16)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--draft_tp", type=int, help="ranks of a separate draft (default: --tp)")
    ap.add_argument("--dtype", choices=list(ELEM), default="bfloat16")
    a = ap.parse_args(argv)
    if a.results and a.model:
        raise UsageError("a results file brings its own model: drop --model")
    if (min(a.batch + a.length + [a.tp, a.draft_tp or 1]) < 1 or min(a.budget, a.sink) < 0
            or min(v for v in (a.bandwidth, a.flops, 1) if v is not None) <= 0
            or min(v for v in (a.layer_overhead_us, a.step_overhead_ms, 0) if v is not None) < 0
            or not 0 <= (a.alpha or 0) <= 1):
        raise UsageError("need --batch, --length, --tp, --draft_tp >= 1; --budget, --sink, the overheads >= 0; "
                         "--bandwidth, --flops > 0; --alpha in [0, 1]")
    if not (a.results or a.model) and (a.hw or a.bandwidth or a.flops):
        raise UsageError("the paper table uses its own presets: --hw, --bandwidth, --flops need a model or results")
    return a


def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if a.results:
        res = load_results(a.results)
        m = res["machine"]
        hw = hardware(a, str(m.get("dtype", "float32")), m)
        print(f"{a.results}: measured on {m.get('device')} {m.get('name')!r} ({m.get('cores')} cores)"
              + (f"; this machine is {cpu_name()!r}" if a.hw == "cpu" and m.get("name") != cpu_name() else ""))
        compare(res, hw)
    elif a.model:
        predict_table(a)
    else:
        paper_table(not a.no_split_kv)
        gptfast_check()
        print("\nPresets: " + "; ".join(str(replace(h, split_kv=not a.no_split_kv)) for h in PRESETS.values()))
    return 0


if __name__ == "__main__":
    run(main)
