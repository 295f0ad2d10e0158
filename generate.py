"""Batched autoregressive and self-speculative generation: the loop.

Every row of a batch carries its own position, so rows of different prompt lengths and different
accepted counts stay exact, and a finished row can be refilled with the next prompt while the
others go on. Plain decoding is the speculation loop with gamma = 0.

    python generate.py --prompt "The history of the printing press" --max_new_tokens 128
(the flags: cli.py and README; sampling and --gamma auto: sampling.py; memory and stats: stats.py)"""
import itertools
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, NamedTuple

import torch
from torch import Tensor

import cli
import sampling
import stats
import tp
from cli import Request, Result
from model import OBS, SnapKVCache, Transformer, UsageError, WindowCache
from sampling import AUTO_GAMMAS, AutoGamma, Sampling, max_gamma
from stats import Counters, Timer, cache_len, param_bytes


# ----------------------------------------------------------------------------------------- steps
def draft_step(model, vocab, x, input_pos, draft: bool, flex: bool, s: Sampling):
    """x, input_pos: [B, T] -> (next token [B], its distribution [B, V] or None when greedy)."""
    logits = model(x, input_pos, draft=draft, flex=flex, logits="last")[:, -1]
    if s.temperature == 0:
        return vocab.argmax(logits), None
    probs, _ = sampling.logits_to_probs(logits, s, vocab)  # a truncated nucleus is still
    return sampling.sample(probs, vocab), probs  # a valid proposal: the draft need not be exact


def verify_step(model, vocab, seq, input_pos, d, q, to_draft: bool, flex: bool, s: Sampling, full_sort=False):
    """seq: [B, g+1] = pending token + g drafts -> (accepted count [B], next token [B], covered)."""
    logits = model(seq, input_pos, to_draft=to_draft, flex=flex)
    if s.temperature == 0:
        return *sampling.greedy_accept(logits, d, vocab), None
    p, covered = sampling.logits_to_probs(logits, s, vocab, full_sort)
    return *sampling.speculative_accept(p, q, d, vocab), covered


@dataclass
class Compiled:
    """torch.compile(fn) once per (function, device type, mode): one graph per shape (dynamic=False),
    CUDA graphs on GPU (trees, one memory pool for every graph, tensor parallel included: their
    functional collectives are captured like any kernel). Past Dynamo's recompile limit
    fullgraph=True is a hard error, so the limit is raised to the graphs this process has asked for."""
    fns: dict = field(default_factory=dict)  # (fn, device type, mode) -> compiled fn
    graphs: dict = field(default_factory=dict)  # fn -> graphs asked for

    def __call__(self, fn, device: torch.device, graphs: int):
        import torch._dynamo.config as dc

        mode = "reduce-overhead" if device.type == "cuda" else None
        key = (fn, device.type, mode)
        if key not in self.fns:
            self.fns[key] = torch.compile(fn, mode=mode, fullgraph=True, dynamic=False)
        self.graphs[fn] = self.graphs.get(fn, 0) + graphs
        most, total = max(self.graphs.values()), sum(self.graphs.values())
        for name, n in (("recompile_limit", most), ("cache_size_limit", most),
                        ("accumulated_recompile_limit", total), ("accumulated_cache_size_limit", total)):
            if getattr(dc, name, n) < n:
                setattr(dc, name, n)
        return self.fns[key]


compiled = Compiled()


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------- decoding
@dataclass
class Options:
    """How to decode; Decoder(...) and generate(...) take these as keywords."""
    gamma: int | str = 0  # drafts per verification; 0: plain decoding; "auto": chosen per step (AutoGamma)
    draft_model: Transformer | None = None  # None: the model drafts for itself, on a window
    budget: int = 256  # draft window slots per row, sinks included; 0: a separate draft model's full cache
    sink: int = 16  # attention-sink slots of the window
    draft_cache: str = "streaming"  # the window: "streaming" (sinks + recent ring) | "snapkv" (selected + recent ring)
    ring: int | None = None  # snapkv: recent-ring slots of the budget (None: half of it, see README)
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    eos_ids: tuple = ()
    compile: bool = False  # compile the draft and verify steps (CUDA graphs on GPU)
    attention: str | None = None  # "flex" | "sdpa"; default: FlexAttention when compiled, else SDPA

    @property
    def draft(self) -> str:
        return draft_mode(self.gamma, self.draft_model is not None, self.budget)


