"""Batched autoregressive and self-speculative generation.

Every row of a batch carries its own position, so rows of different prompt lengths and different
accepted counts stay exact. Plain decoding is the speculation loop with gamma = 0."""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

import tp
from model import ModelArgs, Transformer

PREFILL_TOKENS = 8192  # tokens per prefill forward across the batch: bounds the score matrix


# ---------------------------------------------------------------------------------------- sampling
def logits_to_probs(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        srt, idx = torch.sort(logits, dim=-1, descending=True)
        p = srt.softmax(-1)
        drop = p.cumsum(-1) - p > top_p  # the mass before this token already exceeds top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), -float("inf"))
    return logits.softmax(-1)


def sample(weights: Tensor) -> Tensor:
    """One index per row, with probability proportional to the (unnormalised) `weights`:
    argmax w / E for E ~ Exp(1) needs no host sync. E = -log U, U in [0, 1), is never 0."""
    e = -torch.log(torch.rand_like(weights))
    return (weights / e).argmax(-1)


def speculative_accept(p: Tensor, q: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """The rejection rule. p: [B, g+1, V] target probs, q: [B, g, V] draft probs, d: [B, g] drafts.
    Accept d_i with prob min(1, p/q) until the first rejection, then sample the residual
    max(p - q, 0); if all g pass, sample p_{g+1}. -> (accepted count [B], next token [B])."""
    B, g = d.shape
    if g == 0:  # plain sampling
        return d.new_zeros(B), sample(p[:, 0])
    pd = p[:, :g].gather(-1, d[..., None])[..., 0]
    qd = q.gather(-1, d[..., None])[..., 0]
    ok = torch.rand_like(pd) * qd < pd
    a = ok.int().cumprod(-1).sum(-1)
    rows = torch.arange(B, device=d.device)
    pa = p[rows, a]
    qa = torch.cat((q, torch.zeros_like(q[:, :1])), 1)[rows, a]  # q = 0 after g: residual = p
    r = (pa - qa).clamp(min=0)
    r = torch.where(r.sum(-1, keepdim=True) > 0, r, pa)  # p == q up to rounding
    return a, sample(r)


def greedy_accept(logits: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """logits: [B, g+1, V], d: [B, g] -> (longest prefix of d equal to the argmax, next token)."""
    t = logits.argmax(-1)
    a = (d == t[:, :-1]).int().cumprod(-1).sum(-1)
    return a, t.gather(1, a[:, None])[:, 0]


# ------------------------------------------------------------------------------------------- steps
def draft_step(model, x, input_pos, draft, temperature, top_k, top_p):
    """x, input_pos: [B, T] -> (next token [B], its distribution [B, V] or None when greedy)."""
    logits = model(x, input_pos, draft=draft)[:, -1]
    if temperature == 0:
        return logits.argmax(-1), None
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    return sample(probs), probs


def verify_step(model, seq, input_pos, d, q, to_window, temperature, top_k, top_p):
    """seq: [B, g+1] = last committed token + g drafts -> (accepted count [B], next token [B])."""
    logits = model(seq, input_pos, to_window=to_window)
    if temperature == 0:
        return greedy_accept(logits, d)
    return speculative_accept(logits_to_probs(logits, temperature, top_k, top_p), q, d)


_compiled = {}


def compiled(fn, on: bool, device: torch.device):
    """One compiled graph per step function and shape (dynamic=False: a new shape is a new graph,
    never a dynamic one); CUDA graphs on GPU."""
    if not on:
        return fn
    if fn not in _compiled:
        mode = "reduce-overhead" if device.type == "cuda" else None
        _compiled[fn] = torch.compile(fn, mode=mode, fullgraph=True, dynamic=False)
    return _compiled[fn]


class Timer:
    """Phase times without host syncs: CUDA events are read once, at the end."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self, name):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append((name, e))
        else:
            self.marks.append((name, time.perf_counter()))

    def totals(self) -> dict:
        out = {}
        if self.cuda and self.marks:
            self.marks[-1][1].synchronize()
        for (name, t0), (_, t1) in zip(self.marks, self.marks[1:]):
            dt = t0.elapsed_time(t1) / 1e3 if self.cuda else t1 - t0
            out[name] = out.get(name, 0.0) + dt
        return out


# -------------------------------------------------------------------------------------- generation
def prefill(model, tokens: Tensor, n: Tensor):
    """Fill the caches with positions [0, n_b) of each row of `tokens` [B, L]."""
    B = tokens.shape[0]
    chunk = max(1, min(512, PREFILL_TOKENS // B))
    end = int(n.max())
    for s in range(0, end, chunk):
        e = min(s + chunk, end)
        pos = torch.arange(s, e, device=tokens.device).expand(B, -1)
        model(tokens[:, s:e], pos, kv_len=e, logits=False)  # slots past a row's n get pad: masked


AUTO_GAMMAS = (0, 1, 2, 3, 4, 6)  # what --gamma auto chooses from (each gamma is one verify graph)


def expected_tokens(alpha: float, gamma: int) -> float:
    """Tokens one verify step commits per row when each draft passes with probability alpha."""
    return gamma + 1.0 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


class AutoGamma:
    """--gamma auto: before each step, the gamma (0 = no speculation) with the most expected
    tokens per second, E(alpha, g) / (g * t_draft + t_verify(g)). alpha is the acceptance measured
    so far (successes / (successes + rejections), the geometric model's estimate); t_draft and
    t_verify(g) = v0 + v1 * g are fitted to this run's own step times, exponentially weighted so
    they follow the growing context. A few steps explore other gammas to keep the fit alive."""

    def __init__(self, gammas=AUTO_GAMMAS, decay=0.95, explore_every=16, group=None, device=None):
        self.gammas, self.decay, self.explore_every = gammas, decay, explore_every
        self.group, self.device = group, device  # a tensor-parallel group follows its first rank
        self.seed = [g for g in (1, 0, 2) if g in gammas]  # cheap first steps that spread the fit
        self.acc = [1.0, 1.0]  # successes, rejections (a uniform prior)
        self.t_draft = None
        self.fit = torch.zeros(5, dtype=torch.float64)  # weighted sums: w, wx, wy, wxx, wxy
        self.steps = 0
        self.used = {}

    def rates(self) -> dict[int, float]:
        alpha = self.acc[0] / sum(self.acc)
        w, wx, wy, wxx, wxy = self.fit.tolist()
        var = wxx * w - wx * wx
        v1 = max((wxy * w - wx * wy) / var, 0.0) if var > 1e-12 else 0.0
        v0 = (wy - v1 * wx) / w
        return {g: expected_tokens(alpha, g) / max(g * (self.t_draft or 0.0) + v0 + v1 * g, 1e-9)
                for g in self.gammas}

    def choose(self) -> int:
        if self.steps < len(self.seed):
            g = self.seed[self.steps]
        else:
            (g, best), (g2, second) = sorted(self.rates().items(), key=lambda kv: -kv[1])[:2]
            if self.steps % self.explore_every == 0 and second > 0.5 * best:  # refresh the fit
                g = g2
        if self.group is not None:  # ranks time differently but must run the same step
            t = torch.tensor([g], device=self.device)
            torch.distributed.broadcast(t, torch.distributed.get_global_rank(self.group, 0), self.group)
            g = int(t)
        self.used[g] = self.used.get(g, 0) + 1
        return g

    def update(self, g, t_draft, t_verify, accepted: list[int]):
        self.steps += 1
        self.fit *= self.decay
        self.fit += torch.tensor([1.0, g, t_verify, g * g, g * t_verify], dtype=torch.float64)
        if g:
            d = t_draft / g
            self.t_draft = d if self.t_draft is None else self.decay * self.t_draft + (1 - self.decay) * d
            self.acc[0] += sum(accepted)
            self.acc[1] += sum(a < g for a in accepted)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, gamma: int | str = 0,
             draft_model: Transformer | None = None, budget: int = 256, sink: int = 16,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_ids=(),
             compile: bool = False, prefilled: bool = False) -> tuple[list[list[int]], list[str], dict]:
    """Generate up to `max_new_tokens` per row. gamma = 0: plain decoding. gamma > 0 (or "auto":
    chosen per step, see AutoGamma): draft with `draft_model` (None: the model itself on a
    `budget`-slot window of `sink` sinks + recent positions; a separate model uses a window too
    when budget > 0, else its full cache). prefilled: the model's caches already hold these
    prompts from an earlier call (benchmarks reuse one prefill for many runs).
    -> (new tokens per row, finish reason per row, stats)."""
    device = model.tok_embeddings.weight.device
    auto = AutoGamma(group=getattr(model, "tp_group", None), device=device) if gamma == "auto" else None
    G = max(AUTO_GAMMAS) if auto else gamma  # the largest gamma a step may use
    B = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    if int(lens.min()) < 1:
        raise ValueError("every prompt needs at least one token")
    L = int(lens.max())
    tokens = torch.zeros(B, L, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    # verify writes up to G slots past the last committed position; rounding the cache up lets
    # calls of similar lengths share compiled graphs
    S = -(-(L + max_new_tokens + G) // 64) * 64
    self_draft = G > 0 and draft_model is None
    drafter = draft_model if G > 0 and not self_draft else model
    use_window = G > 0 and budget > 0
    if prefilled and (model.max_batch_size != B or model.max_seq_len < S):
        raise ValueError(f"prefilled caches hold {model.max_batch_size} rows of {model.max_seq_len} slots, "
                         f"this call needs {B} of {S}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    pos = lens - 1  # the last prompt token is not prefilled: it is the first step's pending token
    if not prefilled:
        model.setup_caches(B, S)
        prefill(model, tokens, pos)
    if drafter is not model:
        drafter.setup_caches(B, S)
        prefill(drafter, tokens, pos)
    if use_window:
        drafter.setup_window(budget, sink)
        drafter.fill_window(pos)
    sync()
    t_prefill = time.perf_counter() - t0
    dstep = compiled(draft_step, compile, device)
    vstep = compiled(verify_step, compile, device)
    sampling = (temperature, top_k, top_p)

    rows = torch.arange(B, device=device)
    cur = tokens[rows, pos]
    prev = tokens[rows, (pos - 1).clamp(min=0)]  # the token before `cur` (see the draft below)
    eos = torch.tensor(list(eos_ids) or [-1], device=device)
    out = torch.zeros(B, max_new_tokens + G + 2, dtype=torch.long, device=device)  # last col: trash
    n_out = torch.zeros(B, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    hit_eos = torch.zeros(B, dtype=torch.bool, device=device)
    # [live row-steps, drafts proposed to live rows, K/V slots read by the target, by the drafter]
    count = torch.zeros(4, dtype=torch.long, device=device)
    tried = torch.zeros(G, dtype=torch.long, device=device)  # draft i was judged (all before passed)
    passed = torch.zeros(G, dtype=torch.long, device=device)  # draft i was accepted
    idx_all = torch.arange(G + 1, device=device)
    timer = Timer(device)
    steps = n_draft = 0
    t0 = time.perf_counter()
    while steps < max_new_tokens:  # every step commits >= 1 token per live row
        steps += 1
        g = auto.choose() if auto else G
        n_draft += g
        t_step = time.perf_counter()
        timer.mark("draft")
        d, q = [], []
        if g > 0:
            # A separate model never saw its last drafted token when all g are accepted: it
            # re-reads the last committed token with the pending one (2 tokens, one shape).
            x, p = (cur[:, None], pos[:, None]) if self_draft else (
                torch.stack((prev, cur), 1), torch.stack((pos - 1, pos), 1).clamp(min=0))
            for i in range(g):
                t, pr = dstep(drafter, x, p, use_window, *sampling)
                count[3] += (p[:, -1] + 1).clamp(max=budget if use_window else S).sum()
                d.append(t.clone())
                if pr is not None:
                    q.append(pr.clone())
                x, p = d[-1][:, None], (pos + i + 1)[:, None]
        if auto:
            sync()
            t_verify = time.perf_counter()
        timer.mark("verify")
        idx = idx_all[: g + 1]
        d = torch.stack(d, 1) if g else cur.new_zeros(B, 0)
        q = torch.stack(q, 1) if q else None
        seq = torch.cat((cur[:, None], d), 1)
        a, t_new = vstep(model, seq, pos[:, None] + idx, d, q, self_draft and use_window, *sampling)
        a, t_new = a.clone(), t_new.clone()
        timer.mark("commit")
        # this step's new tokens: d_1..d_a then t_new, cut at EOS and at max_new_tokens
        cand = torch.cat((d, t_new[:, None]), 1).scatter(1, a[:, None], t_new[:, None])
        valid = (idx <= a[:, None]) & (idx < (max_new_tokens - n_out)[:, None]) & ~done[:, None]
        is_eos = (cand[..., None] == eos).any(-1) & valid
        valid &= is_eos.int().cumsum(1) - is_eos.int() == 0  # nothing after the first EOS
        out.scatter_(1, torch.where(valid, n_out[:, None] + idx, out.shape[1] - 1), cand)
        live = ~done
        count[0] += live.sum()
        count[1] += live.sum() * g
        count[2] += (pos + g + 1).sum()
        if g:
            tried[:g] += ((idx[:g] <= a[:, None]) & live[:, None]).sum(0)
            passed[:g] += ((idx[:g] < a[:, None]) & live[:, None]).sum(0)
        n_out += valid.sum(1)
        hit_eos |= is_eos.any(1)
        done |= hit_eos | (n_out >= max_new_tokens)
        # the token at the new pending position - 1: cur if nothing was accepted, else d_a
        prev = cur if g == 0 else torch.where(a == 0, cur, d.gather(1, (a - 1).clamp(min=0)[:, None])[:, 0])
        cur = torch.where(done, cur, t_new)
        pos = torch.where(done, pos, pos + a + 1)
        if bool(done.all()):  # the one host sync per step
            break
        if auto:
            now = time.perf_counter()
            auto.update(g, t_verify - t_step, now - t_verify, a[live].tolist())
    timer.mark("end")
    sync()
    t_decode = time.perf_counter() - t0

    n_out, out = n_out.tolist(), out.tolist()
    new = [out[i][: n_out[i]] for i in range(B)]
    reasons = ["eos" if e else "length" for e in hit_eos.tolist()]
    phases = timer.totals()
    row_steps, proposed, kv_t, kv_d = count.tolist()
    stats = {
        "generated_tokens": sum(n_out),
        "prefill_seconds": t_prefill,
        "decode_seconds": t_decode,
        "draft_seconds": phases.get("draft", 0.0),
        "verify_seconds": phases.get("verify", 0.0),
        "verify_steps": steps,
        "draft_forwards": n_draft,
        "row_steps": row_steps,  # live rows summed over steps
        "drafts_proposed": proposed,
        "drafts_tried": tried.tolist(),  # per draft position
        "drafts_accepted": passed.tolist(),
        # bytes every forward must read: weights + visible K/V (per rank under --tp)
        "bytes_read": (steps * param_bytes(model) + kv_t * kv_bytes_per_token(model)
                       + n_draft * param_bytes(drafter) + kv_d * kv_bytes_per_token(drafter)),
    }
    if auto:
        stats["gamma_used"] = dict(sorted(auto.used.items()))
    return new, reasons, summarize(stats)


def summarize(s: dict) -> dict:
    """Derived stats from the raw counts (kept separate so data-parallel groups can be merged)."""
    gen, tried, passed = s["generated_tokens"], s["drafts_tried"], s["drafts_accepted"]
    s |= {
        "seconds": s["prefill_seconds"] + s["decode_seconds"],
        "tokens_per_second": gen / s["decode_seconds"],  # decode throughput
        "bandwidth_gb_s": s["bytes_read"] / s["decode_seconds"] / 1e9,
        "mean_accepted": gen / max(s["row_steps"], 1),  # tokens committed per row per verify step
    }
    if tried:
        s["acceptance_rate"] = sum(passed) / max(s["drafts_proposed"], 1)
        # conditional: P(draft i accepted | the drafts before it were)
        s["acceptance_by_position"] = [p / max(t, 1) for p, t in zip(passed, tried)]
    return s


def merge_stats(parts: list[dict]) -> dict:
    """Stats of data-parallel groups that ran side by side: counts add up, times overlap."""
    if len(parts) == 1:
        return parts[0]
    m = {k: max(p[k] for p in parts) for k in
         ("prefill_seconds", "decode_seconds", "draft_seconds", "verify_seconds", "verify_steps")}
    m["draft_forwards"] = max(p["draft_forwards"] for p in parts)
    for k in ("generated_tokens", "row_steps", "drafts_proposed"):
        m[k] = sum(p[k] for p in parts)
    for k in ("drafts_tried", "drafts_accepted"):
        m[k] = [sum(x) for x in zip(*(p[k] for p in parts))]
    m["bytes_read"] = sum(p["bytes_read"] for p in parts) / len(parts)  # per rank, as in each part
    if "gamma_used" in parts[0]:
        used = sorted({g for p in parts for g in p["gamma_used"]})
        m["gamma_used"] = {g: sum(p["gamma_used"].get(g, 0) for p in parts) for g in used}
    return summarize(m)


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def kv_bytes_per_token(model) -> int:
    a = model.layers[0].attention
    return 2 * len(model.layers) * a.n_kv_heads * a.head_dim * a.kv_cache.k.element_size()


# --------------------------------------------------------------------------------------------- CLI
DEFAULT_PROMPT = "The old lighthouse keeper climbed the stairs one last time, and"


def read_prompts(args) -> list[str]:
    texts = list(args.prompt or [])
    for f in args.prompt_file or []:
        path = Path(f)
        if not path.is_file():
            raise ValueError(f"--prompt_file {f}: no such file")
        if path.suffix == ".jsonl":
            for i, line in enumerate(path.read_text().splitlines()):
                if line.strip():
                    try:
                        texts.append(json.loads(line)["text"])
                    except (ValueError, KeyError, TypeError):
                        raise ValueError(f"{f}:{i + 1}: expected a JSON object with a \"text\" field")
        else:
            texts.append(path.read_text())
    return texts or [DEFAULT_PROMPT]


def gamma_arg(v: str) -> int | str:
    return v if v == "auto" else int(v)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="converted checkpoint dir (default: the built-in SmolLM2-135M)")
    ap.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    ap.add_argument("--prompt_file", action="append", help=".txt: one prompt; .jsonl: one per line, field text")
    ap.add_argument("--prompt_len", type=int, help="cut each prompt to its first N tokens")
    ap.add_argument("--batch_size", type=int, help="rows, filled from the prompts in order, cycling")
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top_k", type=int, default=0, help="0 = off")
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--compile", action="store_true", help="compile the decode steps (CUDA graphs on GPU)")
    ap.add_argument("--json", help="write config, rows and stats to this file")
    ap.add_argument("--draft", choices=["none", "self"], default="self",
                    help="self: the model drafts on a windowed cache; none: plain decoding")
    ap.add_argument("--draft_checkpoint", help="draft with this model instead (same tokenizer)")
    ap.add_argument("--draft_budget", type=int, default=256,
                    help="draft KV slots: sink + recent window (0: a separate draft model's full cache)")
    ap.add_argument("--sink", type=int, default=16, help="attention-sink slots of the draft window")
    ap.add_argument("--gamma", type=gamma_arg, default=4,
                    help="tokens drafted per verification, or auto: chosen each step from measured "
                         f"acceptance and step times among {AUTO_GAMMAS} (0 = no speculation)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (under torchrun); the world "
                    "splits into WORLD_SIZE / tp data-parallel groups")
    return ap.parse_args(argv)


def check_args(args):
    if args.max_new_tokens < 1:
        raise ValueError("--max_new_tokens must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError("--batch_size must be >= 1")
    if args.prompt_len is not None and args.prompt_len < 1:
        raise ValueError("--prompt_len must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise ValueError("need --temperature >= 0, 0 < --top_p <= 1, --top_k >= 0")
    if args.draft == "none":
        return
    if args.gamma != "auto" and args.gamma < 1:
        raise ValueError(f"--gamma must be >= 1 or auto (got {args.gamma}); use --draft none for plain decoding")
    if args.sink < 0:
        raise ValueError("--sink must be >= 0")
    if args.draft_budget == 0 and args.draft_checkpoint is None:
        raise ValueError("--draft_budget 0 (a full draft cache) needs --draft_checkpoint; self-drafting needs a window")
    g = max(AUTO_GAMMAS) if args.gamma == "auto" else args.gamma
    if args.draft_budget and args.draft_budget - args.sink < g + 1:
        raise ValueError(f"--draft_budget {args.draft_budget} leaves fewer than gamma+1 = {g + 1} "
                         f"recent slots after --sink {args.sink}: need a budget >= {args.sink + g + 1}")


def read_checkpoint(path) -> tuple[ModelArgs, "Tokenizer"]:
    from tokenizer import load_tokenizer

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint {path}: no config.json there (make one with convert_checkpoint.py)")
    return ModelArgs.load(Path(path) / "config.json"), load_tokenizer(path)


def build_prompts(args, tok, ctx: int) -> list[list[int]]:
    prompts = []
    for t in read_prompts(args):
        ids = tok.encode(t)
        if args.prompt_len is not None:
            if len(ids) < args.prompt_len:
                raise ValueError(f"--prompt_len {args.prompt_len}: a prompt has only {len(ids)} tokens")
            ids = ids[: args.prompt_len]
        if not ids:
            raise ValueError("a prompt encodes to no tokens")
        if len(ids) + args.max_new_tokens > ctx:
            raise ValueError(f"a prompt of {len(ids)} tokens + --max_new_tokens {args.max_new_tokens} "
                             f"exceeds the model's context of {ctx} tokens")
        prompts.append(ids)
    B = args.batch_size or len(prompts)
    return [prompts[i % len(prompts)] for i in range(B)]


def main(argv=None):
    """Run the CLI; under torchrun every rank calls it and rank 0 returns (rows, stats)."""
    args = parse_args(argv)
    check_args(args)
    # everything that can be wrong with the input is checked before the process group exists,
    # identically on every rank, so a bad input stops all ranks instead of leaving some waiting
    world = tp.world_from_env(args.tp)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", world.local_rank)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.checkpoint is None:
        from convert_checkpoint import default_checkpoint

        args.checkpoint = str(default_checkpoint())
    cfg, tok = read_checkpoint(args.checkpoint)
    tp.check_split(cfg, args.tp)
    use_draft_model = args.draft_checkpoint is not None and args.draft != "none"
    if use_draft_model:
        dcfg, dtok = read_checkpoint(args.draft_checkpoint)
        tp.check_split(dcfg, args.tp)
        probe = "Speculation needs one vocabulary: 12 apples, naïve café, ½ €."
        if dcfg.vocab_size != cfg.vocab_size or dtok.encode(probe) != tok.encode(probe):
            raise ValueError(f"--draft_checkpoint {args.draft_checkpoint} has another vocabulary than "
                             f"{args.checkpoint} ({dcfg.vocab_size} vs {cfg.vocab_size} ids)")
    prompts = build_prompts(args, tok, cfg.max_seq_len)
    B = len(prompts)
    if B < world.dp_size:
        raise ValueError(f"{B} rows cannot feed {world.dp_size} data-parallel groups: raise --batch_size or --tp")

    tp.init(world, device)
    load = (lambda p: tp.load(p, world, device, dtype)) if args.tp > 1 else (
        lambda p: Transformer.from_checkpoint(p, device, dtype))
    model = load(args.checkpoint)
    draft_model = load(args.draft_checkpoint) if use_draft_model else None
    lo, hi = tp.split(B, world.dp_size, world.dp_rank)  # this group's rows
    gamma = 0 if args.draft == "none" else args.gamma
    kw = dict(gamma=gamma, draft_model=draft_model, budget=args.draft_budget, sink=args.sink,
              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              eos_ids=tok.eos_ids, compile=args.compile)
    if args.compile:  # compile (and record CUDA graphs) outside the timed run
        t0 = time.perf_counter()
        for g in AUTO_GAMMAS if gamma == "auto" else [gamma]:
            generate(model, prompts[lo:hi], min(args.max_new_tokens, 2 * g + 2), **(kw | {"gamma": g}))
        if world.rank == 0:
            print(f"compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    torch.manual_seed(args.seed + world.dp_rank)  # the ranks of a group draw the same numbers
    parts = tp.gather(generate(model, prompts[lo:hi], args.max_new_tokens, **kw), world)
    if parts is None:
        return None
    new = [n for p in parts for n in p[0]]
    reasons = [r for p in parts for r in p[1]]
    stats = merge_stats([p[2] for p in parts])
    rows = [{"prompt_tokens": len(p), "tokens": n, "text": tok.decode(n), "finish_reason": r}
            for p, n, r in zip(prompts, new, reasons)]
    for i, r in enumerate(rows):
        print(f"--- row {i} ({r['prompt_tokens']} prompt tokens, {len(r['tokens'])} new, {r['finish_reason']})")
        print("..." + tok.decode(prompts[i][-24:]) + r["text"])
    print(stats_line(stats, B))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "rows": rows, "stats": stats}, indent=1))
    return rows, stats


def stats_line(s: dict, B: int) -> str:
    line = (f"stats: B={B} {s['generated_tokens']} tokens in {s['seconds']:.2f} s | prefill "
            f"{s['prefill_seconds']:.2f} s | decode {s['decode_seconds']:.2f} s, "
            f"{s['tokens_per_second']:.1f} tok/s, {s['bandwidth_gb_s']:.1f} GB/s")
    if "acceptance_rate" in s:
        by_pos = " ".join(f"{x:.2f}" for x in s["acceptance_by_position"])
        line += (f" | {s['verify_steps']} verify steps, {s['mean_accepted']:.2f} tokens/step, "
                 f"acceptance {s['acceptance_rate']:.2f} [{by_pos}] | draft {s['draft_seconds']:.2f} s, "
                 f"verify {s['verify_seconds']:.2f} s")
    if "gamma_used" in s:
        line += " | gamma used " + " ".join(f"{g}:{n}" for g, n in s["gamma_used"].items() if n)
    return line


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
