"""The SnapKV-selected draft cache: what it keeps (against an independent reading of the full cache
and the observation queries), the queries a chunked prefill keeps for it, refilled rows, and
lossless decoding with it (greedy eager and compiled on a tiny model; the real model's greedy,
refill, TP and sampling checks are in test_generate, test_refill, test_tp and test_sampling)."""
import math
from typing import NamedTuple

import pytest
import torch

import generate as gen
from model import OBS, KVCache, ModelArgs, SnapKVCache, Transformer

B, HKV, G, D, S = 3, 2, 3, 16, 400


def reference_score(q, k, n, b, h, pool=7) -> torch.Tensor:
    """Row b, KV head h: each position's score in [0, n[b]), read loop by loop: the w = q.shape[1]
    queries at positions n-w..n-1 (those >= 0), each query head g of KV head h attending to keys
    0..its position, its own included (softmax), weights summed over queries and heads, averaged
    over the `pool` neighbours inside [0, n)."""
    w = q.shape[1]
    score = torch.zeros(n[b], dtype=torch.float64)
    for j in range(w):
        p = n[b] - w + j
        if p < 0:
            continue
        for g in range(G):
            logits = (k[b, h, : p + 1].double() @ q[b, j, h * G + g].double()) / math.sqrt(D)
            score[: p + 1] += logits.softmax(0)
    return torch.stack([score[max(0, i - pool // 2): i + pool // 2 + 1].mean() for i in range(n[b])])


class Reference(NamedTuple):
    keep: list  # [B][HKV] sets of positions
    score: list  # [B][HKV] reference_score of that row and head


def reference_keep(q, k, n, sink, select, window, pool=7) -> Reference:
    """Per row and KV head, the positions snapkv keeps in its selected slots: among positions
    before the ring (the last `window`), the sinks and the observation window first, then the best
    scores (reference_score)."""
    w, keep, scores = q.shape[1], [], []
    for b in range(q.shape[0]):
        keep.append([]), scores.append([])
        for h in range(k.shape[1]):
            pooled = reference_score(q, k, n, b, h, pool)
            cand = list(range(max(0, n[b] - window)))
            forced = [p for p in cand if p < sink or p >= n[b] - w]
            rest = sorted((p for p in cand if p not in forced), key=lambda p: -pooled[p])
            keep[b].append(set(forced + rest[: select - len(forced)]))
            scores[b].append(pooled)
    return Reference(keep, scores)


def random_full(seed=0):
    torch.manual_seed(seed)
    full = KVCache(B, HKV, S, D, torch.float32)
    full.k.normal_()
    full.v.normal_()
    full.k[:, :, :, 0] *= 4  # some keys stand out
    return full


def check_slots(cache, full, n, keep, written=None):
    """Every slot of every row and head: its position is the reference's choice (selected slots) or
    one of the last `window` positions (ring), and its K/V are that position's."""
    sel, win = cache.select, cache.window
    for b in range(len(n)):
        for h in range(HKV):
            pos = cache.pos[b, h].tolist()
            assert {p for p in pos[:sel] if p >= 0} == keep[b][h], (b, h)
            end = n[b] + (0 if written is None else written[1][b].shape[0])
            recent = set(range(max(0, end - win), end))
            assert {p for p in pos[sel:] if p >= 0} == recent, (b, h)
            for s, p in enumerate(pos):
                if p < 0:
                    continue
                if p < n[b]:
                    kk, vv = full.k[b, h, p], full.v[b, h, p]
                else:  # written by update
                    kk, vv = written[1][b][p - n[b], h], written[2][b][p - n[b], h]
                assert torch.equal(cache.k[b, h, s], kk) and torch.equal(cache.v[b, h, s], vv), (b, h, s, p)
                if s >= sel:
                    assert s == sel + p % win  # the ring slot of its position


@pytest.mark.parametrize("sink,select,window", [(4, 40, 24), (0, 24, 20), (2, 30, 8)])
def test_fill_and_updates_keep_what_an_independent_reading_says(sink, select, window):
    """Rows of prompt lengths 5 (shorter than the window of queries), 90 and 357, random keys and
    observation queries: after fill, and after updates that wrap the ring twice, every slot holds
    the (position, K, V) the reference names. Selection differs between heads."""
    full = random_full()
    n = [5, 90, 357]
    q = torch.randn(B, OBS, HKV * G, D)
    c = SnapKVCache(B, HKV, D, torch.float32, sink=sink, select=select, window=window)
    c.fill(full, torch.tensor(n), q=q)
    keep, ref = reference_keep(q, full.k, n, sink, select, window)
    assert keep[2][0] != keep[2][1]  # per KV head
    got = c.score(q, full.k, torch.tensor(n))  # the scores themselves, not only their ranking
    end = [m - c.pool // 2 for m in n]  # (past it the pooling reads beyond n: positions the ring holds)
    for b in range(B):
        for h in range(HKV):
            torch.testing.assert_close(got[b, h, : end[b]].double(), ref[b][h][: end[b]])
    check_slots(c, full, n, keep)
    torch.manual_seed(1)
    T, steps = 3, -(-2 * window // 3) + 1
    ks, vs = [torch.randn(steps * T, HKV, D) for _ in n], [torch.randn(steps * T, HKV, D) for _ in n]
    for i in range(steps):  # what drafts and verify hand-offs write: T new positions per row
        pos = torch.tensor(n)[:, None] + i * T + torch.arange(T)
        kk, vv, kp = c.update(pos, torch.stack([x[i * T: (i + 1) * T] for x in ks]),
                              torch.stack([x[i * T: (i + 1) * T] for x in vs]))
        assert kp.shape == (B, HKV, select + window) and kk.data_ptr() == c.k.data_ptr()
    check_slots(c, full, n, keep, (None, ks, vs))


def test_refilled_rows_get_their_own_selection_and_leave_the_others():
    full = random_full()
    c = SnapKVCache(B, HKV, D, torch.float32, sink=4, select=40, window=24)
    c.fill(full, torch.tensor([50, 120, 200]), q=torch.randn(B, OBS, HKV * G, D))
    before = [t[1].clone() for t in (c.k, c.v, c.pos)]
    full2 = random_full(seed=3)  # rows 2 and 0 prefilled anew, in that order, with other prompts
    full.k[[2, 0]], full.v[[2, 0]] = full2.k[[2, 0]], full2.v[[2, 0]]
    n, q = [300, 70], torch.randn(2, OBS, HKV * G, D)
    c.fill(full, torch.tensor(n), rows=torch.tensor([2, 0]), q=q)
    assert all(torch.equal(t[1], x) for t, x in zip((c.k, c.v, c.pos), before))
    keep = reference_keep(q, full.k[[2, 0]], n, 4, 40, 24).keep
    for i, row in enumerate((2, 0)):
        one = SnapKVCache(1, HKV, D, torch.float32, sink=4, select=40, window=24)
        one.k, one.v, one.pos = c.k[row: row + 1], c.v[row: row + 1], c.pos[row: row + 1]
        f1 = KVCache(1, HKV, S, D, torch.float32)
        f1.k, f1.v = full.k[row: row + 1], full.v[row: row + 1]
        check_slots(one, f1, [n[i]], [keep[i]])


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    args = ModelArgs(**{**dict(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=97, intermediate_size=96,
                               max_seq_len=1024), **kw})
    m = Transformer(args).eval()
    with torch.no_grad():
        for w in m.parameters():
            w.normal_(0, 0.3)
    return m


def test_prefill_keeps_each_rows_observation_queries(monkeypatch):
    """Chunks of 7 tokens over ragged rows (the windows straddle chunks, one row is shorter than the
    window): each layer keeps the queries of each row's last OBS prefilled positions, equal to those
    of one whole-prompt forward."""
    import stats

    m = tiny()
    torch.manual_seed(1)
    n = torch.tensor([100, 20, 61])
    tokens = torch.randint(0, 97, (3, 101))
    m.setup_caches(3, 128)
    with torch.no_grad():
        gen.prefill(m, tokens, n, slice(None), 128)  # one chunk
        whole = [b.attention.q_obs.clone() for b in m.layers]
        monkeypatch.setattr(stats, "PREFILL_TOKENS", 3 * 7)
        gen.prefill(m, tokens, n, slice(None), 128)
        # the queries themselves: layer 0's, from the embeddings
        a = m.layers[0].attention
        x = m.layers[0].attention_norm(m.tok_embeddings(tokens))
        q = a.wqkv(x)[..., : a.n_heads * a.head_dim].view(3, 101, a.n_heads, a.head_dim)
        pos = torch.arange(101).expand(3, -1)
        from model import apply_rope

        q = apply_rope(q, m.cos[pos][:, :, None], m.sin[pos][:, :, None])
    for b, w in zip(m.layers, whole):
        assert b.attention.q_obs.shape == (3, OBS, 6, 48 // 6)
        ok = (n[:, None] - OBS + torch.arange(OBS)) >= 0
        torch.testing.assert_close(b.attention.q_obs[ok], w[ok], rtol=1e-5, atol=1e-5)
    p = n[:, None] - OBS + torch.arange(OBS)
    for r in range(3):
        got = m.layers[0].attention.q_obs[r][p[r] >= 0]
        torch.testing.assert_close(got, q[r, p[r][p[r] >= 0]], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def model_prompts():
    m = tiny()
    torch.manual_seed(2)
    prompts = [torch.randint(0, 97, (k,)).tolist() for k in (150, 9, 333, 64)]
    return m, prompts, gen.generate(m, prompts, 40)[0]


@pytest.mark.parametrize("kw", [dict(gamma=3, budget=32, sink=4), dict(gamma=4, budget=48, sink=2, ring=12),
                                dict(gamma="auto", budget=40, sink=4)])
def test_greedy_snapkv_is_exact_tiny(model_prompts, kw):
    m, prompts, ref = model_prompts
    new, _, st = gen.generate(m, prompts, 40, draft_cache="snapkv", **kw)
    assert new == ref and 0 < st["acceptance_rate"] < 1


def test_compiled_snapkv_refill_is_exact(model_prompts):
    """Compiled (FlexAttention with per-KV-head positions), more prompts than rows: refilled rows'
    tokens equal eager plain decoding's, and refills compile nothing new."""
    m, prompts, _ = model_prompts
    limits = [17, 30, 9, 25, 12, 20]
    torch.manual_seed(3)
    ps = prompts + [torch.randint(0, 97, (k,)).tolist() for k in (41, 200)]
    reqs = [gen.Request(p, n, i) for i, (p, n) in enumerate(zip(ps, limits))]
    ref = {r.id: r.tokens for r in gen.Decoder(m, 2, 400, 30).run(reqs)}
    dec = gen.Decoder(m, 2, 400, 30, gamma=3, budget=32, sink=4, draft_cache="snapkv", compile=True)
    dec.warm_up()
    n = gen.unique_graphs()
    got = {r.id: r.tokens for r in dec.run(reqs)}
    assert got == ref and gen.unique_graphs() == n and dec.stats()["attention"] == "flex"


def test_separate_draft_model_selects_its_window(model_prompts):
    m, prompts, ref = model_prompts
    draft = tiny(seed=5, n_layers=1)
    new, _, st = gen.generate(m, prompts, 40, gamma=2, draft_model=draft, budget=32, sink=4, draft_cache="snapkv")
    assert new == ref
    assert isinstance(draft.layers[0].attention.draft_cache, SnapKVCache)
    assert draft.layers[0].attention.kv_cache is not None  # scored on its own full cache


@pytest.mark.parametrize("kw,message", [(dict(draft_cache="h2o"), "draft_cache 'h2o': streaming or snapkv"),
                                        (dict(ring=3), "snapkv: a ring of 3 slots"),
                                        (dict(budget=30, sink=20), "snapkv: a ring of 15 slots")])
def test_bad_snapkv_options_are_one_error(kw, message):
    from model import UsageError

    with pytest.raises(UsageError, match=message):
        gen.Decoder(tiny(), 2, 64, 8, **{**dict(gamma=4, budget=32, sink=4, draft_cache="snapkv"), **kw})
