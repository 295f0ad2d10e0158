"""Speculative sampling returns the target's distribution: the rule alone, a small model end to
end, and the real default model; each check is also run against deliberately broken rules."""
import math

import pytest
import torch

import generate as gen
import sampling
import stats
from model import ModelArgs, Transformer


def chi2(samples: torch.Tensor, probs: torch.Tensor, given: torch.Tensor | None = None):
    """Pearson's chi-square of `samples` (ids) against `probs` [V] or, with `given` (an id per sample),
    against probs[given] within each group (probs [G, V]). Cells with < 5 expected are merged (per
    group); outcomes of probability 0 are counted apart, not in the statistic.
    -> (statistic, bound df + 6 sqrt(2 df): six standard deviations, impossible outcomes seen)."""
    groups = [(samples, probs)] if given is None else [(samples[given == g], probs[g]) for g in given.unique()]
    stat, df, impossible = 0.0, 0, 0
    for x, p in groups:
        obs = torch.bincount(x.flatten(), minlength=p.numel()).double()
        exp = p.flatten().double() * x.numel()
        impossible += int(obs[exp == 0].sum())
        big, small = exp >= 5, (exp < 5) & (exp > 0)
        obs = torch.cat((obs[big], obs[small].sum()[None]))
        exp = torch.cat((exp[big], exp[small].sum()[None]))
        keep = exp > 0
        stat += ((obs - exp)[keep] ** 2 / exp[keep]).sum().item()
        df += max(int(keep.sum()) - 1, 0)
    return stat, df + 6 * math.sqrt(2 * max(df, 1)), impossible


def chi2_ok(samples, probs, given=None) -> bool:
    stat, bound, impossible = chi2(samples, probs, given)
    return not impossible and stat < bound


