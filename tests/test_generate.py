"""Decoding on the real default model: the cache, ragged batches, and lossless self-speculation."""
import pytest
import torch

from generate import generate
from model import Transformer

@pytest.fixture(scope="module")
def real(smol, greedy_refs):
    """The default model, five ragged prompts and their greedy continuations (see greedy_refs)."""
    model, tok = smol
    prompts = greedy_refs[0][:5]
    assert len({len(p) for p in prompts}) == len(prompts)  # ragged
    return model, tok, prompts


@pytest.fixture(scope="module")
def ar64(greedy_refs):
    return greedy_refs[1][:5]


def test_incremental_decoding_equals_full_forward(real):
    model, _, prompts = real
    x = torch.tensor([(prompts[3] + prompts[0])[:40]])
    pos = torch.arange(40)[None]
    model.setup_caches(1, 64)
    full = model(x, pos)
    model.setup_caches(1, 64)
    steps = [model(x[:, :25], pos[:, :25])] + [model(x[:, i : i + 1], pos[:, i : i + 1]) for i in range(25, 40)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_ragged_batch_equals_rows_alone(real, ar64):
    model, _, prompts = real
    for i, p in enumerate(prompts):  # (the first 32 tokens: where a padding or position bug shows)
        assert generate(model, [p], 32)[0][0] == ar64[i][:32], f"row {i}"


@pytest.mark.parametrize("gamma,budget,sink", [(1, 32, 16), (3, 12, 4), (4, 32, 16), (6, 12, 4)])
def test_greedy_self_speculation_is_exact(real, ar64, gamma, budget, sink):
    """Every row outgrows its window (sinks + a ring of 8 or 16): the draft reads less than the target."""
    model, _, prompts = real
    assert min(map(len, prompts)) + 64 > 2 * budget
    new, reasons, stats = generate(model, prompts, 64, gamma=gamma, budget=budget, sink=sink)
    assert new == ar64
    assert reasons == ["length"] * len(prompts)
    assert all(len(n) == 64 for n in new)
    assert 0 < stats["acceptance_rate"] <= 1 and len(stats["acceptance_by_position"]) == gamma


@pytest.mark.parametrize("gamma,budget,ring", [(4, 32, None), (3, 64, 48)])
def test_greedy_snapkv_self_speculation_is_exact(real, ar64, gamma, budget, ring):
    """A SnapKV-selected draft cache (here 4 sinks + the selection + a ring) over ragged rows
    longer than its ring: still plain decoding's tokens."""
    model, _, prompts = real
    new, _, stats = generate(model, prompts, 64, gamma=gamma, budget=budget, sink=4, draft_cache="snapkv", ring=ring)
    assert new == ar64
    assert 0 < stats["acceptance_rate"] < 1


def test_compiled_self_speculation_is_exact(real, truncated):
    """The compiled path on a model of the real dimensions (the default model's first 4 layers:
    FlexAttention block masks over a ragged batch, Inductor's C++ kernels): eager plain decoding's
    tokens."""
    model, _, prompts = real
    small = truncated(model, 4)
    ref = generate(small, prompts, 48)[0]
    new, _, stats = generate(small, prompts, 48, gamma=4, budget=24, sink=8, compile=True)
    assert stats["attention"] == "flex"
    assert new == ref


def test_budget_covering_everything_accepts_every_draft(real, ar64):
    model, _, prompts = real
    new, _, stats = generate(model, prompts, 64, gamma=4, budget=512, sink=16)
    assert new == ar64
    assert stats["acceptance_rate"] == 1.0
    assert stats["acceptance_by_position"] == [1.0] * 4


@pytest.mark.parametrize("gamma,budget", [(1, 32), (3, 0), (6, 24)])
def test_greedy_separate_draft_model_is_exact(real, ar64, truncated, gamma, budget):
    model, _, prompts = real
    draft = truncated(model, 10)
    new, _, stats = generate(model, prompts, 64, gamma=gamma, draft_model=draft, budget=budget, sink=16)
    assert new == ar64
    assert 0 < stats["acceptance_rate"] < 1


def test_eos_mid_step_and_uneven_limits(real, ar64):
    """An EOS that lands inside a verify step, rows that stop long before the others, and a
    max_new_tokens that is not a multiple of gamma + 1: still exactly the plain outputs."""
    model, _, prompts = real
    # an id that row 0 produces early and that is absent from the start of some other row
    eos = next(t for t in ar64[0][5:20] if any(t not in r[:40] for r in ar64[1:]))
    for max_new, gamma in ((37, 3), (61, 5)):
        cut = [r[:max_new] for r in ar64]  # plain decoding's tokens up to the limit and the first EOS
        ref = [r[: r.index(eos) + 1] if eos in r else r for r in cut]
        ref_reasons = ["eos" if eos in r else "length" for r in cut]
        assert "eos" in ref_reasons and "length" in ref_reasons
        new, reasons, _ = generate(model, prompts, max_new, gamma=gamma, budget=32, sink=16, eos_ids=[eos])
        assert (new, reasons) == (ref, ref_reasons), (max_new, gamma)


def test_gamma_auto_is_exact(real, ar64):
    model, _, prompts = real
    new, _, stats = generate(model, prompts, 64, gamma="auto", budget=32, sink=16)
    assert new == ar64
    assert sum(stats["gamma_used"].values()) == stats["verify_steps"]


def test_prefill_chunks_are_long_and_exact(real, ar64, monkeypatch):
    """Prefill attention builds no score tensor, so a chunk is bounded by the batch's activations
    and its one shared causal mask, not by B x heads x chunk x S scores: at 64 rows of 8K context a
    LLaMA-3.1-8B-shaped prefill (G = 4) runs 128 tokens per row per forward (the score bound gave
    16). Tiny chunks give the same tokens."""
    import stats

    assert stats.prefill_chunk(64, 8192, 4) == 128 and stats.prefill_chunk(1, 32768, 4) == 512
    for B, S, G in ((1, 1024, 3), (8, 8192, 4), (64, 32768, 8), (256, 131072, 4)):
        c = stats.prefill_chunk(B, S, G)
        assert c == 1 or (B * c <= stats.PREFILL_TOKENS and G * c * S <= stats.PREFILL_MASK)
    model, _, prompts = real
    monkeypatch.setattr(stats, "PREFILL_TOKENS", 3 * len(prompts))  # 3 tokens per chunk
    assert stats.prefill_chunk(len(prompts), 128, 3) == 3
    assert generate(model, prompts, 64)[0] == ar64


def test_a_batch_that_cannot_fit_is_refused_before_allocating(tiny_ckpt, monkeypatch):
    import stats
    from model import UsageError

    model = Transformer.from_checkpoint(tiny_ckpt, "cpu", torch.float32)
    monkeypatch.setattr(stats, "free_memory", lambda device: 64 << 20)  # 64 MiB free
    with pytest.raises(UsageError, match=r"batch 64 needs .* the largest batch that fits is (\d+)") as e:
        generate(model, [[5, 6, 7]] * 64, 400, gamma=4, budget=32, sink=4)
    assert model.layers[0].attention.kv_cache is None and model.batch_size == -1  # nothing allocated
    fit = int(str(e.value).rsplit(" ", 1)[1])
    assert 0 < fit < 64
    new, _, _ = generate(model, [[5, 6, 7]] * fit, 400, gamma=4, budget=32, sink=4)  # the largest that fits does
    assert len(new) == fit
