"""Batched autoregressive and self-speculative generation.

Every row of a batch carries its own position, so rows of different prompt lengths and different
accepted counts stay exact, and a finished row can be refilled with the next prompt while the
others go on. Plain decoding is the speculation loop with gamma = 0."""
import argparse
import fcntl
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import Tensor

import tp
from model import BLOCK, ModelArgs, Transformer, UsageError, WindowCache, check_weights

AUTO_GAMMAS = (0, 1, 2, 3, 4, 6)  # what --gamma auto chooses from (each gamma is one verify graph)
PREFILL_TOKENS = 8192  # tokens per prefill forward across the batch: bounds the activations
PREFILL_SCORES = 1 << 28  # attention scores per prefill forward (B * heads * chunk * S): bounds the workspace
TOP_P_CANDIDATES = 1024  # --top_p sorts only this many of the largest logits (see nucleus)


# ------------------------------------------------------------------------- one home per formula
def max_gamma(gamma: int | str) -> int:
    """The largest gamma a run may use: --gamma auto may pick any of AUTO_GAMMAS."""
    return max(AUTO_GAMMAS) if gamma == "auto" else int(gamma)


def cache_len(max_len: int, gmax: int) -> int:
    """Slots per row of the full cache: a verify writes up to gmax slots past the last committed
    position; rounding up to a block lets runs of similar lengths share compiled graphs."""
    return -(-(max_len + gmax) // BLOCK) * BLOCK


def prefill_chunk(B: int, S: int, n_heads: int) -> int:
    """Tokens per row per prefill forward: shrinks with the context so that the [B, heads, chunk, S]
    attention scores stay under PREFILL_SCORES."""
    return max(1, min(512, PREFILL_TOKENS // B, PREFILL_SCORES // (B * n_heads * S)))


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def rows_of(prompts: list, B: int) -> list:
    """B rows filled from the prompts in order, cycling."""
    return [prompts[i % len(prompts)] for i in range(B)]


VOCAB_PROBE = "Speculation needs one vocabulary: 12 apples, naïve café, ½ €."


def check_same_vocab(tok, cfg: ModelArgs, dtok, dcfg: ModelArgs, what: str):
    if dcfg.vocab_size != cfg.vocab_size or dtok.encode(VOCAB_PROBE) != tok.encode(VOCAB_PROBE):
        raise UsageError(f"{what} has another vocabulary than the target ({dcfg.vocab_size} vs {cfg.vocab_size} ids)")


def read_prompt_file(path) -> list[tuple[int, dict]]:
    """(line number, record) per prompt: a .jsonl holds one JSON object a line with a string
    "text" (blank lines skipped); any other file is one prompt, its whole text."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"prompt file {path}: {getattr(e, 'strerror', None) or e}") from None
    if path.suffix != ".jsonl":
        return [(1, {"text": text})]
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except ValueError:
                raise UsageError(f"{path}:{i}: not JSON") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise UsageError(f'{path}:{i}: expected a JSON object with a string "text" field')
            out.append((i, rec))
    return out


# ---------------------------------------------------------------------------------------- memory
def memory_plan(cfg: ModelArgs, B: int, S: int, elem: int, *, tp_size: int = 1, gmax: int = 0,
                budget: int = 0, draft_cfg: ModelArgs | None = None, weights: int | None = None) -> dict:
    """Bytes one rank needs: weights, the full KV cache, the draft cache (a window, or a separate
    draft model's full cache), and the largest workspace (a prefill chunk's attention scores and
    activations, or a verify step's fp32 logits and probabilities)."""
    kvh = -(-cfg.n_kv_heads // tp_size)  # the busiest rank's whole KV-head groups
    dcfg = draft_cfg or cfg
    if weights is None:
        per_layer = cfg.dim * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * cfg.dim \
            + 3 * cfg.dim * cfg.intermediate_size
        weights = (cfg.n_layers * per_layer + cfg.vocab_size * cfg.dim * (1 + (not cfg.tie_embeddings))) * elem // tp_size
    draft_slots = budget if budget else (S if draft_cfg is not None else 0)
    chunk = prefill_chunk(B, S, cfg.n_heads)
    heads = -(-cfg.n_heads // tp_size)
    prefill = B * chunk * (2 * heads * S * 4 + (6 * cfg.dim + 3 * cfg.intermediate_size) * elem)
    vocab = -(-cfg.vocab_size // tp_size)
    verify = 4 * B * (gmax + 1) * vocab * 4  # logits, probabilities, random numbers, residual
    return {"weights": weights, "kv_cache": B * S * cfg.kv_bytes_per_token(elem, kvh),
            "draft_cache": B * draft_slots * dcfg.kv_bytes_per_token(elem, -(-dcfg.n_kv_heads // tp_size)),
            "workspace": max(prefill, verify)}


def free_memory(device: torch.device) -> int:
    """Bytes a new allocation may take: free GPU memory plus what torch's allocator holds unused,
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
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(plan, B: int, device: torch.device, resident: int = 0):
    """Refuse, in one line, a batch whose plan (B -> memory_plan) does not fit: `resident` bytes
    of it are allocated already (loaded weights, caches that will be reused or freed). Keeps 5%
    for what no plan counts."""
    have = 0.95 * (free_memory(device) + resident)
    need = plan(B)
    if sum(need.values()) <= have:
        return
    lo, hi = 0, B  # the largest batch that fits: plan(lo) fits, plan(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if sum(plan(mid).values()) <= have else (lo, mid)
    gb = lambda n: f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"
    raise UsageError(f"batch {B} needs {gb(sum(need.values()))} per rank (" + ", ".join(
        f"{k.replace('_', ' ')} {gb(v)}" for k, v in need.items() if v) + f") but {device.type} has {gb(have)} "
        f"free: " + (f"the largest batch that fits is {lo}" if lo else "not even one row fits"))


# -------------------------------------------------------------------------------------- sampling
def nucleus(logits: Tensor, vocab: tp.Vocab, top_p: float, full_sort=False) -> tuple[Tensor, Tensor]:
    """Mask all but the smallest set of largest logits whose probability reaches top_p (ties at the
    boundary kept). Sorts only the TOP_P_CANDIDATES largest: exact whenever they hold the nucleus,
    which `covered` (a bool tensor) says; full_sort sorts the whole vocabulary instead."""
    k = vocab.n if full_sort else min(TOP_P_CANDIDATES, vocab.n)
    vals = vocab.gather(logits).sort(-1, descending=True).values if full_sort else vocab.topk(logits, k)
    m = vals[..., :1]
    p = (vals - m).exp() / vocab.sum((logits - m).exp())[..., None]
    cum = p.cumsum(-1)
    n = (cum - p < top_p).sum(-1, keepdim=True)  # kept: the mass before them is below top_p
    covered = torch.tensor(True, device=logits.device) if full_sort else (cum[..., -1] >= top_p).all()
    return logits.masked_fill(logits < vals.gather(-1, n - 1), -math.inf), covered


def logits_to_probs(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                    vocab: tp.Vocab | None = None, full_sort=False) -> tuple[Tensor, Tensor | None]:
    """-> (probabilities over this rank's vocabulary slice, top_p's `covered` or None)."""
    vocab = vocab or tp.Vocab(logits.shape[-1])
    logits = logits.float() / temperature
    if top_k and top_k < vocab.n:
        logits = logits.masked_fill(logits < vocab.topk(logits, top_k)[..., -1:], -math.inf)
    covered = None
    if top_p < 1.0:
        logits, covered = nucleus(logits, vocab, top_p, full_sort)
    e = (logits - vocab.max(logits)[..., None]).exp()
    return e / vocab.sum(e)[..., None], covered


def sample(weights: Tensor, vocab: tp.Vocab | None = None) -> Tensor:
    """One index per row, with probability proportional to the (unnormalised) `weights`:
    argmax w / E for E ~ Exp(1) needs no host sync. E = -log U, U in [0, 1), is never 0. Every
    rank draws the whole vocabulary's U from the shared seed and uses its slice, so the token is
    the same on any number of ranks."""
    vocab = vocab or tp.Vocab(weights.shape[-1])
    return vocab.argmax(weights / -torch.log(vocab.rand(weights)))


def speculative_accept(p: Tensor, q: Tensor, d: Tensor, vocab: tp.Vocab | None = None) -> tuple[Tensor, Tensor]:
    """The rejection rule. p: [B, g+1, V] target probs, q: [B, g, V] draft probs, d: [B, g] drafts.
    Accept d_i with prob min(1, p/q) until the first rejection, then sample the residual
    max(p - q, 0); if all g pass, sample p_{g+1}. -> (accepted count [B], next token [B])."""
    vocab = vocab or tp.Vocab(p.shape[-1])
    B, g = d.shape
    if g == 0:  # plain sampling
        return d.new_zeros(B), sample(p[:, 0], vocab)
    pd, qd = vocab.pick(p[:, :g], d), vocab.pick(q, d)
    ok = torch.rand_like(pd) * qd < pd
    a = ok.int().cumprod(-1).sum(-1)
    rows = torch.arange(B, device=d.device)
    pa = p[rows, a]
    qa = torch.cat((q, torch.zeros_like(q[:, :1])), 1)[rows, a]  # q = 0 after g: residual = p
    r = (pa - qa).clamp(min=0)
    r = torch.where(vocab.sum(r)[:, None] > 0, r, pa)  # p == q up to rounding
    return a, sample(r, vocab)


def greedy_accept(logits: Tensor, d: Tensor, vocab: tp.Vocab | None = None) -> tuple[Tensor, Tensor]:
    """logits: [B, g+1, V], d: [B, g] -> (longest prefix of d equal to the argmax, next token)."""
    t = (vocab or tp.Vocab(logits.shape[-1])).argmax(logits)
    a = (d == t[:, :-1]).int().cumprod(-1).sum(-1)
    return a, t.gather(1, a[:, None])[:, 0]


# ----------------------------------------------------------------------------------------- steps
@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0


def draft_step(model, vocab, x, input_pos, draft: bool, flex: bool, s: Sampling):
    """x, input_pos: [B, T] -> (next token [B], its distribution [B, V] or None when greedy)."""
    logits = model(x, input_pos, draft=draft, flex=flex)[:, -1]
    if s.temperature == 0:
        return vocab.argmax(logits), None
    probs, _ = logits_to_probs(logits, s.temperature, s.top_k, s.top_p, vocab)  # a truncated nucleus
    return sample(probs, vocab), probs  # is still a valid proposal: the draft need not be exact


def verify_step(model, vocab, seq, input_pos, d, q, to_draft: bool, flex: bool, s: Sampling, full_sort=False):
    """seq: [B, g+1] = pending token + g drafts -> (accepted count [B], next token [B], covered)."""
    logits = model(seq, input_pos, to_draft=to_draft, flex=flex)
    if s.temperature == 0:
        return *greedy_accept(logits, d, vocab), None
    p, covered = logits_to_probs(logits, s.temperature, s.top_k, s.top_p, vocab, full_sort)
    return *speculative_accept(p, q, d, vocab), covered


_compiled, _graphs = {}, {}


def compiled(fn, device: torch.device, graphs: int, tensor_parallel=False):
    """torch.compile(fn) once per (function, device type, mode): one graph per shape
    (dynamic=False), CUDA graphs on GPU. Past Dynamo's recompile limit fullgraph=True is a hard
    error, so the limit is raised to the graphs this process has asked for."""
    import torch._dynamo.config as dc

    mode = "reduce-overhead" if device.type == "cuda" else None
    key = (fn, device.type, mode)
    if key not in _compiled:
        _compiled[key] = torch.compile(fn, mode=mode, fullgraph=True, dynamic=False)
    _graphs[fn] = _graphs.get(fn, 0) + graphs
    for name, n in (("recompile_limit", max(_graphs.values())), ("cache_size_limit", max(_graphs.values())),
                    ("accumulated_recompile_limit", sum(_graphs.values())),
                    ("accumulated_cache_size_limit", sum(_graphs.values()))):
        if getattr(dc, name, n) < n:
            setattr(dc, name, n)
    if tensor_parallel and mode:  # CUDA-graph trees and speculation under TP: gpt-fast's workaround
        torch._inductor.config.triton.cudagraph_trees = False
    return _compiled[key]


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------ --gamma auto
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


# ------------------------------------------------------------------------------------- generation
@dataclass
class Request:
    tokens: list[int]
    max_new_tokens: int
    id: object = None


@dataclass
class Result:
    id: object
    prompt_tokens: int
    tokens: list[int]
    finish_reason: str  # "eos" | "length"
    accepted: int  # drafts of this prompt the target accepted
    steps: int  # verify steps while this prompt was decoding


@dataclass
class Counters:
    """Raw counts of a run (device tensors while it runs), kept apart from the derived stats so
    that data-parallel groups can be merged."""
    generated: Tensor  # tokens committed
    row_steps: Tensor  # live rows summed over verify steps
    drafts_proposed: Tensor  # drafts proposed to live rows
    kv_read: Tensor  # K/V slots read by the target's forwards
    draft_kv_read: Tensor  # ... and by the drafter's
    drafts_tried: Tensor  # [gmax] draft i was judged (all before it passed)
    drafts_accepted: Tensor  # [gmax] draft i was accepted


class Decoder:
    """B rows of decoding state over static caches: the model's full cache of cache_len(max_len)
    slots per row and the drafter's cache. Rows are independent: `run` prefills rows in place as
    prompts arrive and steps all rows together with fixed shapes ([B, 1] drafts, [B, g+1]
    verifies), so compiled graphs and CUDA graphs are reused by every refill.

    gamma: drafts per verification (0: plain decoding; "auto": chosen per step, see AutoGamma).
    draft_model: None drafts with the model itself on a WindowCache of `budget` slots, `sink` of
    them attention sinks; a separate model of the same vocabulary drafts on such a window too
    (budget > 0, prefilled straight into it) or on its own full cache (budget 0)."""

    def __init__(self, model: Transformer, batch_size: int, max_len: int, max_new_tokens: int, *,
                 gamma: int | str = 0, draft_model: Transformer | None = None, budget: int = 256, sink: int = 16,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_ids=(), compile: bool = False,
                 attention: str | None = None):
        self.model, self.B = model, batch_size
        self.device = dev = model.tok_embeddings.weight.device
        self.vocab = getattr(model, "vocab", None) or tp.Vocab(model.args.vocab_size)
        group = getattr(model, "tp_group", None)
        self.auto = AutoGamma(group=group, device=dev) if gamma == "auto" else None
        self.gmax = max_gamma(gamma)
        self.gammas = AUTO_GAMMAS if self.auto else (self.gmax,)
        self.S = cache_len(max_len, self.gmax)
        self.self_draft = self.gmax > 0 and draft_model is None
        self.drafter = draft_model if self.gmax > 0 and not self.self_draft else model
        self.use_window = self.gmax > 0 and budget > 0
        self.budget, self.sink = budget, sink
        self.sampling = Sampling(temperature, top_k, top_p)
        # the one place the attention backend is chosen (see model.attend): FlexAttention when compiled,
        # SDPA when eager (eager FlexAttention materialises the scores); `attention` overrides it
        attention = attention or ("flex" if compile else "sdpa")
        if attention not in ("flex", "sdpa"):
            raise UsageError(f"attention {attention!r}: flex or sdpa")
        self.flex = attention == "flex"
        self.compile = compile

        # memory: refuse before allocating
        elem = model.tok_embeddings.weight.element_size()
        held = lambda m: sum(b.nbytes for b in m.buffers()) if m is not None else 0
        weights = param_bytes(model) + (param_bytes(draft_model) if self.drafter is not model else 0)
        plan = lambda b: memory_plan(model.args, b, self.S, elem, tp_size=tp_size(model), gmax=self.gmax,
                                     budget=budget if self.use_window else 0,
                                     draft_cfg=draft_model.args if self.drafter is not model else None, weights=weights)
        check_memory(plan, batch_size, dev, weights + held(model) + (held(draft_model) if draft_model else 0))

        model.setup_caches(batch_size, self.S)
        if self.drafter is not model:
            self.drafter.setup_caches(batch_size, self.S, full=not self.use_window)
        if self.use_window:
            self.drafter.setup_draft_cache(WindowCache, sink=sink, window=budget - sink)  # <- a draft strategy
        B, gmax = batch_size, self.gmax
        z = lambda *s, dt=torch.long: torch.zeros(*s, dtype=dt, device=dev)
        self.cur, self.prev, self.pos = z(B), z(B), z(B)  # pending token, the token before, its position
        self.limit, self.n_out = z(B), z(B)
        self.out = z(B, max_new_tokens + gmax + 2)  # last column: trash
        self.done = torch.ones(B, dtype=torch.bool, device=dev)  # an empty row is done
        self.hit_eos = z(B, dt=torch.bool)
        self.row_acc, self.row_steps = z(B), z(B)
        self.eos = torch.tensor(list(eos_ids) or [-1], device=dev)
        self.idx = torch.arange(gmax + 1, device=dev)
        self.c = Counters(z(()), z(()), z(()), z(()), z(()), z(gmax), z(gmax))
        self.timer = Timer(dev)
        self.steps = self.draft_forwards = self.prompts_done = 0
        self.prefill_seconds = self.decode_seconds = self.compile_seconds = 0.0
        self.compiled_graphs = 0
        tpar = group is not None
        n_draft = 2 if (self.gmax and not self.self_draft) else 1  # a separate draft's first forward: 2 tokens
        self.dstep = compiled(draft_step, dev, n_draft, tpar) if compile else draft_step
        self.vstep = compiled(verify_step, dev, len(self.gammas), tpar) if compile else verify_step
        self.warmed = False

    # ---- set-up: compile, prefill
    @torch.no_grad()
    def warm_up(self):
        """Compile (and on CUDA record) every graph this run will use, by running its steps on its
        own buffers and shapes before any prompt arrives. The rows sit at their last slots, past
        any prompt, so a prefill done (prefilled runs) or to come keeps its own; nothing commits."""
        if not self.compile or self.warmed:
            return
        self.warmed = True
        sync(self.device)
        t0, n0 = time.perf_counter(), unique_graphs()
        self.pos.fill_(self.S - 1 - self.gmax)
        for _ in range(3 if self.device.type == "cuda" else 1):  # CUDA graphs record on a later call
            for g in self.gammas:
                self.speculate(g)
        sync(self.device)
        self.compile_seconds = time.perf_counter() - t0
        self.compiled_graphs = unique_graphs() - n0
        self.c.draft_kv_read.zero_()
        self.timer = Timer(self.device)

    def prefill(self, rows: slice, reqs: list[Request], prefilled=False):
        """Prefill `rows` (a slice of the batch) with these prompts and make them live."""
        dev, n = self.device, len(reqs)
        lens = torch.tensor([len(r.tokens) for r in reqs], device=dev)
        tokens = torch.zeros(n, int(lens.max()), dtype=torch.long, device=dev)
        for i, r in enumerate(reqs):
            tokens[i, : len(r.tokens)] = torch.tensor(r.tokens)
        pos = lens - 1  # the last prompt token is not prefilled: it is the first step's pending token
        if not prefilled:
            prefill(self.model, tokens, pos, rows, self.S)
        if self.drafter is not self.model:
            if self.use_window:  # a separate draft model prefills straight into its window
                self.drafter.fill_draft_cache(pos, rows)  # (emptied first)
                prefill(self.drafter, tokens, pos, rows, self.budget - self.sink, draft=True)
            else:
                prefill(self.drafter, tokens, pos, rows, self.S)
        elif self.use_window:
            self.drafter.fill_draft_cache(pos, rows)
        ar = torch.arange(n, device=dev)
        self.cur[rows], self.prev[rows], self.pos[rows] = tokens[ar, pos], tokens[ar, (pos - 1).clamp(min=0)], pos
        self.limit[rows] = torch.tensor([r.max_new_tokens for r in reqs], device=dev)
        for t in (self.n_out, self.row_acc, self.row_steps):
            t[rows] = 0
        self.done[rows] = self.hit_eos[rows] = False

    # ---- one speculation step: draft, verify, accept, commit
    def speculate(self, g: int, full_sort=False):
        """Draft g tokens and verify them (g = 0: one plain decoding step); commits nothing.
        -> (drafts [B, g], their distributions or None, accepted count [B], next token [B], covered)."""
        s, B, cur, pos = self.sampling, self.B, self.cur, self.pos
        self.timer.mark("draft")
        d, q = [], []
        if g:
            # A separate model never saw its last drafted token when all g were accepted: it
            # re-reads the token before the pending one with it (2 tokens, one more graph).
            x, x_pos = (cur[:, None], pos[:, None]) if self.self_draft else (
                torch.stack((self.prev, cur), 1), torch.stack((pos - 1, pos), 1).clamp(min=0))
            for i in range(g):
                t, probs = self.dstep(self.drafter, self.vocab, x, x_pos, self.use_window, self.flex, s)
                self.c.draft_kv_read += (x_pos[:, -1] + 1).clamp(max=self.budget if self.use_window else self.S).sum()
                d.append(t.clone())
                if probs is not None:
                    q.append(probs.clone())
                x, x_pos = d[-1][:, None], (pos + i + 1)[:, None]
        if self.auto:
            sync(self.device)
            self.t_verify = time.perf_counter()
        self.timer.mark("verify")
        d = torch.stack(d, 1) if g else cur.new_zeros(B, 0)
        q = torch.stack(q, 1) if q else None
        seq, seq_pos = torch.cat((cur[:, None], d), 1), pos[:, None] + self.idx[: g + 1]
        vstep = verify_step if full_sort else self.vstep  # the rare exact redo runs eagerly
        a, t_new, covered = vstep(self.model, self.vocab, seq, seq_pos, d, q, self.self_draft and self.use_window,
                                  self.flex and not full_sort, s, full_sort)
        self.timer.mark("commit")
        return d, q, a.clone(), t_new.clone(), covered

    def step(self) -> list[int]:
        """Advance every live row by one verify step; -> the rows that finished in it. The one host
        sync is reading which rows finished (--gamma auto adds the two its step timings need)."""
        g = self.auto.choose() if self.auto else self.gmax
        self.steps += 1
        self.draft_forwards += g
        t_step, live = time.perf_counter(), ~self.done
        d, q, a, t_new, covered = self.speculate(g)
        new = self.commit(g, d, a, t_new)
        if covered is None:
            finished = (new[4] & live).tolist()
        else:  # top_p: one read of both flags
            *finished, ok = torch.cat(((new[4] & live), covered[None])).tolist()
            if not ok:  # the nucleus outgrew the candidates: redo the step with a full sort (rare). The
                self.draft_forwards += g  # drafts are drawn afresh: ones kept because they led here are biased
                d, q, a, t_new, _ = self.speculate(g, full_sort=True)
                new = self.commit(g, d, a, t_new)
                finished = (new[4] & live).tolist()
        n_before = self.n_out.sum()
        self.prev, self.cur, self.pos, self.n_out, self.done, self.hit_eos = new
        self.count(g, a, live, n_before)
        if self.auto:
            self.auto.update(g, self.t_verify - t_step, time.perf_counter() - self.t_verify, a[live].tolist())
        return [i for i, f in enumerate(finished) if f]

    def commit(self, g: int, d: Tensor, a: Tensor, t_new: Tensor) -> tuple:
        """Per row: this step's new tokens d_1..d_a then t_new, cut at EOS and at the row's limit,
        appended to `out`; -> the new (prev, cur, pos, n_out, done, hit_eos). Rejected cache slots
        are simply overwritten later: nothing to roll back."""
        idx, n_out, done = self.idx[: g + 1], self.n_out, self.done
        cand = torch.cat((d, t_new[:, None]), 1).scatter(1, a[:, None], t_new[:, None])
        valid = (idx <= a[:, None]) & (idx < (self.limit - n_out)[:, None]) & ~done[:, None]
        is_eos = (cand[..., None] == self.eos).any(-1) & valid
        valid &= is_eos.int().cumsum(1) - is_eos.int() == 0  # nothing after the first EOS
        self.out.scatter_(1, torch.where(valid, n_out[:, None] + idx, self.out.shape[1] - 1), cand)
        n_out = n_out + valid.sum(1)
        hit_eos = self.hit_eos | is_eos.any(1)
        new_done = done | hit_eos | (n_out >= self.limit)
        # the token at the new pending position - 1: cur if nothing was accepted, else d_a
        prev = self.cur if g == 0 else torch.where(a == 0, self.cur, d.gather(1, (a - 1).clamp(min=0)[:, None])[:, 0])
        cur = torch.where(new_done, self.cur, t_new)
        pos = torch.where(new_done, self.pos, self.pos + a + 1)
        return prev, cur, pos, n_out, new_done, hit_eos

    def count(self, g: int, a: Tensor, live: Tensor, n_before: Tensor):
        c, idx = self.c, self.idx[:g]
        c.generated += self.n_out.sum() - n_before
        c.row_steps += live.sum()
        c.drafts_proposed += live.sum() * g
        c.kv_read += (self.pos + g + 1).sum()
        self.row_steps += live
        self.row_acc += torch.where(live, a, 0)
        if g:
            c.drafts_tried[:g] += ((idx <= a[:, None]) & live[:, None]).sum(0)
            c.drafts_accepted[:g] += ((idx < a[:, None]) & live[:, None]).sum(0)

    def results(self, rows: list[int], reqs: list[Request]) -> list[Result]:
        n = self.n_out[rows].tolist()
        out, eos = self.out[rows].tolist(), self.hit_eos[rows].tolist()
        acc, steps = self.row_acc[rows].tolist(), self.row_steps[rows].tolist()
        return [Result(r.id, len(r.tokens), out[i][: n[i]], "eos" if eos[i] else "length", acc[i], steps[i])
                for i, r in enumerate(reqs)]

    # ---- the loop
    @torch.no_grad()
    def run(self, requests: Iterable[Request], prefilled=False) -> Iterator[Result]:
        """Decode every request, refilling finished rows from the iterator; yields each result as
        its row finishes (so in order of finishing, not of arrival). prefilled: the full cache
        already holds the first B prompts (a benchmark times many runs on one slow prefill)."""
        self.warm_up()
        it = iter(requests)
        slot: list[Request | None] = [None] * self.B

        def take(n):
            got = []
            for r in it:
                if len(r.tokens) < 1 or len(r.tokens) + r.max_new_tokens > self.S - self.gmax or r.max_new_tokens < 1:
                    raise UsageError(f"request {r.id!r}: {len(r.tokens)} prompt tokens + {r.max_new_tokens} new "
                                     f"do not fit this decoder's {self.S - self.gmax} positions per row")
                if r.max_new_tokens + self.gmax + 2 > self.out.shape[1]:
                    raise UsageError(f"request {r.id!r}: max_new_tokens {r.max_new_tokens} is above the decoder's "
                                     f"{self.out.shape[1] - self.gmax - 2}")
                got.append(r)
                if len(got) == n:
                    break
            return got

        def fill(rows: slice, reqs, prefilled=False) -> float:
            sync(self.device)
            t0 = time.perf_counter()
            self.prefill(rows, reqs, prefilled)
            sync(self.device)
            slot[rows] = reqs
            self.prefill_seconds += time.perf_counter() - t0
            return time.perf_counter() - t0

        first = take(self.B)
        if first:  # one batched prefill for the first rows
            fill(slice(0, len(first)), first, prefilled)
        t0, refills = time.perf_counter(), 0.0
        while any(r is not None for r in slot):
            finished = self.step()
            if finished:
                for res in self.results(finished, [slot[i] for i in finished]):
                    self.prompts_done += 1
                    yield res
                for i in finished:
                    slot[i] = None
                    nxt = take(1)
                    if nxt:
                        refills += fill(slice(i, i + 1), nxt)
        self.timer.mark("end")
        sync(self.device)
        self.decode_seconds += time.perf_counter() - t0 - refills

    def stats(self) -> dict:
        """Raw counts and times of everything this decoder ran; see summarize for the derived ones."""
        c, phases = self.c, self.timer.totals()
        tried, passed = c.drafts_tried.tolist(), c.drafts_accepted.tolist()
        kv, kv_d = int(c.kv_read), int(c.draft_kv_read)
        m, dm = self.model, self.drafter
        kvb = lambda x: x.args.kv_bytes_per_token(x.tok_embeddings.weight.element_size(),
                                                  x.layers[0].attention.n_kv_heads)
        s = {
            "prompts": self.prompts_done,
            "generated_tokens": int(c.generated),
            "prefill_seconds": self.prefill_seconds,
            "decode_seconds": self.decode_seconds,
            "draft_seconds": phases.get("draft", 0.0),
            "verify_seconds": phases.get("verify", 0.0),
            "verify_steps": self.steps,
            "draft_forwards": self.draft_forwards,
            "row_steps": int(c.row_steps),
            "drafts_proposed": int(c.drafts_proposed),
            "drafts_tried": tried if self.gmax else [],
            "drafts_accepted": passed if self.gmax else [],
            # bytes every forward must read: weights + visible K/V (per rank under --tp)
            "bytes_read": (self.steps * param_bytes(m) + kv * kvb(m) + self.draft_forwards * param_bytes(dm)
                           + kv_d * kvb(dm)),
            "compiled_graphs": self.compiled_graphs,
            "compile_seconds": self.compile_seconds,
            "attention": "flex" if self.flex else "sdpa",
        }
        if self.auto:
            s["gamma_used"] = dict(sorted(self.auto.used.items()))
        return s


def tp_size(model) -> int:
    g = getattr(model, "tp_group", None)
    return 1 if g is None else torch.distributed.get_world_size(g)


def prefill(model: Transformer, tokens: Tensor, n: Tensor, rows: slice, S: int, draft=False):
    """Fill `rows`' caches with positions [0, n_b) of each row of `tokens` [B', L], in chunks
    (of at most S slots: a draft window must not wrap within one forward)."""
    B = tokens.shape[0]
    chunk = min(prefill_chunk(B, S, model.args.n_heads), S)
    end = int(n.max())
    for s in range(0, end, chunk):
        e = min(s + chunk, end)
        pos = torch.arange(s, e, device=tokens.device).expand(B, -1)
        # slots past a row's n get its padding: masked, and overwritten before they are read
        model(tokens[:, s:e], pos, draft=draft, rows=rows, kv_len=None if draft else e, logits=False)


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
            if name != "end":
                out[name] = out.get(name, 0.0) + (t0.elapsed_time(t1) / 1e3 if self.cuda else t1 - t0)
        return out


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int | list[int], *,
             gamma: int | str = 0, draft_model: Transformer | None = None, budget: int = 256, sink: int = 16,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_ids=(), compile: bool = False,
             attention: str | None = None, prefilled: bool = False) -> tuple[list[list[int]], list[str], dict]:
    """One static batch: a row per prompt, up to `max_new_tokens` new tokens each (one limit, or
    one per prompt); see Decoder for the rest. prefilled: the model's full cache already holds
    these prompts from an earlier call with the same rows and cache size (benchmarks time many
    runs on one prefill). -> (new tokens per row, finish reason per row, stats)."""
    limits = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompts)
    if not prompts or min(map(len, prompts)) < 1:
        raise UsageError("every prompt needs at least one token")
    if min(limits) < 1:
        raise UsageError("max_new_tokens must be >= 1")
    max_len = max(len(p) + n for p, n in zip(prompts, limits))
    if prefilled:  # keep the prefilled cache when it is large enough: it was sized for the largest gamma
        if model.batch_size != len(prompts) or model.max_seq_len < cache_len(max_len, max_gamma(gamma)):
            raise UsageError(f"prefilled caches hold {model.batch_size} rows of {model.max_seq_len} slots, this "
                             f"call needs {len(prompts)} of {cache_len(max_len, max_gamma(gamma))}")
        max_len = model.max_seq_len - max_gamma(gamma)  # then cache_len(max_len, gamma) is the cache's size
    dec = Decoder(model, len(prompts), max_len, max(limits), gamma=gamma, draft_model=draft_model, budget=budget,
                  sink=sink, temperature=temperature, top_k=top_k, top_p=top_p, eos_ids=eos_ids, compile=compile,
                  attention=attention)
    res = sorted(dec.run([Request(p, n, i) for i, (p, n) in enumerate(zip(prompts, limits))], prefilled),
                 key=lambda r: r.id)
    return [r.tokens for r in res], [r.finish_reason for r in res], summarize(dec.stats())


def summarize(s: dict) -> dict:
    """Derived stats from the raw counts (kept separate so data-parallel groups can be merged)."""
    gen, tried, passed = s["generated_tokens"], s["drafts_tried"], s["drafts_accepted"]
    s |= {
        "seconds": s["prefill_seconds"] + s["decode_seconds"],
        "tokens_per_second": gen / max(s["decode_seconds"], 1e-9),  # decode throughput
        "bandwidth_gb_s": s["bytes_read"] / max(s["decode_seconds"], 1e-9) / 1e9,
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
        return summarize(parts[0])
    m = {k: max(p[k] for p in parts) for k in ("prefill_seconds", "decode_seconds", "draft_seconds",
                                                "verify_seconds", "verify_steps", "draft_forwards",
                                                "compiled_graphs", "compile_seconds")}
    for k in ("prompts", "generated_tokens", "row_steps", "drafts_proposed"):
        m[k] = sum(p[k] for p in parts)
    for k in ("drafts_tried", "drafts_accepted"):
        m[k] = [sum(x) for x in zip(*(p[k] for p in parts))]
    m["bytes_read"] = sum(p["bytes_read"] for p in parts) / len(parts)  # per rank, as in each part
    m["attention"] = parts[0]["attention"]
    if "gamma_used" in parts[0]:
        used = sorted({g for p in parts for g in p["gamma_used"]})
        m["gamma_used"] = {g: sum(p["gamma_used"].get(g, 0) for p in parts) for g in used}
    return summarize(m)


# --------------------------------------------------------------------------------------------- CLI
DEFAULT_PROMPT = "The old lighthouse keeper climbed the stairs one last time, and"


class ArgParser(argparse.ArgumentParser):
    """argparse whose mistakes are UsageErrors: one `error: ...` line and exit 2, like the rest."""

    def error(self, message):
        raise UsageError(message)


def cli(main):
    """Run a script's main(): a UsageError becomes one `error: ...` line (rank 0 only) and exit 2."""
    try:
        code = main()
    except UsageError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        code = 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    sys.exit(code if isinstance(code, int) else 0)


def gamma_arg(v: str) -> int | str:
    try:
        return v if v == "auto" else int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid gamma {v!r} (an integer or auto)") from None


def parse_args(argv=None):
    ap = ArgParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="converted checkpoint dir (default: the built-in SmolLM2-135M)")
    ap.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    ap.add_argument("--prompt_file", action="append",
                    help=".jsonl: one JSON object a line with \"text\" (and optionally \"id\", \"max_new_tokens\"); "
                         "other files: the whole file is one prompt")
    ap.add_argument("--prompt_len", type=int, help="cut each prompt to its first N tokens")
    ap.add_argument("--batch_size", type=int, help="rows; without --output filled from the prompts in order, cycling "
                                                   "(default: one row per prompt); with --output: rows refilled as "
                                                   "prompts finish (default: min(prompts, 32))")
    ap.add_argument("--max_new_tokens", type=int, default=128, help="per prompt (a .jsonl line may override it)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top_k", type=int, default=0, help="0 = off")
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--compile", action="store_true", help="compile the decode steps (CUDA graphs on GPU)")
    ap.add_argument("--json", help="write config, rows and stats to this file")
    ap.add_argument("--output", help="stream every prompt through --batch_size refilled rows and append one JSON "
                                     "line per prompt to this .jsonl file as it finishes")
    ap.add_argument("--resume", action="store_true", help="with --output: skip the prompts already in it")
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
        raise UsageError("--max_new_tokens must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch_size must be >= 1")
    if args.prompt_len is not None and args.prompt_len < 1:
        raise UsageError("--prompt_len must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise UsageError("need --temperature >= 0, 0 < --top_p <= 1, --top_k >= 0")
    if args.resume and not args.output:
        raise UsageError("--resume needs --output")
    if args.draft == "none":
        return
    if args.gamma != "auto" and args.gamma < 1:
        raise UsageError(f"--gamma must be >= 1 or auto (got {args.gamma}); use --draft none for plain decoding")
    if args.sink < 0:
        raise UsageError("--sink must be >= 0")
    if args.draft_budget < 0 or (args.draft_budget == 0 and args.draft_checkpoint is None):
        raise UsageError("--draft_budget 0 (a full draft cache) needs --draft_checkpoint; self-drafting needs a window")
    g = max_gamma(args.gamma)
    if args.draft_budget and args.draft_budget - args.sink < g + 1:
        raise UsageError(f"--draft_budget {args.draft_budget} leaves fewer than gamma+1 = {g + 1} "
                         f"recent slots after --sink {args.sink}: need a budget >= {args.sink + g + 1}")


def read_checkpoint(path) -> tuple[ModelArgs, object]:
    from tokenizer import load_tokenizer

    if not (Path(path) / "config.json").is_file():
        raise UsageError(f"checkpoint {path}: no config.json there (make one with convert_checkpoint.py)")
    cfg = ModelArgs.load(Path(path) / "config.json")
    check_weights(path, cfg)  # before any process group: tensor-parallel ranks read only slices
    return cfg, load_tokenizer(path)


def build_requests(args, tok, ctx: int) -> list[Request]:
    """Every prompt of --prompt and --prompt_file, checked before any work starts: a bad line is
    reported with its file and line number. id: a .jsonl line's "id", else its line number (or,
    for --prompt texts, their order)."""
    sources = [(None, i, {"text": t}) for i, t in enumerate(args.prompt or [], 1)]
    for f in args.prompt_file or []:
        if not Path(f).is_file():
            raise UsageError(f"--prompt_file {f}: no such file")
        sources += [(f, i, rec) for i, rec in read_prompt_file(f)]
    if not sources:
        sources = [(None, 1, {"text": DEFAULT_PROMPT})]
    reqs, seen = [], {}
    for f, line, rec in sources:
        where = f"{f}:{line}" if f else f"--prompt {line}"
        n = rec.get("max_new_tokens", args.max_new_tokens)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise UsageError(f"{where}: max_new_tokens must be an integer >= 1, not {n!r}")
        rid = rec.get("id", line)
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise UsageError(f"{where}: id must be a string or an integer, not {rid!r}")
        if args.output and rid in seen:
            raise UsageError(f"{where}: id {rid!r} repeats {seen[rid]} (each prompt needs its own id)")
        seen[rid] = where
        ids = tok.encode(rec["text"])
        if args.prompt_len is not None:
            if len(ids) < args.prompt_len:
                raise UsageError(f"{where}: --prompt_len {args.prompt_len}: a prompt has only {len(ids)} tokens")
            ids = ids[: args.prompt_len]
        if not ids:
            raise UsageError(f"{where}: the prompt encodes to no tokens")
        if len(ids) + n > ctx:
            raise UsageError(f"{where}: a prompt of {len(ids)} tokens + max_new_tokens {n} exceeds the model's "
                             f"context of {ctx} tokens")
        reqs.append(Request(ids, n, rid))
    if args.output and len({f for f, _, _ in sources}) > 1:
        raise UsageError("with --output, give the prompts as one --prompt_file (or --prompt texts only), "
                         "so that every prompt has one id")
    return reqs


def done_ids(path: Path, rewrite: bool) -> set:
    """Ids of the results already in a --output file. A line cut by a crash is not a result: with
    `rewrite` (one rank) the file is rewritten without it, atomically."""
    if not path.exists():
        return set()
    try:
        raw = path.read_bytes().split(b"\n")
    except OSError as e:
        raise UsageError(f"--output {path}: {e.strerror or e}") from None
    keep, ids = [], set()
    for line in raw:
        try:
            rec = json.loads(line)
            ids.add(rec["id"])
            keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    if rewrite and (len(keep) != len([ln for ln in raw if ln.strip()]) or raw[-1] != b""):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(b"".join(ln + b"\n" for ln in keep))
        os.replace(tmp, path)
    return ids


def check_output(args) -> set:
    """Before the model loads: the --output file can be written; -> the ids to skip (--resume)."""
    path = Path(args.output)
    ids = done_ids(path, int(os.environ.get("RANK", 0)) == 0) if args.resume else set()
    if not args.resume and path.exists() and path.stat().st_size:
        raise UsageError(f"--output {path} exists and is not empty: pass --resume to continue it, or remove it")
    try:
        with open(path, "ab"):
            pass
    except OSError as e:
        raise UsageError(f"--output {path}: cannot write it ({e.strerror or e})") from None
    return ids


def append_line(path: Path, rec: dict):
    """One whole line per write, under a lock: ranks of other data-parallel groups append to the
    same file, and a killed run leaves at most one cut line at the end (--resume drops it)."""
    data = (json.dumps(rec, ensure_ascii=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, data)
    finally:
        os.close(fd)


def main(argv=None):
    """Run the CLI; under torchrun every rank calls it and rank 0 returns (rows, stats)."""
    args = parse_args(argv)
    check_args(args)
    # everything that can be wrong with the input is checked before the process group exists,
    # identically on every rank, so a bad input stops all ranks instead of leaving some waiting
    world = tp.world_from_env(args.tp)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise UsageError(f"--device {args.device}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device here")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", world.local_rank)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.checkpoint is None:
        from convert_checkpoint import default_checkpoint

        args.checkpoint = str(default_checkpoint())
    cfg, tok = read_checkpoint(args.checkpoint)
    tp.check_split(cfg, args.tp)
    use_draft_model = args.draft_checkpoint is not None and args.draft != "none"
    dcfg = None
    if use_draft_model:
        dcfg, dtok = read_checkpoint(args.draft_checkpoint)
        tp.check_split(dcfg, args.tp)
        check_same_vocab(tok, cfg, dtok, dcfg, f"--draft_checkpoint {args.draft_checkpoint}")
    reqs = build_requests(args, tok, cfg.max_seq_len)
    skip = check_output(args) if args.output else set()
    gamma = 0 if args.draft == "none" else args.gamma
    if args.output:
        todo = [r for r in reqs if r.id not in skip]
        if not todo:
            print(f"done: all {len(reqs)} prompts are already in {args.output}", file=sys.stderr)
            return [], {}
        B = args.batch_size or min(len(todo), 32)
    else:
        todo = rows_of(reqs, args.batch_size or len(reqs))
        B = len(todo)
    if B < world.dp_size:
        raise UsageError(f"{B} rows cannot feed {world.dp_size} data-parallel groups: raise --batch_size or --tp")
    lo, hi = tp.split(B, world.dp_size, world.dp_rank)  # this group's rows
    elem = torch.tensor([], dtype=dtype).element_size()
    max_len = max((len(r.tokens) + r.max_new_tokens for r in reqs), default=1)
    use_window = gamma != 0 and args.draft_budget > 0
    check_memory(lambda b: memory_plan(cfg, b, cache_len(max_len, max_gamma(gamma)), elem, tp_size=args.tp,
                                       gmax=max_gamma(gamma), budget=args.draft_budget if use_window else 0,
                                       draft_cfg=dcfg if gamma != 0 else None), hi - lo, device)

    tp.init(world, device)
    load = (lambda p: tp.load(p, world, device, dtype)) if args.tp > 1 else (
        lambda p: Transformer.from_checkpoint(p, device, dtype))
    model = load(args.checkpoint)
    draft_model = load(args.draft_checkpoint) if use_draft_model else None
    kw = dict(gamma=gamma, draft_model=draft_model, budget=args.draft_budget, sink=args.sink,
              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_ids=tok.eos_ids,
              compile=args.compile)
    torch.manual_seed(args.seed + world.dp_rank)  # the ranks of a group draw the same numbers
    if args.output:
        return run_output(args, model, tok, todo[world.dp_rank:: world.dp_size], hi - lo, max_len, len(skip),
                          world, kw)
    parts = tp.gather(generate(model, [r.tokens for r in todo[lo:hi]], [r.max_new_tokens for r in todo[lo:hi]],
                               **kw), world)
    if parts is None:
        return None
    new = [n for p in parts for n in p[0]]
    reasons = [r for p in parts for r in p[1]]
    stats = merge_stats([p[2] for p in parts])
    rows = [{"prompt_tokens": len(r.tokens), "tokens": n, "text": tok.decode(n), "finish_reason": f}
            for r, n, f in zip(todo, new, reasons)]
    for i, r in enumerate(rows):
        print(f"--- row {i} ({r['prompt_tokens']} prompt tokens, {len(r['tokens'])} new, {r['finish_reason']})")
        print("..." + tok.decode(todo[i].tokens[-24:]) + r["text"])
    print(stats_line(stats, B))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "rows": rows, "stats": stats}, indent=1))
    return rows, stats


def run_output(args, model, tok, reqs: list[Request], B: int, max_len: int, skipped: int, world, kw):
    """--output: this data-parallel group's prompts through B refilled rows, one JSON line each as
    it finishes (written by the group's first rank); rank 0 shows progress and the summary."""
    path, writer, shown = Path(args.output), world.tp_rank == 0, world.rank == 0
    bar = None
    if shown and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(reqs), unit="prompt", file=sys.stderr, dynamic_ncols=True)
    dec = Decoder(model, B, max_len, max((r.max_new_tokens for r in reqs), default=1), **kw)
    n_tok, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for res in dec.run(reqs):
            n_tok += len(res.tokens)
            if writer:
                append_line(path, {"id": res.id, "prompt_tokens": res.prompt_tokens, "tokens": res.tokens,
                                   "text": tok.decode(res.tokens), "finish_reason": res.finish_reason,
                                   "accepted": res.accepted, "steps": res.steps})
            if bar is not None:
                c = dec.c
                acc = int(c.drafts_accepted.sum()) / max(int(c.drafts_proposed), 1)
                bar.set_postfix_str(f"{n_tok / (time.perf_counter() - t0):.1f} tok/s, acceptance {acc:.2f}")
                bar.update()
    if bar is not None:
        bar.close()
    parts = tp.gather(dec.stats(), world)
    if parts is None:
        return None
    stats = merge_stats(parts)
    print(f"done: {stats['prompts']} prompts, {stats['generated_tokens']} tokens in {time.perf_counter() - t0:.1f} s"
          + (f" ({skipped} were already in {path})" if skipped else "") + f"; results in {path}", file=sys.stderr)
    print(stats_line(stats, B * world.dp_size))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "stats": stats}, indent=1))
    return [], stats


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
    line += f" | attention {s['attention']}"
    if s["compiled_graphs"]:
        line += f" | compiled {s['compiled_graphs']} graphs in {s['compile_seconds']:.1f} s"
    return line


if __name__ == "__main__":
    cli(main)