def oracle(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The sampling distribution, plainly (not sampling.logits_to_probs): softmax(logits / T) over
    the top_k largest logits (ties with the k-th kept), renormalised; then over the smallest set
    of the largest probabilities whose mass reaches top_p (ties kept), renormalised. float64."""
    rows = []
    for z in logits.double().reshape(-1, logits.shape[-1]):
        p = torch.softmax(z / temperature, -1)
        if top_k:
            p = torch.where(z >= z.sort(descending=True).values[top_k - 1], p, 0)
            p = p / p.sum()
        if top_p < 1:
            vals = p.sort(descending=True).values
            last = next(i for i, c in enumerate(vals.cumsum(0).tolist()) if c >= top_p)
            p = torch.where(p >= vals[last], p, 0)
            p = p / p.sum()
        rows.append(p)
    return torch.stack(rows).view(logits.shape)


@pytest.mark.parametrize("setting", [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.3, 5, 1.0), (1.0, 1, 1.0), (0.8, 0, 0.9),
                                     (1.0, 0, 0.3), (0.7, 6, 0.8), (1.2, 20, 0.95)])
def test_sampling_distribution_equals_the_oracle(setting):
    """logits_to_probs (its 1024-candidate nucleus and the full sort) against the plain oracle, on
    logits with ties, including ties at the top-k and top-p boundaries."""
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 40) * 2
    logits[..., :8] = logits[..., 8:16]  # ties
    want = oracle(logits, *setting)
    for full_sort in (False, True):
        got, _ = sampling.logits_to_probs(logits, sampling.Sampling(*setting), full_sort=full_sort)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# --- broken rules: each must be caught by the same checks that pass the real one ---------------
def accept_all(p, q, d, vocab=None):
    B, g = d.shape
    return torch.full((B,), g), sampling.sample(p[:, g])


right = sampling.speculative_accept


def resample_from_p(p, q, d, vocab=None):  # the right acceptance test, but the rejection resamples p, not p - q
    a, _ = right(p, q, d)
    return a, sampling.sample(p[torch.arange(len(a)), a])


def no_min_one(p, q, d, vocab=None):  # accept with prob p/q and also reject when p > q
    B, g = d.shape
    pd, qd = p[:, :g].gather(-1, d[..., None])[..., 0], q.gather(-1, d[..., None])[..., 0]
    ok = torch.rand_like(pd) < (pd / qd) * (pd <= qd)
    a = ok.int().cumprod(-1).sum(-1)
    r = (p[torch.arange(B), a] - torch.cat((q, torch.zeros_like(q[:, :1])), 1)[torch.arange(B), a]).clamp(min=0)
    return a, sampling.sample(torch.where(r.sum(-1, keepdim=True) > 0, r, p[torch.arange(B), a]))


def bonus_from_residual(p, q, d, vocab=None):  # all g accepted: the bonus from max(p_g - q_g, 0), not p_{g+1}
    B, g = d.shape
    a, t = right(p, q, d)
    r = (p[:, g - 1] - q[:, g - 1]).clamp(min=0)
    return a, torch.where(a == g, sampling.sample(torch.where(r.sum(-1, keepdim=True) > 0, r, p[:, g - 1])), t)


def bonus_from_wrong_p(p, q, d, vocab=None):  # all g accepted: the bonus from p_g, not p_{g+1}
    B, g = d.shape
    a, t = right(p, q, d)
    return a, torch.where(a == g, sampling.sample(p[:, g - 1]), t)


BROKEN = [accept_all, resample_from_p, no_min_one, bonus_from_residual, bonus_from_wrong_p]


def committed(rule, p, q, n) -> list[torch.Tensor]:
    """Run the rule on n rows with fixed per-position p [g+1, V], q [g, V]; -> for each position
    j = 0..g of the step, the token committed there by the rows that got that far (a >= j: drafts
    d_1..d_a, then the correction or, at j = g, the bonus token)."""
    g = q.shape[0]
    d = torch.stack([torch.multinomial(q[i], n, replacement=True) for i in range(g)], 1)
    a, t = rule(p.expand(n, -1, -1), q.expand(n, -1, -1), d)
    return [torch.where(a > j, d[:, min(j, g - 1)], t)[a >= j] for j in range(g + 1)]


def every_position_ok(rule, p, q, n) -> bool:
    return all(chi2_ok(x, p[j]) for j, x in enumerate(committed(rule, p, q, n)))


@pytest.mark.parametrize("g", [1, 4])
def test_acceptance_rule_returns_the_target_distribution(g):
    """Given the drafts before it were accepted, the token at every committed position j follows
    p_{j+1}, the bonus token (j = g, all drafts accepted) included; 10^5 rows in one batched call."""
    torch.manual_seed(g)
    V, n = 6, 100_000
    p = torch.distributions.Dirichlet(torch.ones(V)).sample((g + 1,))
    q = torch.distributions.Dirichlet(torch.ones(V)).sample((g,))
    q[0, 0] = 0  # a token the draft never proposes must still come out at its target rate
    q[0] /= q[0].sum()
    assert (p[:g] - q).abs().sum(-1).min() > 0.3 and (p[g] - p[g - 1]).abs().sum() > 0.3  # the draft is off
    assert every_position_ok(right, p, q, n)
    for rule in BROKEN:
        assert not every_position_ok(rule, p, q, n), rule.__name__


def test_acceptance_rule_with_identical_draft_accepts_all():
    p = torch.softmax(torch.randn(1, 4, 10), -1)
    d = torch.multinomial(p[0, :3], 1).T
    a, _ = sampling.speculative_accept(p, p[:, :3], d)
    assert a.item() == 3


# --- end to end -----------------------------------------------------------------------------------
@torch.no_grad()
def logits_after(model, prompts: list[list[int]]) -> torch.Tensor:
    """Each prompt's next-token logits [len(prompts), V] from one plain forward (equal lengths)."""
    x = torch.tensor(prompts)
    model.setup_caches(*x.shape)
    return model(x, torch.arange(x.shape[1]).expand(x.shape[0], -1))[:, -1]


def exact(model, prompt, setting) -> torch.Tensor:
    """The exact joint of the first two sampled tokens after `prompt` [V, V], from the oracle."""
    V = model.args.vocab_size
    first = oracle(logits_after(model, [prompt]), *setting)[0]
    return first[:, None] * oracle(logits_after(model, [prompt + [v] for v in range(V)]), *setting)


def matches(model, prompt, setting, n, **kw):
    """Do n sampled continuations (2 tokens; speculative with kw) follow the exact joint?"""
    out, _, _ = gen.generate(model, [prompt] * n, 2, temperature=setting[0], top_k=setting[1],
                             top_p=setting[2], **kw)
    toks = torch.tensor(out)
    p = exact(model, prompt, setting)
    return chi2_ok(toks[:, 0], p.sum(1)) and chi2_ok(toks[:, 0] * p.shape[0] + toks[:, 1], p)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=12, intermediate_size=64,
                     max_seq_len=64)
    model, draft = Transformer(args).eval(), Transformer(args).eval()
    for m in (model, draft):
        for w in m.parameters():
            w.data.normal_(0, 0.5)
    return model, draft, torch.randint(0, 12, (12,)).tolist()