def draft_mode(gamma, separate: bool, budget: int) -> str:
    """The one decision of how to draft: "none" (gamma 0), "self" (the model on its own window,
    filled from its full cache and fed by verification), "window" (a separate model on a window
    it prefills itself), "full" (a separate model on its own full cache)."""
    if max_gamma(gamma) == 0:
        return "none"
    if not separate:
        return "self"
    return "window" if budget else "full"


def memory_plan(cfg, mode: str, o: Options, B: int, S: int, elem: int, tp_size=1, draft_cfg=None, weights=None):
    """stats.memory_plan of a run: the drafter reads a window of `budget` slots, or a separate model
    its own full cache, or there is no drafter; a separate model selecting its window (snapkv) prefills
    its own full cache too."""
    full = mode == "window" and o.draft_cache == "snapkv"
    return stats.memory_plan(cfg, B, S, elem, tp_size=tp_size, gmax=max_gamma(o.gamma),
                             window=o.budget + S * full if mode in ("self", "window") else 0,
                             draft_cfg=draft_cfg if mode in ("window", "full") else None, weights=weights)


class Rows(NamedTuple):
    """Per-row decoding state, [B] tensors."""
    prev: Tensor  # the token before the pending one (a separate draft model re-reads it)
    cur: Tensor  # the pending token: committed, its K/V not yet in the caches
    pos: Tensor  # its position
    n_out: Tensor  # tokens committed
    done: Tensor  # finished (EOS or limit), or empty
    hit_eos: Tensor


class Verified(NamedTuple):
    d: Tensor  # [B, g] drafts
    q: Tensor | None  # [B, g, V] their distributions (sampling)
    a: Tensor  # [B] drafts accepted
    t: Tensor  # [B] the token after them: the target's correction or bonus
    covered: Tensor | None  # top_p: did the candidates hold every nucleus


class Seen(NamedTuple):
    """What the host reads of a step (its one sync)."""
    finished: list  # per row: it finished in this step
    covered: bool  # top_p's candidates held every nucleus
    accepted: int  # drafts accepted over the live rows
    rejected: int  # live rows whose drafts were not all accepted
    last_pos: int  # the largest pending position of a row still decoding (-1: none)
    lag: list  # --gamma auto: (tokens left, drafts accepted, rejections) of each row still decoding


class Commit(NamedTuple):
    rows: Rows  # the state after the step
    slots: Tensor  # [B, g+1] where each candidate token goes in `out` (its last column: not committed)
    tokens: Tensor  # [B, g+1] the candidates: d_1..d_a, then t


