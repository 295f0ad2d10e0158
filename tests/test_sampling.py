"""Speculative sampling returns the target's distribution: the rule alone, a small model end to
end, and the real default model; each check is also run against deliberately broken rules."""
import math

import pytest
import torch

import generate as gen
import sampling
from model import ModelArgs, Transformer


def chi2_ok(samples: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson's chi-square of `samples` (ids) against `probs`, cells with < 5 expected merged;
    passes below df + 6 * sqrt(2 df) (six standard deviations of the statistic)."""
    n = samples.numel()
    obs = torch.bincount(samples.flatten(), minlength=probs.numel()).double()
    exp = probs.flatten().double() * n
    if (obs[exp == 0] > 0).any():
        return False  # an impossible outcome
    small = exp < 5
    obs = torch.cat((obs[~small], obs[small].sum()[None]))
    exp = torch.cat((exp[~small], exp[small].sum()[None]))
    keep = exp > 0
    stat = ((obs - exp)[keep] ** 2 / exp[keep]).sum().item()
    df = int(keep.sum()) - 1
    return stat < df + 6 * math.sqrt(2 * df)


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


BROKEN = [accept_all, resample_from_p, no_min_one]


def committed(rule, p, q, n):
    """Run the rule on n rows with fixed per-position p [g+1, V], q [g, V]; -> the first committed
    token of every row, and the second one of the rows that accepted the first draft."""
    g = q.shape[0]
    d = torch.stack([torch.multinomial(q[i], n, replacement=True) for i in range(g)], 1)
    a, t = rule(p.expand(n, -1, -1), q.expand(n, -1, -1), d)
    first = torch.where(a >= 1, d[:, 0], t)
    second = torch.where(a >= 2, d[:, 1], t)[a >= 1]
    return first, second


def test_acceptance_rule_returns_the_target_distribution():
    torch.manual_seed(0)
    V, g, n = 6, 2, 200_000
    p = torch.distributions.Dirichlet(torch.ones(V)).sample((g + 1,))
    q = torch.distributions.Dirichlet(torch.ones(V)).sample((g,))
    q[0, 0] = 0  # a token the draft never proposes must still come out at its target rate
    q[0] /= q[0].sum()
    assert (p - torch.cat((q, p[-1:]))).abs().sum(-1)[:g].min() > 0.3  # the draft is off
    first, second = committed(right, p, q, n)
    assert chi2_ok(first, p[0]) and chi2_ok(second, p[1])
    for rule in BROKEN:
        f, s = committed(rule, p, q, n)
        assert not (chi2_ok(f, p[0]) and chi2_ok(s, p[1])), rule.__name__


def test_acceptance_rule_with_identical_draft_accepts_all():
    p = torch.softmax(torch.randn(1, 4, 10), -1)
    d = torch.multinomial(p[0, :3], 1).T
    a, _ = sampling.speculative_accept(p, p[:, :3], d)
    assert a.item() == 3


# --- end to end -----------------------------------------------------------------------------------
def exact(model, prompt, setting, second: bool):
    """Exact distribution of the first sampled token after `prompt` [V], or with `second` the
    joint of the first two [V, V] (one row per candidate first token)."""
    V = model.args.vocab_size
    rows = V if second else 1
    x = torch.tensor(prompt).expand(rows, -1)
    if second:
        x = torch.cat((x, torch.arange(V)[:, None]), 1)
    model.setup_caches(rows, x.shape[1])
    probs = sampling.logits_to_probs(model(x, torch.arange(x.shape[1]).expand(rows, -1)), sampling.Sampling(*setting),
                                     full_sort=True)[0]
    return probs[0, len(prompt) - 1][:, None] * probs[:, -1] if second else probs[0, -1]


def matches(model, prompt, setting, n, second, **kw):
    """Do n sampled continuations (2 tokens; speculative with kw) follow the exact distribution?"""
    out, _, _ = gen.generate(model, [prompt] * n, 2, temperature=setting[0], top_k=setting[1],
                           top_p=setting[2], **kw)
    toks = torch.tensor(out)
    p = exact(model, prompt, setting, second)
    if second:
        return chi2_ok(toks[:, 0], p.sum(1)) and chi2_ok(toks[:, 0] * p.shape[0] + toks[:, 1], p)
    return chi2_ok(toks[:, 0], p)


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
    model, draft, prompt = small
    self_kw = dict(gamma=2, budget=6, sink=2)  # the prompt outgrows the window: q != p
    snap_kw = dict(gamma=2, budget=6, sink=1, draft_cache="snapkv")  # 3 selected + a ring of 3
    sep_kw = dict(gamma=3, draft_model=draft, budget=0)  # a random draft, far from the target
    torch.manual_seed(1)
    with torch.no_grad():
        assert matches(model, prompt, setting, 20_000, True)  # plain setting passes the same check
        assert matches(model, prompt, setting, 20_000, True, **self_kw)
        assert matches(model, prompt, setting, 20_000, True, **snap_kw)
        assert matches(model, prompt, setting, 20_000, True, **sep_kw)
        if setting[1] == 0:
            for rule in BROKEN:
                monkeypatch.setattr(sampling, "speculative_accept", rule)
                assert not matches(model, prompt, setting, 20_000, True, **sep_kw), rule.__name__


def test_top_p_fallback_keeps_the_distribution(small, monkeypatch):
    """With 2 candidates the nucleus (top_p 0.8 of 12 ids) outgrows them at most steps: the verify
    is redone with a full sort and the draft keeps its truncated nucleus as the proposal."""
    model, draft, prompt = small
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", 2)
    setting = (1.0, 0, 0.8)
    torch.manual_seed(3)
    with torch.no_grad():
        assert matches(model, prompt, setting, 20_000, True)
        assert matches(model, prompt, setting, 20_000, True, gamma=2, budget=6, sink=2)
        assert matches(model, prompt, setting, 20_000, True, gamma=3, draft_model=draft, budget=0)


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


def test_speculative_sampling_matches_target_real_model(default_ckpt, truncated, monkeypatch):
    from tokenizer import load_tokenizer

    model = Transformer.from_checkpoint(default_ckpt, dtype=torch.float32)
    tok = load_tokenizer(default_ckpt)
    setting = (1.0, 12, 1.0)
    draft = truncated(model, 3)
    short = tok.encode("My favourite colour is")
    long = tok.encode("After a long debate about the roof and the windows, the committee agreed that")
    torch.manual_seed(2)
    with torch.no_grad():  # few rows: each is a real forward of the 135M model on the CPU
        assert matches(model, long, setting, 300, False, gamma=2, budget=1 + 3, sink=1)
        assert matches(model, long, setting, 300, False, gamma=2, budget=1 + 3, sink=1, draft_cache="snapkv", ring=3)
        assert matches(model, short, setting, 300, False, gamma=1, draft_model=draft, budget=0)
        monkeypatch.setattr(sampling, "speculative_accept", accept_all)
        assert not matches(model, short, setting, 300, False, gamma=1, draft_model=draft, budget=0)