@pytest.mark.parametrize("setting", [(1.0, 0, 1.0), (0.7, 8, 0.9)])
def test_speculative_sampling_matches_target_small_model(small, setting, monkeypatch):
    """Self-drafting with 2 drafts (the second token: a second draft or a correction) and a separate
    draft model with 1 (the second token: often the bonus); every broken rule fails the latter."""
    model, draft, prompt = small
    self_kw = dict(gamma=2, budget=6, sink=2)  # the prompt outgrows the window: q != p
    snap_kw = dict(gamma=2, budget=6, sink=1, draft_cache="snapkv")  # 3 selected + a ring of 3
    sep_kw = dict(gamma=1, draft_model=draft, budget=0)  # a random draft, far from the target
    torch.manual_seed(1)
    with torch.no_grad():
        assert matches(model, prompt, setting, 20_000)  # plain sampling passes the same check
        assert matches(model, prompt, setting, 20_000, **self_kw)
        assert matches(model, prompt, setting, 20_000, **snap_kw)
        assert matches(model, prompt, setting, 20_000, **sep_kw)
        if setting[1] == 0:
            for rule in BROKEN:
                monkeypatch.setattr(sampling, "speculative_accept", rule)
                assert not matches(model, prompt, setting, 20_000, **sep_kw), rule.__name__


def test_top_p_fallback_keeps_the_distribution(small, monkeypatch):
    """With 2 candidates the nucleus (top_p 0.8 of 12 ids) outgrows them at most steps: the verify
    is redone with a full sort and the draft keeps its truncated nucleus as the proposal."""
    model, draft, prompt = small
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", 2)
    setting = (1.0, 0, 0.8)
    torch.manual_seed(3)
    with torch.no_grad():
        assert matches(model, prompt, setting, 20_000)
        assert matches(model, prompt, setting, 20_000, gamma=2, budget=6, sink=2)
        assert matches(model, prompt, setting, 20_000, gamma=1, draft_model=draft, budget=0)


def test_top_p_candidates_equal_the_full_sort():
    """The nucleus from the 1024 largest logits equals the full sort's whenever `covered`."""
    import tp

    torch.manual_seed(0)
    V = 5000
    one = tp.Vocab(V)
    for scale, top_p, covered in [(4.0, 0.99, True), (2.0, 0.8, True), (1.0, 0.5, True), (2.0, 0.95, False)]:
        logits = torch.randn(6, 3, V) * scale
        logits[..., :10] = logits[..., 10:20]  # ties
        got, cov = sampling.nucleus(logits, one, top_p)
        ref, _ = sampling.nucleus(logits, one, top_p, full_sort=True)
        assert bool(cov) == covered, (scale, top_p)
        if covered:
            assert torch.equal(got, ref)
        kept = ref.isfinite().sum(-1)
        mass = torch.where(ref.isfinite(), logits.softmax(-1), 0).sum(-1)
        assert (mass >= top_p - 1e-6).all() and (kept >= 1).all()


def one_step(p1: torch.Tensor, p2: torch.Tensor, q: torch.Tensor, n: int):
    """One gamma = 1 step of n rows at rule level, on exact distributions: target p1 [V] after the
    prompt and p2 [V, V] after the prompt + each token, draft q [V]. -> (accepted [n], first
    token [n], next token [n])."""
    d = torch.multinomial(q, n, replacement=True)
    a, t = sampling.speculative_accept(torch.stack((p1.expand(n, -1), p2[d]), 1), q.expand(n, 1, -1), d[:, None])
    return a, torch.where(a == 1, d, t), t


