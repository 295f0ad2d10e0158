"""model.attend: compiled FlexAttention and eager SDPA against a plain reference with an explicit
mask, for the full cache and the draft caches (StreamingLLM's window; SnapKV's per-KV-head
positions), ragged rows, GQA groups 1, 3 and 8, and query
lengths 1 (decode), 5 (verify) and a prefill chunk spanning two query blocks."""
import pytest
import torch
import torch.nn.functional as F

from model import BLOCK, OBS, CacheArgs, KVCache, SnapKVCache, WindowCache, attend, block_mask
from test_draft_cache import kept


def reference(q, k, v, q_pos, kv_pos):
    """Each query head h reads KV head h // G; a slot is visible iff 0 <= its position <= the query's."""
    S, G = k.shape[2], q.shape[1] // k.shape[1]
    kv_pos = torch.arange(S).expand(q.shape[0], S) if kv_pos is None else kv_pos
    kv_pos = kv_pos[:, None] if kv_pos.dim() == 2 else kv_pos.repeat_interleave(G, 1)  # [B, 1 or H, S]
    vis = (kv_pos[:, :, None, :] >= 0) & (kv_pos[:, :, None, :] <= q_pos[:, None, :, None])  # [B, 1 or H, T, S]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=vis)


def full_case(G, T, seed=0):
    torch.manual_seed(seed)
    B, Hkv, D, S = 3, 2, 32, 384
    q = torch.randn(B, Hkv * G, T, D)
    k, v = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    start = torch.tensor([0, 37, S - T])  # rows of different lengths, one reading the last slot
    return q, k, v, start[:, None] + torch.arange(T), None


def window_case(G, T, seed=0):
    """A WindowCache (4 sinks + a ring of 60) filled from a full cache for rows of lengths 3
    (mostly empty), 50 (no wrap yet) and 300 (wrapped), queried at the next T positions."""
    torch.manual_seed(seed)
    B, Hkv, D = 3, 2, 32
    full = KVCache(B, Hkv, 512, D, torch.float32)
    full.k.normal_()
    full.v.normal_()
    w = WindowCache(B, Hkv, D, torch.float32, sink=4, window=60)
    length = torch.tensor([3, 50, 300])
    w.fill(full, length)
    q_pos = length[:, None] + torch.arange(T)
    k_new, v_new = torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    k, v, kv_pos = w.update(q_pos, k_new, v_new)  # what a draft step or a verify hand-off writes
    for b, n in enumerate(length.tolist()):  # StreamingLLM's positions, each with its own K/V
        want = {p: full.k[b, :, p] for p in range(n)} | {n + t: k_new[b, t] for t in range(T)}
        held = kv_pos[b][kv_pos[b] >= 0].tolist()
        assert sorted(held) == kept(n + T - 1, 4, 60)
        assert all(torch.equal(k[b, :, s], want[p]) for s, p in enumerate(kv_pos[b].tolist()) if p >= 0)
    assert kv_pos[2].max() == 299 + T and (kv_pos[2] >= 4).sum() == 60  # the ring wrapped
    return torch.randn(B, Hkv * G, T, D), k, v, q_pos, kv_pos


def snapkv_case(G, T, seed=0):
    """A SnapKVCache (24 selected slots, 2 of them sinks, + a ring of 40), rows of lengths 3, 50 and
    300: positions differ per KV head."""
    torch.manual_seed(seed)
    B, Hkv, D = 3, 2, 32
    full = KVCache(B, Hkv, 512, D, torch.float32)
    full.k.normal_()
    full.v.normal_()
    c = SnapKVCache(B, Hkv, D, torch.float32, sink=2, select=24, window=40)
    length = torch.tensor([3, 50, 300])
    c.fill(full, length, q=torch.randn(B, OBS, Hkv * G, D))
    q_pos = length[:, None] + torch.arange(T)
    k, v, kv_pos = c.update(q_pos, torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D))
    assert kv_pos.shape == (B, Hkv, 64) and not torch.equal(kv_pos[2, 0], kv_pos[2, 1])  # per KV head
    kv_pos[1:, 1, :5] = -1  # and one head with fewer filled slots: heads differ in what is visible too
    return torch.randn(B, Hkv * G, T, D), k, v, q_pos, kv_pos


CASES = [(full_case, 1, 1), (full_case, 3, 5), (full_case, 8, BLOCK + 2),
         (window_case, 8, 1), (window_case, 1, 5), (window_case, 3, 40),
         (snapkv_case, 3, 1), (snapkv_case, 8, 5), (snapkv_case, 1, 20)]


