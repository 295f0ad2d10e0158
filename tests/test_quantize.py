"""Weight-only int8 / int4 checkpoints (quantize.py, model.QLinear): every weight within half a step
of its value, the kernels equal to a matmul with the dequantized weights (eager and compiled), a
checkpoint equal to its dequantized model, exact greedy speculation with a quantized model or a
quantized draft, the target's distribution under sampling, tensor-parallel shards, and the bytes
the memory plan and the bandwidth count."""
import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import generate as gen
import quantize
import sampling
import stats
import tp
from cli import dtype_of
from model import ModelArgs, QLinear, Transformer, UsageError, unpack_int4
from conftest import TEXTS
from test_refill import LIMITS
from test_sampling import accept_all, matches
from tokenizer import load_tokenizer

MODES = {"int8": None, "int4": 32}  # mode: group size


def codes_of(mode, w, g):
    return quantize.int8(w) if mode == "int8" else quantize.int4(w, g)


def step_of(scales, g, shape):
    """Each weight's quantization step [N, K]: its row's scale (int8) or its group's (int4)."""
    s = scales.float()
    return s[:, None].expand(shape) if g is None else s[..., 0].repeat_interleave(g, 1)


def check_bound(mode, w, codes, scales, g):
    """|w - dequantized| <= step / 2 everywhere (up to float rounding), and the codes use their range."""
    err = (w.float() - quantize.dequantize(codes, scales, g)).abs()
    ratio = err / step_of(scales, g, w.shape)
    assert ratio.max() <= 0.5 + 1e-3, f"{mode}: error {ratio.max():.3f} steps"
    return ratio


HARD = {  # rows that break naive schemes: zeros, a constant, a large offset, an outlier
    "zeros": torch.zeros(16, 64),
    "constant": torch.full((16, 64), 0.3),
    "offset": 100 + 0.01 * torch.randn(16, 64, generator=torch.Generator().manual_seed(0)),
    "outlier": torch.randn(16, 64, generator=torch.Generator().manual_seed(1)) * torch.tensor([50.0] + [1.0] * 63),
}


@pytest.mark.parametrize("mode", MODES)
def test_every_weight_is_within_half_a_step(mode, default_ckpt, default_q):
    """Per tensor of the real model's quantized checkpoint, and on hard synthetic rows."""
    g = 64 if mode == "int4" else None  # default_q's int4 groups
    src, q = load_file(default_ckpt / "model.safetensors"), load_file(default_q[mode] / "model.safetensors")
    names = quantize.linears(ModelArgs.load(default_ckpt / "config.json"))
    assert names[-1] == "output" and len(names) == 4 * 30 + 1
    for n in names:
        w = src.get(f"{n}.weight", src["tok_embeddings.weight"])  # tied: the output's copy of the table
        ratio = check_bound(mode, w, q[f"{n}.weight"], q[f"{n}.scales"], g)
        assert 0.1 < ratio.mean() < 0.3, (n, ratio.mean())  # rounding errors spread over the half step: not a no-op
    assert torch.equal(q["tok_embeddings.weight"], src["tok_embeddings.weight"])  # kept as it was
    assert torch.equal(q["layers.7.ffn_norm.weight"], src["layers.7.ffn_norm.weight"])
    c = q["layers.0.feed_forward.w2.weight"]
    if mode == "int8":
        assert c.dtype == torch.int8 and (c.abs().amax(1) >= 126).all()  # a row's largest: +-127 (126: a scale rounded up)
    else:
        assert c.dtype == torch.uint8 and {0, 15} <= set(unpack_int4(c).unique().tolist())
    for w in HARD.values():
        check_bound(mode, w, *codes_of(mode, w, MODES[mode]), MODES[mode])