class Decoder:
    """B rows of decoding state over static caches: the model's full cache of cache_len(max_len)
    slots per row and the drafter's cache. Rows are independent: `run` prefills rows in place as
    prompts arrive and steps all rows together with fixed shapes ([B, 1] drafts, [B, g+1]
    verifies), so compiled graphs and CUDA graphs are reused by every refill. Options: see Options."""

    def __init__(self, model: Transformer, batch_size: int, max_len: int, max_new_tokens: int, **options):
        self.o = o = Options(**options)
        self.model, self.B, self.mode = model, batch_size, o.draft
        self.device = dev = model.tok_embeddings.weight.device
        self.vocab = getattr(model, "vocab", None) or tp.Vocab(model.args.vocab_size)
        group = getattr(model, "tp_group", None)
        self.auto = AutoGamma(group=group, device=dev) if o.gamma == "auto" else None
        self.gmax = max_gamma(o.gamma)
        self.gammas = AUTO_GAMMAS if self.auto else (self.gmax,)
        self.S = cache_len(max_len, self.gmax)
        if self.mode == "self" and not o.budget:
            raise UsageError("self-drafting needs a window: budget > 0 (budget 0 is a separate draft model's full cache)")
        if self.mode in ("self", "window"):
            cli.check_window(o.budget, o.sink, self.gmax)
        if o.draft_cache not in ("streaming", "snapkv"):
            raise UsageError(f"draft_cache {o.draft_cache!r}: streaming or snapkv")
        self.snap = self.mode in ("self", "window") and o.draft_cache == "snapkv"
        # the recent positions a window always holds: while every row's context fits, the draft reads it all
        self.holds = cli.snap_split(o.budget, o.sink, self.gmax, o.ring)[1] if self.snap else o.budget
        # auto's plain steps leave a streaming self-draft's window stale (`stale`: how many steps) and
        # the next draft first copies their positions from the full cache: what their writes would have
        # left (a selection strategy keeps what its fill chose, so it is written every step)
        self.lazy, self.stale = self.auto is not None and self.mode == "self" and not self.snap, 0
        self.drafter = model if self.mode in ("none", "self") else o.draft_model
        self.window = self.mode in ("self", "window")  # the drafter reads a window
        self.sampling = Sampling(o.temperature, o.top_k, o.top_p)
        # the one place the attention backend is chosen (see model.attend): FlexAttention when compiled,
        # SDPA when eager (eager FlexAttention materialises the scores)
        attention = o.attention or ("flex" if o.compile else "sdpa")
        if attention not in ("flex", "sdpa"):
            raise UsageError(f"attention {attention!r}: flex or sdpa")
        self.flex = attention == "flex"

        # memory: refuse before allocating
        other = self.drafter is not model
        elem = model.tok_embeddings.weight.element_size()
        held = lambda m: sum(b.nbytes for b in m.buffers())
        weights = param_bytes(model) + (param_bytes(self.drafter) if other else 0)
        stats.check_memory(lambda b: memory_plan(model.args, self.mode, o, b, self.S, elem, tp.size(model),
                                                 self.drafter.args if other else None, weights),
                           batch_size, dev, weights + held(model) + (held(self.drafter) if other else 0))

        model.setup_caches(batch_size, self.S)
        if other:  # a separate model selecting its window (snapkv) scores its own full cache
            self.drafter.setup_caches(batch_size, self.S, full=self.mode == "full" or self.snap)
        if self.snap:  # <- the draft strategies
            select, ring = cli.snap_split(o.budget, o.sink, self.gmax, o.ring)
            self.drafter.setup_draft_cache(SnapKVCache, sink=o.sink, select=select, window=ring)
        elif self.window:
            self.drafter.setup_draft_cache(WindowCache, sink=o.sink, window=o.budget - o.sink)
        B, gmax = batch_size, self.gmax
        z = lambda *s, dt=torch.long: torch.zeros(*s, dtype=dt, device=dev)
        self.rows = Rows(z(B), z(B), z(B), z(B), torch.ones(B, dtype=torch.bool, device=dev), z(B, dt=torch.bool))
        self.limit, self.row_acc, self.row_rej, self.row_steps = z(B), z(B), z(B), z(B)
        self.out = z(B, max_new_tokens + gmax + 2)  # last column: trash
        self.eos = torch.tensor(list(o.eos_ids) or [-1], device=dev)
        self.idx = torch.arange(gmax + 1, device=dev)
        self.c = Counters.zeros(gmax, dev)
        self.timer = Timer(dev)
        self.steps = self.draft_forwards = self.prompts_done = 0
        self.last_pos, self.covered = -1, False  # the largest pending position of a live row; see step
        self.lag, self.draining = [], False  # see Seen.lag; no request is left to refill a row
        self.prefill_seconds = self.decode_seconds = self.compile_seconds = 0.0
        self.compiled_graphs = 0
        n_draft = 2 if self.mode in ("window", "full") else 1  # a separate draft's first forward: 2 tokens
        self.dstep = compiled(draft_step, dev, n_draft) if o.compile else draft_step
        self.vstep = compiled(verify_step, dev, len(self.gammas)) if o.compile else verify_step
        self.warmed = False

    # ---- set-up: compile, prefill
    @torch.no_grad()
    def warm_up(self):
        """Compile (and on CUDA record) every graph this run will use, by running its steps on its
        own buffers and shapes before any prompt arrives. The rows sit at their last slots, past
        any prompt, so a prefill done (prefilled runs) or to come keeps its own; nothing commits."""
        if not self.o.compile or self.warmed:
            return
        self.warmed = True
        sync(self.device)
        t0, n0 = time.perf_counter(), unique_graphs()
        self.rows.pos.fill_(self.S - 1 - self.gmax)
        for _ in range(3 if self.device.type == "cuda" else 1):  # CUDA graphs record on a later call
            for g in self.gammas:
                self.speculate(g)
        sync(self.device)
        self.compile_seconds = time.perf_counter() - t0
        self.compiled_graphs = unique_graphs() - n0
        self.c.draft_kv_read.zero_()
        self.timer = Timer(self.device)

    def prefill(self, rows: list[int], reqs: list[Request], prefilled=False):
        """Prefill these rows of the batch with these prompts, all in one prefill, and make them live."""
        dev, n = self.device, len(reqs)
        self.last_pos = max(self.last_pos, max(len(r.tokens) for r in reqs) - 1)
        self.covered = self.mode == "self" and self.last_pos + 1 + self.gmax <= self.holds
        rows = slice(rows[0], rows[0] + n) if rows == list(range(rows[0], rows[0] + n)) else \
            torch.tensor(rows, device=dev)  # the caches' rows: a slice (views) or an index tensor
        lens = torch.tensor([len(r.tokens) for r in reqs], device=dev)
        tokens = torch.zeros(n, int(lens.max()), dtype=torch.long, device=dev)
        for i, r in enumerate(reqs):
            tokens[i, : len(r.tokens)] = torch.tensor(r.tokens)
        pos = lens - 1  # the last prompt token is not prefilled: it is the first step's pending token
        if not prefilled:
            prefill(self.model, tokens, pos, rows, self.S)
        if self.mode == "self":
            self.model.fill_draft_cache(pos, rows)
        elif self.snap:  # a separate draft model selects its window from its own prefill
            prefill(self.drafter, tokens, pos, rows, self.S)
            self.drafter.fill_draft_cache(pos, rows)
        elif self.mode == "window":  # a separate draft model prefills straight into its (emptied) window
            self.drafter.fill_draft_cache(pos, rows)
            prefill(self.drafter, tokens, pos, rows, self.o.budget - self.o.sink, draft=True)
        elif self.mode == "full":
            prefill(self.drafter, tokens, pos, rows, self.S)
        ar, r = torch.arange(n, device=dev), self.rows
        r.cur[rows], r.prev[rows], r.pos[rows] = tokens[ar, pos], tokens[ar, (pos - 1).clamp(min=0)], pos
        self.limit[rows] = torch.tensor([r.max_new_tokens for r in reqs], device=dev)
        for t in (r.n_out, self.row_acc, self.row_rej, self.row_steps):
            t[rows] = 0
        r.done[rows] = r.hit_eos[rows] = False
        self.lag = self.lag + [(q.max_new_tokens, 0, 0) for q in reqs]  # (Seen.lag, before their first step)

    # ---- one speculation step: draft, verify, accept, commit
    def speculate(self, g: int, full_sort=False) -> Verified:
        """Draft g tokens and verify them (g = 0: one plain decoding step); commits nothing."""
        s, B, cur, pos = self.sampling, self.B, self.rows.cur, self.rows.pos
        if g and self.stale:  # before the clock: auto times the draft as it costs step after step
            n = min(self.stale, self.o.budget - self.o.sink)  # (older positions left the ring)
            self.model.catch_up_draft_cache((pos[:, None] - n + torch.arange(n, device=pos.device)).clamp(min=0))
        self.stale = self.stale + 1 if self.lazy and not g else 0
        self.timer.mark(0)
        d, q = [], []
        if g:
            # A separate model never saw its last drafted token when all g were accepted: it
            # re-reads the token before the pending one with it (2 tokens, one more graph).
            x, x_pos = (cur[:, None], pos[:, None]) if self.mode == "self" else (
                torch.stack((self.rows.prev, cur), 1), torch.stack((pos - 1, pos), 1).clamp(min=0))
            for i in range(g):
                t, probs = self.dstep(self.drafter, self.vocab, x, x_pos, self.window, self.flex, s)
                d.append(t.clone())  # (a CUDA graph's outputs are overwritten by its next replay)
                if probs is not None:
                    q.append(probs.clone())
                x, x_pos = d[-1][:, None], (pos + i + 1)[:, None]
        self.timer.mark(1)
        d = torch.stack(d, 1) if g else cur.new_zeros(B, 0)
        q = torch.stack(q, 1) if q else None
        seq, seq_pos = torch.cat((cur[:, None], d), 1), pos[:, None] + self.idx[: g + 1]
        vstep = verify_step if full_sort else self.vstep  # the rare exact redo runs eagerly
        a, t, covered = vstep(self.model, self.vocab, seq, seq_pos, d, q, self.mode == "self" and not self.stale,
                              self.flex and not full_sort, s, full_sort)
        self.timer.mark(2)
        return Verified(d, q, a.clone(), t.clone(), covered)

    def step(self) -> list[int]:
        """Advance every live row by one verify step; -> the rows that finished in it. One host
        sync: it reads which rows finished, with what --gamma auto and top_p need."""
        live = ~self.rows.done
        g = self.auto.choose(self.covered, self.lag if self.draining else None) if self.auto else self.gmax
        self.steps += 1
        self.draft_forwards += g
        v = self.speculate(g)
        new = self.commit(g, v)
        seen = self.read(g, v, new, live)
        if not seen.covered:  # top_p: the nucleus outgrew the candidates: redo the step with a full sort
            self.draft_forwards += g  # (rare). The drafts are drawn afresh: ones kept because they led here are biased
            v = self.speculate(g, full_sort=True)
            new = self.commit(g, v)
            seen = self.read(g, v, new, live)
        self.out.scatter_(1, new.slots, new.tokens)
        self.count(g, v.a, live, new.rows)
        self.rows = new.rows
        self.timer.mark(3)
        timed = self.timer.end_step(g)
        if self.auto:
            self.auto.update(g, seen.accepted, seen.rejected)
            if timed:
                self.auto.timed(timed[0], timed[1]["draft"], timed[1]["verify"] + timed[1]["host"])
        # the window holds every live row's context up to the largest verify: a draft reads what the target does
        self.last_pos, self.lag = seen.last_pos, seen.lag
        self.covered = self.mode == "self" and self.last_pos + 1 + self.gmax <= self.holds
        return [i for i, f in enumerate(seen.finished) if f]

    def read(self, g: int, v: Verified, new: "Commit", live: Tensor) -> "Seen":
        """The step's one host sync."""
        covered = v.covered[None] if v.covered is not None else live.new_ones(1)
        a_live = torch.where(live, v.a, 0)
        last = torch.where(new.rows.done, -1, new.rows.pos).amax()[None]
        rej = (v.a < g) & live
        lag = [] if self.auto is None else [  # --gamma auto's view of the rows still decoding
            ~new.rows.done, self.limit - new.rows.n_out, self.row_acc + a_live, self.row_rej + rej]
        x = torch.cat((new.rows.done & live, covered, a_live.sum()[None], rej.sum()[None], last, *lag)).tolist()
        B = self.B
        per_row = [x[B + 4 + i * B: B + 4 + (i + 1) * B] for i in range(len(lag))]  # [4][B] or []
        lag = [(n, acc, r) for alive, n, acc, r in zip(*per_row) if alive]
        return Seen(x[:B], bool(x[B]), x[B + 1], x[B + 2], x[B + 3], lag)

    def commit(self, g: int, v: Verified) -> Commit:
        """Per row: this step's new tokens d_1..d_a then t, cut at EOS and at the row's limit. Pure:
        the caller writes them to `out`. Rejected cache slots are simply overwritten later: nothing
        to roll back."""
        r, idx, d, a = self.rows, self.idx[: g + 1], v.d, v.a
        cand = torch.cat((d, v.t[:, None]), 1).scatter(1, a[:, None], v.t[:, None])
        valid = (idx <= a[:, None]) & (idx < (self.limit - r.n_out)[:, None]) & ~r.done[:, None]
        is_eos = (cand[..., None] == self.eos).any(-1) & valid
        valid &= is_eos.int().cumsum(1) - is_eos.int() == 0  # nothing after the first EOS
        slots = torch.where(valid, r.n_out[:, None] + idx, self.out.shape[1] - 1)
        n_out = r.n_out + valid.sum(1)
        hit_eos = r.hit_eos | is_eos.any(1)
        done = r.done | hit_eos | (n_out >= self.limit)
        # the token at the new pending position - 1: cur if nothing was accepted, else d_a
        prev = r.cur if g == 0 else torch.where(a == 0, r.cur, d.gather(1, (a - 1).clamp(min=0)[:, None])[:, 0])
        rows = Rows(prev, torch.where(done, r.cur, v.t), torch.where(done, r.pos, r.pos + a + 1), n_out, done, hit_eos)
        return Commit(rows, slots, cand)

    def count(self, g: int, a: Tensor, live: Tensor, new: Rows):
        c, idx, pos = self.c, self.idx[:g], self.rows.pos
        c.generated += (new.n_out - self.rows.n_out).sum()
        c.row_steps += live.sum()
        c.drafts_proposed += live.sum() * g
        c.kv_read += (pos + g + 1).sum()
        self.row_steps += live
        self.row_acc += torch.where(live, a, 0)
        self.row_rej += (a < g) & live
        if g:
            c.draft_kv_read += (pos[:, None] + idx + 1).clamp(max=self.o.budget if self.window else self.S).sum()
            c.drafts_tried[:g] += ((idx <= a[:, None]) & live[:, None]).sum(0)
            c.drafts_accepted[:g] += ((idx < a[:, None]) & live[:, None]).sum(0)

    def results(self, rows: list[int], reqs: list[Request]) -> list[Result]:
        n = self.rows.n_out[rows].tolist()
        out, eos = self.out[rows].tolist(), self.rows.hit_eos[rows].tolist()
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
        ahead = list(itertools.islice(it, 1))  # the next request, read early: is any left?
        slot: list[Request | None] = [None] * self.B

        def take(n):
            got = []
            while ahead and len(got) < n:
                r = ahead.pop()
                ahead.extend(itertools.islice(it, 1))
                if len(r.tokens) < 1 or len(r.tokens) + r.max_new_tokens > self.S - self.gmax or r.max_new_tokens < 1:
                    raise UsageError(f"request {r.id!r}: {len(r.tokens)} prompt tokens + {r.max_new_tokens} new "
                                     f"do not fit this decoder's {self.S - self.gmax} positions per row")
                if r.max_new_tokens + self.gmax + 2 > self.out.shape[1]:
                    raise UsageError(f"request {r.id!r}: max_new_tokens {r.max_new_tokens} is above the decoder's "
                                     f"{self.out.shape[1] - self.gmax - 2}")
                got.append(r)
            self.draining = not ahead
            return got

        def fill(rows: list[int], reqs, prefilled=False) -> float:
            sync(self.device)
            t0 = time.perf_counter()
            self.prefill(rows, reqs, prefilled)
            sync(self.device)
            for i, r in zip(rows, reqs):
                slot[i] = r
            self.prefill_seconds += time.perf_counter() - t0
            return time.perf_counter() - t0

        first = take(self.B)
        if first:  # one batched prefill for the first rows
            fill(list(range(len(first))), first, prefilled)
        t0, refills = time.perf_counter(), 0.0
        while any(r is not None for r in slot):
            finished = self.step()
            if finished:
                for res in self.results(finished, [slot[i] for i in finished]):
                    self.prompts_done += 1
                    yield res
                for i in finished:
                    slot[i] = None
                nxt = take(len(finished))
                if nxt:  # the rows that finished together are refilled together, in one prefill
                    refills += fill(finished[: len(nxt)], nxt)
        timed = self.timer.flush()
        if timed and self.auto:
            self.auto.timed(timed[0], timed[1]["draft"], timed[1]["verify"] + timed[1]["host"])
        sync(self.device)
        self.decode_seconds += time.perf_counter() - t0 - refills

    def acceptance(self) -> float:
        return int(self.c.drafts_accepted.sum()) / max(int(self.c.drafts_proposed), 1)

    def stats(self) -> dict:
        """Raw counts and times of everything this decoder ran; see stats.summarize for the derived ones."""
        c, phases = self.c, self.timer.total
        kv, kv_d = int(c.kv_read), int(c.draft_kv_read)
        m, dm = self.model, self.drafter
        kvb = lambda x: x.args.kv_bytes_per_token(x.tok_embeddings.weight.element_size(),
                                                  x.layers[0].attention.n_kv_heads)
        s = {
            "prompts": self.prompts_done,
            "generated_tokens": int(c.generated),
            "prefill_seconds": self.prefill_seconds,
            "decode_seconds": self.decode_seconds,
            "draft_seconds": phases["draft"],
            "verify_seconds": phases["verify"],
            "host_seconds": phases["host"],
            "verify_steps": self.steps,
            "draft_forwards": self.draft_forwards,
            "row_steps": int(c.row_steps),
            "drafts_proposed": int(c.drafts_proposed),
            "drafts_tried": c.drafts_tried.tolist() if self.gmax else [],
            "drafts_accepted": c.drafts_accepted.tolist() if self.gmax else [],
            # bytes every forward must read: weights + visible K/V (per rank under --tp)
            "bytes_read": (self.steps * param_bytes(m, True) + kv * kvb(m) + self.draft_forwards * param_bytes(dm, True)
                           + kv_d * kvb(dm)),
            "compiled_graphs": self.compiled_graphs,
            "compile_seconds": self.compile_seconds,
            "attention": "flex" if self.flex else "sdpa",
        }
        if self.auto:
            s["gamma_used"] = dict(sorted(self.auto.used.items()))
        return s


