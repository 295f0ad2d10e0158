"""The self-draft's window checked by content: after a fill and after every step, each row's
window holds exactly what StreamingLLM keeps of the positions written so far (the sinks and the
last `window` positions), each slot with the full cache's K/V for its position; for rows far past
the window, rows that finish, and rows refilled together (the others untouched)."""
import torch

import generate as gen
from cli import Request
from model import Transformer


def kept(last: int, sink: int, window: int) -> list[int]:
    """StreamingLLM's positions once positions 0..last are written: the sinks + the last `window`."""
    return sorted(set(range(min(sink, last + 1))) | set(range(max(sink, last + 1 - window), last + 1)))


def check(model, last: list[int]):
    """Every layer's window against an independent reading of its full cache, row by row."""
    for i, layer in enumerate(model.layers):
        full, win = layer.attention.kv_cache, layer.attention.draft_cache
        H = win.k.shape[1]
        pos = win.pos if win.pos.dim() == 3 else win.pos[:, None].expand(-1, H, -1)  # per KV head or shared
        for b, m in enumerate(last):
            for h in range(H):
                slots = (pos[b, h] >= 0).nonzero()[:, 0]
                p = pos[b, h, slots]
                assert sorted(p.tolist()) == kept(m, win.sink, win.window), (i, b, h)  # each position once
                assert torch.equal(win.k[b, h, slots], full.k[b, h, p]), (i, b, h)
                assert torch.equal(win.v[b, h, slots], full.v[b, h, p]), (i, b, h)


def test_window_holds_sinks_and_the_last_positions(tiny_ckpt):
    model = Transformer.from_checkpoint(tiny_ckpt, "cpu", torch.float32)
    torch.manual_seed(0)
    prompts = lambda *ns: [Request(torch.randint(3, 400, (n,)).tolist(), 30, i) for i, n in enumerate(ns)]
    g = 3
    dec = gen.Decoder(model, 4, 160, 30, gamma=g, budget=16, sink=2)  # a ring of 14
    with torch.no_grad():
        first = prompts(30, 41, 5, 37)  # one shorter than the window
        dec.prefill([0, 1, 2, 3], first)
        last = [len(r.tokens) - 2 for r in first]  # the pending last token is not written yet
        check(model, last)
        for step in range(36):  # rows finish (30 new tokens each) and go on writing at their last position
            last = (dec.rows.pos + g).tolist()  # a verify writes the pending token + g drafts
            dec.step()
            check(model, last)
        assert dec.rows.done.all() and min(last) > 2 * 16  # every ring wrapped
        new = prompts(50, 19)
        dec.prefill([0, 2], new)  # rows refilled together, by an index tensor
        last[0], last[2] = len(new[0].tokens) - 2, len(new[1].tokens) - 2
        check(model, last)
        for step in range(8):
            last = (dec.rows.pos + g).tolist()
            dec.step()
            check(model, last)


def test_plain_steps_of_auto_skip_the_window_and_the_next_draft_catches_it_up(tiny_ckpt, monkeypatch):
    """--gamma auto's plain steps (gamma 0) do not write the window; the next speculative step
    first copies their positions from the full cache, to exactly what StreamingLLM keeps (after
    fewer plain steps than the ring holds, and after more)."""
    from sampling import AutoGamma

    model = Transformer.from_checkpoint(tiny_ckpt, "cpu", torch.float32)
    torch.manual_seed(0)
    plan = [0] * 9 + [2] + [0] * 7 + [1, 3] + [0] * 12 + [2, 0, 0, 4] + [0] * 20 + [1] + [0] + [3]
    it = iter(plan)
    monkeypatch.setattr(AutoGamma, "choose", lambda self, covered=False, lag=None: next(it))
    dec = gen.Decoder(model, 4, 160, 60, gamma="auto", budget=16, sink=2)  # a ring of 14
    prompts = [Request(torch.randint(3, 400, (n,)).tolist(), 60, i) for i, n in enumerate((30, 41, 5, 37))]
    win = model.layers[0].attention.draft_cache
    with torch.no_grad():
        dec.prefill([0, 1, 2, 3], prompts)
        for g in plan:
            last, before = (dec.rows.pos + g).tolist(), (win.k.clone(), win.pos.clone())
            dec.step()
            if g:
                check(model, last)
            else:  # the window was left as it was
                assert torch.equal(win.k, before[0]) and torch.equal(win.pos, before[1])
    assert min(last) > 2 * 16  # every ring wrapped
