"""model.attend: compiled FlexAttention and eager SDPA against a plain reference with an explicit
mask, for the full cache and the draft window, ragged rows, GQA groups 1, 3 and 8, and query
lengths 1 (decode), 5 (verify) and a prefill chunk spanning two query blocks."""
import pytest
import torch
import torch.nn.functional as F

from model import BLOCK, KVCache, WindowCache, attend, block_mask


def reference(q, k, v, q_pos, kv_pos):
    """Each query head h reads KV head h // G; a slot is visible iff 0 <= its position <= the query's."""
    S = k.shape[2]
    kv_pos = torch.arange(S).expand(q.shape[0], S) if kv_pos is None else kv_pos
    vis = (kv_pos[:, None, :] >= 0) & (kv_pos[:, None, :] <= q_pos[..., None])  # [B, T, S]
    G = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                          attn_mask=vis[:, None])


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
    assert kv_pos[2].max() == 299 + T and (kv_pos[2] >= 4).sum() == 60  # the ring wrapped
    assert (kv_pos[0] == -1).sum() == 64 - 3 - T  # mostly empty
    return torch.randn(B, Hkv * G, T, D), k, v, q_pos, kv_pos


CASES = [(full_case, 1, 1), (full_case, 3, 5), (full_case, 8, BLOCK + 2),
         (window_case, 8, 1), (window_case, 1, 5), (window_case, 3, 40)]


@pytest.mark.parametrize("make,G,T", CASES, ids=[f"{m.__name__}-G{g}-T{t}" for m, g, t in CASES])
def test_attention_backends_match_the_reference(make, G, T):
    q, k, v, q_pos, kv_pos = make(G, T)
    ref = reference(q, k, v, q_pos, kv_pos)
    torch.testing.assert_close(attend(q, k, v, q_pos, kv_pos, flex=False), ref, rtol=1e-5, atol=1e-5)
    flex = torch.compile(attend, fullgraph=True, dynamic=False)
    torch.testing.assert_close(flex(q, k, v, q_pos, kv_pos, True), ref, rtol=1e-5, atol=1e-5)


def test_block_mask_reads_each_rows_own_blocks():
    """The full cache's block mask holds per-row KV block counts computed from the positions (no
    S-sized mask): a row reads only the blocks up to its last position."""
    S = 8 * BLOCK
    q_pos = torch.tensor([[0, 1], [BLOCK - 1, BLOCK], [5 * BLOCK + 3, 5 * BLOCK + 4]])
    bm = block_mask(q_pos, None, S)
    assert bm.kv_num_blocks.flatten().tolist() == [1, 2, 6]
    kv_pos = torch.full((3, 2 * BLOCK), -1)
    assert block_mask(q_pos, kv_pos, 2 * BLOCK).kv_num_blocks.flatten().tolist() == [2, 2, 2]  # a window: whole
