"""Sampling and acceptance: temperature / top-k / top-p, the greedy and rejection rules that keep
speculation lossless, and --gamma auto's policy. Everything is batched over rows and needs no
host sync; under tensor parallelism the vocabulary reductions go through `tp.Vocab`."""
import math
from dataclasses import dataclass

import torch
from torch import Tensor

import tp

TOP_P_CANDIDATES = 1024  # --top_p sorts only this many of the largest logits (see nucleus)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0


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


def logits_to_probs(logits: Tensor, s: Sampling, vocab: tp.Vocab | None = None,
                    full_sort=False) -> tuple[Tensor, Tensor | None]:
    """-> (probabilities over this rank's vocabulary slice, top_p's `covered` or None)."""
    vocab = vocab or tp.Vocab(logits.shape[-1])
    logits = logits.float() / s.temperature
    if s.top_k and s.top_k < vocab.n:
        logits = logits.masked_fill(logits < vocab.topk(logits, s.top_k)[..., -1:], -math.inf)
    covered = None
    if s.top_p < 1.0:
        logits, covered = nucleus(logits, vocab, s.top_p, full_sort)
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


# ------------------------------------------------------------------------------------ --gamma auto
AUTO_GAMMAS = (0, 1, 2, 3, 4, 6)  # what --gamma auto chooses from (each gamma is one verify graph)


def max_gamma(gamma: int | str) -> int:
    """The largest gamma a run may use: --gamma auto may pick any of AUTO_GAMMAS."""
    return max(AUTO_GAMMAS) if gamma == "auto" else int(gamma)


def expected_tokens(alpha: float, gamma: int) -> float:
    """Tokens one verify step commits per row when each draft passes with probability alpha."""
    return gamma + 1.0 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


@dataclass
class LineFit:
    """Exponentially weighted least squares of y = v0 + v1 * x (the sums it keeps, by name)."""
    w: float = 0.0
    wx: float = 0.0
    wy: float = 0.0
    wxx: float = 0.0
    wxy: float = 0.0

    def add(self, x: float, y: float, decay: float):
        self.w, self.wx, self.wy = decay * self.w + 1, decay * self.wx + x, decay * self.wy + y
        self.wxx, self.wxy = decay * self.wxx + x * x, decay * self.wxy + x * y

    def fade(self, decay: float):
        self.w, self.wx, self.wy, self.wxx, self.wxy = (decay * x for x in (self.w, self.wx, self.wy, self.wxx, self.wxy))

    def spread(self) -> bool:
        """More than one x seen (within rounding): the slope is measured."""
        return self.wxx * self.w - self.wx * self.wx > 1e-9 * self.wxx * self.w

    def line(self) -> tuple[float, float]:
        var = self.wxx * self.w - self.wx * self.wx
        v1 = max((self.wxy * self.w - self.wx * self.wy) / var, 0.0) if self.spread() else 0.0
        return (self.wy - v1 * self.wx) / max(self.w, 1e-12), v1

    def __add__(self, o: "LineFit") -> "LineFit":
        return LineFit(self.w + o.w, self.wx + o.wx, self.wy + o.wy, self.wxx + o.wxx, self.wxy + o.wxy)