def qlinear(mode, dtype, bias=True, K=128, N=96, seed=0, device="cpu"):
    """A packed QLinear of random weights and its dequantized float32 weights."""
    torch.manual_seed(seed)
    g = MODES[mode]
    codes, scales = codes_of(mode, torch.randn(N, K), g)
    m = QLinear(K, N, bias, mode=mode, groupsize=g).to(device)
    p = lambda t: torch.nn.Parameter(t.to(device), requires_grad=False)
    m.weight, m.scales = p(codes), p(scales)
    if bias:
        m.bias = p(torch.randn(N).to(dtype))
    m.pack(dtype)
    return m, quantize.dequantize(codes, scales, g).to(device)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
def test_quantized_linear_is_the_dequantized_matmul(mode, dtype, compiled):
    m, w = qlinear(mode, dtype)
    f = torch.compile(m, fullgraph=True, dynamic=False) if compiled else m
    x = torch.randn(2, 5, 128).to(dtype)  # [B, T, K]: a verify step's shape
    ref = F.linear(x.float(), w, m.bias.float())
    y = f(x)
    assert y.dtype == dtype and y.shape == (2, 5, 96)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the kernel's rounding
    torch.testing.assert_close(y.float(), ref, rtol=0, atol=tol * ref.abs().max().item())


def test_an_unaligned_int8_weight_is_copied_before_the_kernel_reads_it():
    """A tensor read from a file can start at any byte (a safetensors file's can); torch's CPU int8
    kernel reads W in aligned vectors and crashes the process on an unaligned one (prefill shapes)."""
    torch.manual_seed(0)
    codes, scales = codes_of("int8", torch.randn(96, 128), None)
    buf = torch.empty(codes.numel() + 1, dtype=torch.int8)
    buf[1:] = codes.reshape(-1)  # W one byte past an aligned start
    m = QLinear(128, 96, mode="int8")
    m.weight, m.scales = (torch.nn.Parameter(t, requires_grad=False) for t in (buf[1:].view(96, 128), scales))
    m.pack(torch.bfloat16)
    x = torch.randn(238, 128).to(torch.bfloat16)  # [M, K]: a prefill's rows
    ref = F.linear(x.float(), quantize.dequantize(codes, scales, None))
    torch.testing.assert_close(m(x).float(), ref, rtol=0, atol=1e-2 * ref.abs().max().item())