def prefill(model: Transformer, tokens: Tensor, n: Tensor, rows, S: int, draft=False):
    """Fill `rows`' caches (a slice or an index tensor) with positions [0, n_b) of each row of
    `tokens` [B', L], in chunks (of at most S slots: a draft window must not wrap in one forward).
    Every layer keeps the queries of each row's last OBS positions (a selecting draft cache's fill
    scores the prompt with them: no second pass)."""
    B, a = tokens.shape[0], model.args
    chunk = min(stats.prefill_chunk(B, S, a.n_heads // a.n_kv_heads), S)
    end = int(n.max())
    obs = None if draft else n[:, None] - OBS + torch.arange(OBS, device=tokens.device)
    for s in range(0, end, chunk):
        e = min(s + chunk, end)
        pos = torch.arange(s, e, device=tokens.device).expand(B, -1)
        # slots past a row's n get its padding: masked, and overwritten before they are read
        model(tokens[:, s:e], pos, draft=draft, rows=rows, kv_len=None if draft else e, logits=False, obs=obs)


class Generated(NamedTuple):
    tokens: list[list[int]]  # new tokens per row
    finish_reasons: list[str]  # "eos" | "length" per row
    stats: dict


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int | list[int], *,
             prefilled: bool = False, **options) -> Generated:
    """One static batch: a row per prompt, up to `max_new_tokens` new tokens each (one limit, or
    one per prompt); options: see Options. prefilled: the model's full cache already holds these
    prompts from an earlier call with the same rows and cache size (benchmarks time many runs on
    one prefill)."""
    limits = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompts)
    if not prompts or min(map(len, prompts)) < 1:
        raise UsageError("every prompt needs at least one token")
    if min(limits) < 1:
        raise UsageError("max_new_tokens must be >= 1")
    max_len = max(len(p) + n for p, n in zip(prompts, limits))
    gmax = max_gamma(options.get("gamma", 0))
    if prefilled:  # keep the prefilled cache when it is large enough: it was sized for the largest gamma
        if model.batch_size != len(prompts) or model.max_seq_len < cache_len(max_len, gmax):
            raise UsageError(f"prefilled caches hold {model.batch_size} rows of {model.max_seq_len} slots, this "
                             f"call needs {len(prompts)} of {cache_len(max_len, gmax)}")
        max_len = model.max_seq_len - gmax  # then cache_len(max_len, gamma) is the cache's size
    dec = Decoder(model, len(prompts), max_len, max(limits), **options)
    res = sorted(dec.run([Request(p, n, i) for i, (p, n) in enumerate(zip(prompts, limits))], prefilled),
                 key=lambda r: r.id)
    return Generated([r.tokens for r in res], [r.finish_reason for r in res], stats.summarize(dec.stats()))