@pytest.mark.parametrize("make,G,T", CASES, ids=[f"{m.__name__}-G{g}-T{t}" for m, g, t in CASES])
def test_attention_backends_match_the_reference(make, G, T, monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 64)  # a graph per case, one code object
    q, k, v, q_pos, kv_pos = make(G, T)
    ref = reference(q, k, v, q_pos, kv_pos)
    torch.testing.assert_close(attend(q, k, v, q_pos, kv_pos, CacheArgs()), ref, rtol=1e-5, atol=1e-5)
    flex = torch.compile(lambda *a: attend(*a, CacheArgs(flex=True)), fullgraph=True, dynamic=False)
    torch.testing.assert_close(flex(q, k, v, q_pos, kv_pos), ref, rtol=1e-5, atol=1e-5)


def test_block_mask_reads_each_rows_own_blocks():
    """The full cache's block mask holds per-row KV block counts computed from the positions (no
    S-sized mask): a row reads only the blocks up to its last position."""
    S = 8 * BLOCK
    q_pos = torch.tensor([[0, 1], [BLOCK - 1, BLOCK], [5 * BLOCK + 3, 5 * BLOCK + 4]])
    bm = block_mask(q_pos, None, S)
    assert bm.kv_num_blocks.flatten().tolist() == [1, 2, 6]
    kv_pos = torch.full((3, 2 * BLOCK), -1)
    assert block_mask(q_pos, kv_pos, 2 * BLOCK).kv_num_blocks.flatten().tolist() == [2, 2, 2]  # a window: whole


@pytest.mark.parametrize("G,T,start", [(3, 7, 0), (8, 40, 200), (1, 130, 90)])
def test_prefill_chunk_attention_matches_the_reference(G, T, start):
    """A prefill chunk (every row's queries at positions start..start+T-1, reading the first
    start+T slots) takes one causal mask broadcast over the rows; per row it is the reference."""
    torch.manual_seed(G)
    B, Hkv, D = 3, 2, 32
    S = start + T
    q, k, v = torch.randn(B, Hkv * G, T, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    q_pos = (start + torch.arange(T)).expand(B, -1)
    c = CacheArgs(kv_len=S)
    torch.testing.assert_close(attend(q, k, v, q_pos, None, c), reference(q, k, v, q_pos, None), rtol=1e-5, atol=1e-5)
    assert c.masks["prefill"].shape == (1, 1, G * T, S)  # one mask for every row and layer


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (32, 8), (64, 8)], ids=["smollm2-135m", "llama-3.1-8b", "llama-3.1-70b"])
def test_flex_attention_gets_the_decoding_kernels_layout(heads, kv_heads, monkeypatch):
    """Inductor's split-KV decoding kernel (torch/_inductor/kernel/flex/flex_decoding.py,
    _use_flex_decoding) needs a query length below 128, static batch and heads, a block mask with
    head dimension 1 under GQA, and H_q / H_kv a power of two. The decode, verify (every gamma
    --gamma auto may pick, up to 6) and draft steps of these head layouts hand flex_attention
    exactly that: the G query heads of a KV group folded into the query axis (ratio 1, G*T rows)."""
    import generate as gen
    import model as M
    from cli import Request
    from sampling import AUTO_GAMMAS

    from torch.nn.attention.flex_attention import flex_attention as real

    seen = []

    def spy(q, k, v, block_mask=None, **kw):
        seen.append((tuple(q.shape), tuple(k.shape), tuple(block_mask.kv_num_blocks.shape), kw))
        return real(q, k, v, block_mask=block_mask, **kw)

    monkeypatch.setattr(M, "flex_attention", spy)
    torch.manual_seed(0)
    args = M.ModelArgs(dim=8 * heads, n_layers=1, n_heads=heads, n_kv_heads=kv_heads, head_dim=16, vocab_size=64,
                       intermediate_size=32, max_seq_len=512)
    model = M.Transformer(args).eval()
    dec = gen.Decoder(model, 2, 300, 8, gamma="auto", budget=40, sink=4, attention="flex")  # eager FlexAttention
    with torch.no_grad():
        dec.prefill([0, 1], [Request([t % 64 for t in range(1, 60)], 8), Request([t % 64 for t in range(1, 200)], 8)])
        seen.clear()  # the prefill's forwards: dense SDPA, not flex, but kept out of the count anyway
        for g in AUTO_GAMMAS:
            dec.speculate(g)
    G = heads // kv_heads
    assert len(seen) == sum(g + 1 for g in AUTO_GAMMAS)  # every draft and verify forward, one layer each
    for q, k, bm, kw in seen:
        assert q[0] == k[0] == 2 and q[1] == k[1] == kv_heads  # one query head per KV head: ratio 1
        assert q[2] % G == 0 and q[2] // G <= max(AUTO_GAMMAS) + 1 and q[2] < 128
        assert bm[:2] == (2, 1) and not kw.get("enable_gqa")