@pytest.mark.parametrize("mode", MODES)
def test_quantized_checkpoint_is_its_dequantized_model(mode, tiny_q):
    """Loaded (every linear packed, the output a quantized copy of the tied table), a quantized
    checkpoint gives the logits of a float model holding its dequantized weights."""
    q = Transformer.from_checkpoint(tiny_q[mode], dtype=torch.float32)
    assert q.args.quant["mode"] == mode and isinstance(q.output, QLinear)
    state, g = load_file(tiny_q[mode] / "model.safetensors"), MODES[mode]
    for n in quantize.linears(q.args):
        state[f"{n}.weight"] = quantize.dequantize(state[f"{n}.weight"], state.pop(f"{n}.scales"), g)
    ref = Transformer(dataclasses.replace(q.args, quant=None, tie_embeddings=False))  # the output: its own copy
    ref.load_state_dict(state)
    idx = torch.randint(0, q.args.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(9).expand(3, -1)
    for m in (q, ref):
        m.setup_caches(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(q(idx, pos), ref(idx, pos), rtol=1e-4, atol=1e-4)


def random_model(std, **kw) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelArgs(n_layers=2, n_heads=4, n_kv_heads=2, **kw)).eval()
    for w in model.parameters():
        w.data.normal_(0, std)
    return model


def quantized_copy(model: Transformer, mode: str, d):
    """`model` quantized in memory by quantize.quantize and written as a checkpoint in d."""
    from convert_checkpoint import _save

    state, args = quantize.quantize(model.state_dict(), model.args, mode, MODES[mode])
    _save(d, args, state)
    return d


@pytest.fixture(scope="module")
def small_q(tmp_path_factory):
    """A small random model's int8 and int4 checkpoints (vocab 256: with float32 activations the
    kernels take a slow path, which the real vocabulary makes slow on the output layer)."""
    model = random_model(0.3, dim=64, vocab_size=256, intermediate_size=128, max_seq_len=256)
    return {mode: quantized_copy(model, mode, tmp_path_factory.mktemp(f"small-{mode}")) for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
def test_greedy_self_speculation_of_a_quantized_model_is_exact(mode, small_q):
    """fp32 activations (the kernels give a row the same bits whatever the other rows): the
    quantized model drafting for itself on a small window returns its own plain decoding."""
    model = Transformer.from_checkpoint(small_q[mode], dtype=torch.float32)
    prompts = [[5, 6, 7], list(range(100, 119)), [9] * 11]  # ragged
    ref, _, _ = gen.generate(model, prompts, 30)
    new, _, s = gen.generate(model, prompts, 30, gamma=3, budget=12, sink=4)
    assert new == ref and 0 < s["acceptance_rate"] < 1


@pytest.fixture(scope="module")
def real(default_ckpt):
    model = Transformer.from_checkpoint(default_ckpt, dtype=torch.float32)
    tok = load_tokenizer(default_ckpt)
    return model, [tok.encode(t) for t in TEXTS]


def run_rows(model, prompts, B=2, **kw):
    """4 prompts through 2 rows: finished rows are refilled. -> {id: tokens}, decoder"""
    prompts = prompts[:4]
    dec = gen.Decoder(model, B, max(len(p) + n for p, n in zip(prompts, LIMITS)), max(LIMITS), **kw)
    return {r.id: r.tokens for r in dec.run(gen.Request(p, n, i) for i, (p, n) in enumerate(zip(prompts, LIMITS)))}, dec


@pytest.fixture(scope="module")
def plain(real):
    model, prompts = real
    return run_rows(model, prompts, gamma=0)[0]


@pytest.mark.parametrize("mode,budget", [("int8", 24), ("int4", 0)], ids=["int8-window", "int4-full"])
def test_quantized_draft_for_the_full_precision_model_is_exact(mode, budget, real, plain, default_q):
    """The fp32 default model verifies a quantized copy of itself (bf16 activations, its own full
    cache or a window it prefills itself): its plain decoding's tokens, ragged rows refilled."""
    model, prompts = real
    draft = Transformer.from_checkpoint(default_q[mode], dtype=torch.bfloat16)
    out, dec = run_rows(model, prompts, gamma=3, draft_model=draft, budget=budget, sink=4)
    assert out == plain
    assert 0.5 < dec.acceptance() < 1  # a real draft: mostly right, not the target itself


def test_quantized_draft_sampling_keeps_the_target_distribution(tmp_path, monkeypatch):
    """Speculative sampling with an int4 copy of the target as its draft (bf16) follows the target's
    distribution (chi-square on the first two tokens), and a broken rule fails the same check."""
    model = random_model(0.5, dim=32, vocab_size=16, intermediate_size=64, max_seq_len=64)
    draft = Transformer.from_checkpoint(quantized_copy(model, "int4", tmp_path), dtype=torch.bfloat16)
    prompt, setting, kw = torch.randint(0, 16, (12,)).tolist(), (1.0, 0, 1.0), dict(gamma=3, draft_model=draft, budget=0)

    def next_probs(m):
        m.setup_caches(1, 16)
        return m(torch.tensor([prompt]), torch.arange(12)[None])[0, -1].float().softmax(-1)

    with torch.no_grad():
        assert (next_probs(model) - next_probs(draft)).abs().sum() > 0.05  # the draft is off the target
        torch.manual_seed(1)
        assert matches(model, prompt, setting, 20_000, **kw)
        monkeypatch.setattr(sampling, "speculative_accept", accept_all)
        assert not matches(model, prompt, setting, 20_000, **kw)


@pytest.mark.parametrize("mode", MODES)
def test_tensor_parallel_shards_add_up(mode, tiny_q):
    """Two ranks' shards (read in one process): column-parallel layers give the full layer's rows,
    row-parallel layers sum to the full layer; codes and scales are cut alike (int8's per-row
    scales whole on each rank, int4's groups by columns)."""
    full = Transformer.from_checkpoint(tiny_q[mode], dtype=torch.float32)
    a, torch_gen = full.args, torch.Generator().manual_seed(0)
    H, Hkv, D, I = a.n_heads, a.n_kv_heads, a.head_dim, a.intermediate_size
    ranks = [tp.load(tiny_q[mode], tp.World(r, 2, 0, 2), "cpu", torch.float32) for r in range(2)]
    x, h = torch.randn(1, 3, a.dim, generator=torch_gen), torch.randn(1, 3, H * D, generator=torch_gen)
    u = torch.randn(1, 3, I, generator=torch_gen)
    f0, f1 = full.layers[1], [r.layers[1] for r in ranks]
    with torch.no_grad():
        qkv = f0.attention.wqkv(x)
        for r, b in enumerate(f1):
            k0, k1 = tp.split(Hkv, 2, r)
            rows = [*range(k0 * (H // Hkv) * D, k1 * (H // Hkv) * D), *range(H * D + k0 * D, H * D + k1 * D),
                    *range((H + Hkv) * D + k0 * D, (H + Hkv) * D + k1 * D)]
            torch.testing.assert_close(b.attention.wqkv(x), qkv[..., rows])
        cols = [slice(*(c * (H // Hkv) * D for c in tp.split(Hkv, 2, r))) for r in range(2)]
        torch.testing.assert_close(sum(b.attention.wo.lin(h[..., c]) for b, c in zip(f1, cols)), f0.attention.wo(h))
        cols = [slice(*tp.split(I, 2, r)) for r in range(2)]
        torch.testing.assert_close(sum(b.feed_forward.w2.lin(u[..., c]) for b, c in zip(f1, cols)), f0.feed_forward.w2(u))
        logits = torch.cat([r.output.lin(x) for r in ranks], -1)[..., : a.vocab_size]
        torch.testing.assert_close(logits, full.output(x))


def test_tensor_parallel_refuses_to_cut_an_int4_group(tiny_ckpt, tmp_path):
    from conftest import quantized

    q = quantized(tiny_ckpt, tmp_path / "g64", "int4", 64)  # wo's 64 inputs: 32 a rank, half a group
    with pytest.raises(UsageError, match=r"--tp 2 cuts the inputs of attention.wo at 32, inside an int4 group of 64"):
        tp.load(q, tp.World(0, 2, 0, 2), "cpu")  # rank 0, whose own slices start at 0: every rank refuses


@pytest.mark.parametrize("mode", [None, *MODES])
def test_memory_plan_and_bandwidth_count_the_quantized_bytes(mode, tiny_ckpt, tiny_q):
    path = tiny_q[mode] if mode else tiny_ckpt
    for dtype in (torch.float32, torch.bfloat16):
        model = Transformer.from_checkpoint(path, dtype=dtype)
        elem, a = dtype.itemsize, model.args
        norms = (2 * a.n_layers + 1) * a.dim * elem  # the plan leaves out the norms
        assert stats.weight_bytes(a, elem) == stats.param_bytes(model) - norms
        table = a.vocab_size * a.dim * elem
        # a forward reads the tied table once as the output layer, but never a table of its own
        assert stats.param_bytes(model, read=True) == stats.param_bytes(model) - (table if mode else 0)
    if mode:
        fp = Transformer.from_checkpoint(tiny_ckpt, dtype=torch.bfloat16)
        ratio = (stats.param_bytes(model, True) - stats.param_bytes(fp, True) + table) / (stats.param_bytes(fp) - norms)
        assert ratio < {"int8": 0.55, "int4": 0.3}[mode]  # the linears: ~1/2 and ~1/4 of bf16 (scales aside)
        s = gen.generate(model, [[5, 6, 7]], 8)[2]
        # 8 plain steps from position 2: the weights a forward reads, and the K/V of positions 0..pos
        assert s["verify_steps"] == 8
        assert s["bytes_read"] == 8 * stats.param_bytes(model, True) + sum(range(3, 11)) * a.kv_bytes_per_token(elem)


def test_activations_default_to_bfloat16_for_a_quantized_checkpoint_on_cpu(tiny_ckpt, tiny_q):
    cpu, cfg, qcfg = torch.device("cpu"), ModelArgs.load(tiny_ckpt / "config.json"), ModelArgs.load(
        tiny_q["int8"] / "config.json")
    assert dtype_of(SimpleNamespace(dtype=None), cpu, cfg) == torch.float32
    assert dtype_of(SimpleNamespace(dtype=None), cpu, qcfg) == torch.bfloat16  # float32 takes torch's slow path
    assert dtype_of(SimpleNamespace(dtype="float32"), cpu, qcfg) == torch.float32  # --dtype wins


def test_int4_without_a_kernel_is_one_clear_error():
    with torch.device("meta"):
        m = QLinear(64, 32, mode="int4", groupsize=32)
    with pytest.raises(UsageError, match="int4 weights run on the CPU, or on CUDA through torch._weight_int4pack_mm"):
        m.pack(torch.bfloat16)


def test_quant_benchmark_on_the_tiny_model(tiny_ckpt, tiny_q, tmp_path):
    """scripts/quant_benchmark.py end to end on the tiny model: every variant timed at every batch,
    the float32 model agreeing with itself, a chunked log-likelihood equal to the whole-sequence one;
    a checkpoint that is not quantized is one clear error. No assertion on how fast anything ran."""
    import importlib.util
    import json
    import math
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "quant_benchmark.py"
    spec = importlib.util.spec_from_file_location("quant_benchmark", path)
    qb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qb)
    f = tmp_path / "prompts.jsonl"  # Dickens, A Tale of Two Cities (1859): public domain
    f.write_text("".join(json.dumps({"text": f"Chapter {i + 1}. It was the best of times, it was the worst of times, "
                                     "it was the age of wisdom, it was the age of foolishness."}) + "\n" for i in range(5)))
    argv = ["--checkpoint", str(tiny_ckpt), "--quantized", str(tiny_q["int8"]), str(tiny_q["int4"]),
            "--activations", "bfloat16", "float32", "--prompt_file", str(f), "--batch_size", "1", "2",
            "--prompt_len", "12", "--max_new_tokens", "4", "--repeats", "1", "--quality_prompts", "3",
            "--quality_len", "12", "--heldout", "2", "--out", str(tmp_path / "out")]
    qb.main(argv)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    names = {"fp32", "bf16", "int8", "int8-fp32", "int4", "int4-fp32"}
    assert set(res["variants"]) == names and res["variants"]["int4-fp32"]["dtype"] == "float32"
    assert [(r["batch_size"], r["variant"]) for r in res["throughput"]] == [(B, v) for B in (1, 2) for v in res["variants"]]
    assert all(r["tokens_per_second"] > 0 for r in res["throughput"])
    q = res["quality"]
    assert q["fp32"]["first_difference"] == [4, 4, 4] and q["fp32"]["identical_rows"] == 3
    assert all(math.isfinite(v["heldout_log_likelihood"]) and v["heldout_log_likelihood"] < 0 for v in q.values())
    assert "| int4-fp32 | int4 | float32 |" in (tmp_path / "out" / "results.md").read_text()

    model = Transformer.from_checkpoint(tiny_ckpt, dtype=torch.float32)
    tok = load_tokenizer(tiny_ckpt)
    docs = [tok.encode(json.loads(line)["text"]) for line in f.read_text().splitlines()[-2:]]
    whole = []
    for d in docs:  # one forward over each document, no cache reuse
        model.setup_caches(1, len(d))
        logp = model(torch.tensor([d]), torch.arange(len(d))[None])[0, :-1].log_softmax(-1)
        whole.append(logp.gather(-1, torch.tensor(d[1:])[:, None]))
    assert qb.log_likelihood(model, docs, chunk=5) == pytest.approx(torch.cat(whole).mean().item(), abs=1e-5)
    assert q["fp32"]["heldout_log_likelihood"] == pytest.approx(torch.cat(whole).mean().item(), abs=1e-5)

    with pytest.raises(UsageError, match="not a quantized checkpoint"):
        qb.main([*argv[:2], "--quantized", str(tiny_ckpt), *argv[5:]])