# --------------------------------------------------------------------------------------------- CLI
def main(argv=None):
    """The command line (cli.py reads and checks it); under torchrun every rank runs this and rank 0
    returns (rows, stats)."""
    args = cli.parse_args(argv)
    # what can be wrong with the input is checked before the process group exists, alike on every rank
    world = tp.world_from_env(args.tp)
    device = cli.device_of(args, world)
    if args.checkpoint is None:
        from convert_checkpoint import default_checkpoint

        args.checkpoint = str(default_checkpoint())
    cfg, tok, dcfg = cli.read_checkpoints(args)
    dtype = cli.dtype_of(args, device, cfg)
    draft_ckpt = args.draft_checkpoint if dcfg else None
    reqs = cli.build_requests(args, tok, cfg.max_seq_len)
    out = cli.Output(args.output, args.resume) if args.output else None
    tp.init(world, device)
    skip = tp.agree(world, lambda: out.claim() if world.rank == 0 else None) if out else set()
    todo = [r for r in reqs if r.id not in skip] if out else cli.rows_of(reqs, args.batch_size or len(reqs))
    if not todo:
        print(f"done: all {len(reqs)} prompts are already in {args.output}", file=sys.stderr)
        return [], {}
    B = (args.batch_size or min(len(todo), 32)) if out else len(todo)
    if B < world.dp_size:
        raise UsageError(f"{B} rows cannot feed {world.dp_size} data-parallel groups: raise --batch_size or --tp")
    lo, hi = tp.split(B, world.dp_size, world.dp_rank)  # this group's rows
    o = Options(gamma=0 if args.draft == "none" else args.gamma, budget=args.draft_budget, sink=args.sink,
                draft_cache=args.draft_cache, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                eos_ids=tok.eos_ids, compile=args.compile)
    mode = draft_mode(o.gamma, draft_ckpt is not None, o.budget)
    max_len = max(len(r.tokens) + r.max_new_tokens for r in reqs)
    S, elem = cache_len(max_len, max_gamma(o.gamma)), torch.tensor([], dtype=dtype).element_size()
    tp.agree(world, lambda: stats.check_memory(lambda b: memory_plan(cfg, mode, o, b, S, elem, args.tp, dcfg),
                                               hi - lo, device))

    def load(path, c):  # each model in its own activations' dtype (a quantized draft: bfloat16 on the CPU)
        dt = cli.dtype_of(args, device, c)
        return tp.load(path, world, device, dt) if args.tp > 1 else Transformer.from_checkpoint(path, device, dt)

    model = load(args.checkpoint, cfg)
    o.draft_model = load(draft_ckpt, dcfg) if draft_ckpt else None
    torch.manual_seed(args.seed + world.dp_rank)  # the ranks of a group draw the same numbers
    t0 = time.perf_counter()
    if out:  # this group's prompts through its rows, a line each as it finishes (by the group's first rank)
        mine = todo[world.dp_rank:: world.dp_size]
        dec = Decoder(model, hi - lo, max_len, max(r.max_new_tokens for r in mine), **vars(o))
        bar = cli.Progress(len(mine), world.rank == 0)
        for res in dec.run(mine):
            if world.tp_rank == 0:
                out.append(res, tok)
            bar.update(res, dec.acceptance)
        bar.close()
        parts = tp.gather(dec.stats(), world)  # (every group is done writing)
        out.release()
    else:
        parts = tp.gather(generate(model, [r.tokens for r in todo[lo:hi]], [r.max_new_tokens for r in todo[lo:hi]],
                                   **vars(o)), world)
    return None if parts is None else cli.report(args, tok, todo, parts, B, len(skip), time.perf_counter() - t0)


if __name__ == "__main__":
    cli.run(main)