class AutoGamma:
    """--gamma auto: before each step, the gamma (0 = a plain decoding step) with the most expected
    tokens per second, E(alpha, g) / (g * t_draft + t_verify(g)), from this run's own measurements:
    alpha = accepted / (accepted + rejected) drafts, t_draft per draft forward, a plain step's time
    t_verify(0), and the line t_verify(g) = v0 + v1 * g over speculative steps (a verify step with
    its acceptance and commit), all exponentially weighted so that they follow the growing context.
    The line leaves the plain step out: on the CPU a verify of 2 tokens costs 1.4 plain steps at
    6K x 32 and each further token 0.02 more, so a line through the plain step would price every
    gamma above 1 far too high. Until two speculative gammas are timed the line runs through the
    plain step (the cautious guess).

    Exploration is cheap and rare. A plain step and a gamma = 1 step first (the cheapest speculative
    step: it measures the draft's cost, a verify slope and the acceptance); then, every `gap`
    steps, one step of a neighbour of the best gamma. The gap doubles while probes leave the best
    unchanged (quadruples while gamma = 0 wins by more than `margin`), up to `max_gap`, and falls
    back to `min_gap` when a probe changes the choice. While the draft window holds every row's
    whole context (`covered`: the draft reads what the target reads, so a draft step costs a plain
    one) it does not speculate at all, and starts exploring when the context outgrows the window.

    Once no request is left to refill a row (`lag` given), the run ends when its slowest row does:
    between probes the gamma is the one that finishes the rows still decoding soonest, each row at
    its own acceptance and its tokens left, the batch waiting for the slowest (`steps_left`). No
    probe starts once the slowest row needs fewer steps than the gap: what it would learn has no
    steps left to pay for it (in a fixed batch a probe rarely shortens the slowest row, so it costs
    its whole step). A row's acceptance weighs its own counts against drafts at the shared rate, as
    many as the rows' spread beyond their counts' noise says (`strength`, at least `prior`)."""

    def __init__(self, gammas=AUTO_GAMMAS, decay=0.95, min_gap=16, max_gap=128, margin=0.25, prior=4.0, group=None,
                 device=None):
        self.gammas, self.decay, self.min_gap, self.max_gap, self.margin = gammas, decay, min_gap, max_gap, margin
        self.prior = prior
        self.group, self.device = group, device  # a tensor-parallel group follows its first rank
        self.accepted, self.rejected = 1.0, 1.0  # a uniform prior
        self.t_draft = None
        self.verify, self.plain = LineFit(), LineFit()  # speculative steps' verify; plain steps (x = 0)
        self.steps = 0
        self.gap, self.next_probe, self.probes = min_gap, 0, 0
        self.probe = None  # the gamma probed, while its times are still to come
        self.best = 0
        self.used = {}

    def cost(self, g: int) -> float:
        if g == 0 and self.plain.w:
            return max(self.plain.line()[0], 1e-12)
        v0, v1 = (self.verify if self.verify.spread() else self.verify + self.plain).line()
        return max(g * (self.t_draft or 0.0) + v0 + v1 * g, 1e-12)

    @property
    def alpha(self) -> float:
        """The shared acceptance: the fraction of drafts accepted, exponentially weighted."""
        return self.accepted / (self.accepted + self.rejected)

    def rates(self) -> dict[int, float]:
        return {g: expected_tokens(self.alpha, g) / self.cost(g) for g in self.gammas}

    def strength(self, lag: list) -> float:
        """How many drafts at the shared rate weigh against a row's own counts: a beta-binomial's
        a + b, estimated from the rows of `lag` by moments: their spread S = sum n_i (p_i - p)^2
        beyond what counts of one shared rate give, (rows - 1) p (1 - p), is the rows' own
        variance. Rows that differ no more than their counts' noise share the rate (inf): else the
        row that looks the slowest by chance would set the gamma. At least `prior`."""
        rows = [(a, a + r) for _, a, r in lag if a + r]
        N = sum(n for _, n in rows)
        if len(rows) < 2 or N < 2:
            return self.prior
        p = sum(a for a, _ in rows) / N
        noise = p * (1 - p) * N / (N - 1)  # a draft's variance (unbiased)
        S = sum(n * (a / n - p) ** 2 for a, n in rows)
        between = (S - (len(rows) - 1) * noise) / (N - sum(n * n for _, n in rows) / N)
        return math.inf if between <= 0 else max(self.prior, noise / between - 1)

    def steps_left(self, g: int, lag: list) -> float:
        """Steps until the last row of `lag` [(tokens left, accepted, rejections)] is done at g. A
        speculating row's steps scatter (a step commits 1 to g + 1 tokens: n tokens take about
        n / m steps, sd sqrt(n v / m^3), m and v a step's tokens' mean and variance) and the batch
        waits for the slowest row: the mean of the rows' largest count, each row's count normal."""
        alpha, k = self.alpha, self.strength(lag)
        own = (lambda a, r: alpha) if k == math.inf else (lambda a, r: (a + k * alpha) / (a + r + k))

        def steps(n, a, r):  # -> (mean, sd)
            h, p = min(g, n - 1), own(a, r)
            P = [p ** j * (1 - p) for j in range(h)] + [p ** h]  # j drafts accepted: j + 1 tokens
            m = expected_tokens(p, h)
            return n / m, math.sqrt(n * sum(w * (j + 1 - m) ** 2 for j, w in enumerate(P)) / m ** 3)
        rows = [steps(*x) for x in lag]
        lo = max(m - 3 * s for m, s in rows)  # no row's count is likely below this: the max is not either
        rows = [(m, s) for m, s in rows if s > 0 and m + 3 * s > lo]  # the rows that may finish last
        if not rows:
            return lo
        # E[max] = lo + the integral over t > lo of P(some row is still going at t)
        hi, N = max(m + 3 * s for m, s in rows), 16
        dt = (hi - lo) / N
        going = [1 - math.prod(0.5 * (1 + math.erf((lo + i * dt - m) / (s * math.sqrt(2)))) for m, s in rows)
                 for i in range(N + 1)]
        return lo + dt * (sum(going) - (going[0] + going[-1]) / 2)

    def finish(self, g: int, lag: list) -> float:
        """Seconds until the last row of `lag` is done at g."""
        return self.cost(g) * self.steps_left(g, lag)

    def choose(self, covered: bool = False, lag: list | None = None) -> int:
        """The gamma of the next step. covered: every live row's context fits the draft window.
        lag: no request is left; (tokens left, drafts accepted, rejections) of each live row."""
        if covered:
            g = 0
            self.next_probe = self.steps  # explore as soon as the context outgrows the window
        elif self.probe is None and (self.t_draft is None or self.steps >= self.next_probe and not (
                lag and self.steps_left(self.best, lag) < self.gap)):  # (a lesson the run's end leaves no use for)
            if self.t_draft is None and 0 in self.gammas and 0 not in self.used:
                g = 0  # the cold start: a plain step, then gamma 1 as the first probe
            elif self.t_draft is None:
                g = min(x for x in self.gammas if x)
            else:  # a neighbour of the best, below and above in turn
                i = self.gammas.index(self.best)
                g = self.gammas[i - 1 if (self.probes % 2 and i > 0) or i == len(self.gammas) - 1 else i + 1]
                self.probes += 1
            self.probe, self.probe_step = (g if g else None), self.steps
        elif lag and self.t_draft is not None:  # the batch's end: its slowest row's
            g = min(self.gammas, key=lambda x: self.finish(x, lag))
        else:  # (with a probe's times still to come, the best)
            g = self.best
        if self.group is not None:  # ranks time differently but must run the same step
            t = torch.tensor([g], device=self.device)
            torch.distributed.broadcast(t, torch.distributed.get_global_rank(self.group, 0), self.group)
            g = int(t)
        self.used[g] = self.used.get(g, 0) + 1
        self.steps += 1
        return g

    def update(self, g: int, accepted: int, rejected: int):
        """A step's drafts accepted and rejected (summed over its live rows)."""
        if g:
            d = self.decay
            self.accepted, self.rejected = d * self.accepted + accepted, d * self.rejected + rejected

    def timed(self, g: int, t_draft: float, t_verify: float):
        """A step's times (on CUDA they arrive a step late): its g draft forwards, and its verify
        with acceptance and commit. The best gamma is re-chosen; after a probe the gap moves."""
        (self.verify if g else self.plain).add(g, t_verify, self.decay)
        (self.plain if g else self.verify).fade(self.decay)  # both forget at the pace of steps
        if g:
            d = t_draft / g
            self.t_draft = d if self.t_draft is None else self.decay * self.t_draft + (1 - self.decay) * d
        if self.t_draft is None:
            return
        rates = self.rates()
        best = max(rates, key=rates.get)
        if self.probe is not None and g == self.probe:
            if best != self.best:
                self.gap = self.min_gap
            else:
                runner_up = max(r for x, r in rates.items() if x != best)
                wide = best == 0 and runner_up < (1 - self.margin) * rates[0]
                self.gap = min(self.max_gap, self.gap * (4 if wide else 2))
            self.next_probe, self.probe = self.probe_step + self.gap, None
        self.best = best