def step_ok(p1, p2, a, first, t) -> bool:
    """The first committed token follows p1; the bonus (rows that accepted the draft) p2[first]."""
    return chi2_ok(first, p1) and chi2_ok(t[a == 1], p2, given=first[a == 1])


def step_rejected(p1, p2, a, first, t) -> bool:
    """The statistic alone rejects (impossible outcomes left out of it)."""
    return any(s > bound for s, bound, _ in (chi2(first, p1), chi2(t[a == 1], p2, given=first[a == 1])))


@pytest.mark.parametrize("draft_cache", ["streaming", "snapkv"])
def test_speculative_sampling_matches_target_real_model(smol, draft_cache, monkeypatch):
    """The real model self-drafting on a window that the prompt outgrows (gamma 1, 2 tokens: the
    second is the bonus when the draft passes). The pipeline hands the rule the model's exact
    distributions (the oracle's, at the right positions); its first step's tokens follow them; and
    the rule run on those exact (p, q) with 20,000 rows passes, where every broken rule fails by
    the statistic itself."""
    model, tok = smol
    setting = (0.8, 20, 0.95)
    prompt = tok.encode("After a long debate about the roof and the windows, the committee agreed that")
    n, L = 300, len(prompt)
    seen = []

    def spy(p, q, d, vocab=None):
        a, t = right(p, q, d, vocab)
        seen.append((p, q, d, a, t))
        return a, t

    monkeypatch.setattr(sampling, "speculative_accept", spy)
    torch.manual_seed(2)
    model.setup_caches(n, stats.cache_len(L + 2, 1))  # every row prefilled (each keeps its own queries for snapkv)
    gen.prefill(model, torch.tensor([prompt] * n), torch.full((n,), L - 1), slice(0, n), model.max_seq_len)
    out, _, _ = gen.generate(model, [prompt] * n, 2, prefilled=True, gamma=1, budget=1 + 3, sink=1, draft_cache=draft_cache,
                             temperature=setting[0], top_k=setting[1], top_p=setting[2])
    out = torch.tensor(out)
    p, q, d, a, t = seen[0]  # the first step: every row after the same prompt
    # the exact distributions, on the tokens they can reach (K of them; id K: any other, probability 0)
    p1 = oracle(logits_after(model, [prompt]), *setting)[0]
    ids = torch.cat(((p1 > 0).nonzero()[:, 0], (q[0, 0] > 0).nonzero()[:, 0])).unique()  # first tokens
    after = oracle(logits_after(model, [prompt + [int(i)] for i in ids]), *setting)
    row_of = torch.full((p1.numel(),), -1)
    row_of[ids] = torch.arange(len(ids))
    torch.testing.assert_close(p[:, 0].double(), p1.expand(n, -1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(p[:, 1].double(), after[row_of[d[:, 0]]], rtol=1e-4, atol=1e-6)  # at each draft
    keep = torch.cat((ids, (after > 0).nonzero()[:, 1])).unique()
    K = len(keep)
    c = torch.full((p1.numel(),), K)
    c[keep] = torch.arange(K)
    pad = lambda x: torch.cat((x[..., keep], x.new_zeros(*x.shape[:-1], 1)), -1).float()
    c1, cq = pad(p1), pad(q[0, 0].double())
    c2 = torch.zeros(K + 1, K + 1)
    c2[c[ids]] = pad(after)
    assert torch.equal(q, q[:1].expand(n, -1, -1)) and chi2_ok(c[d[:, 0]], cq)  # the drafts follow q
    assert 0.1 < a.float().mean() < 0.9 and (c1 - cq).abs().sum() > 0.2  # the draft is off, and some pass
    assert torch.equal(out[:, 0], torch.where(a == 1, d[:, 0], t)) and torch.equal(out[a == 1, 1], t[a == 1])
    assert step_ok(c1, c2, a, c[out[:, 0]], c[t])
    # the rule at rule level on the same exact (p, q)
    monkeypatch.setattr(sampling, "speculative_accept", right)
    assert step_ok(c1, c2, *one_step(c1, c2, cq, 20_000))
    for rule in BROKEN:
        monkeypatch.setattr(sampling, "speculative_accept", rule)
        assert step_rejected(c1, c2, *one_step(c1, c2, cq, 20_000)), rule.__name__
