"""CUDA checks (skipped, and reported as skipped, without a GPU): greedy speculation against plain
decoding, fp32 and bf16, eager and compiled with CUDA graphs (no recompiles once warm), quantized
layers and drafts. On a GPU the [B, 1] and [B, g+1] forwards may run other kernels (cuBLAS picks
them by row count), so a near-tie can flip an argmax: a divergence is allowed only where the
reference's top two logits were within a small tolerance. That rule itself is tested on the CPU, and
so is scripts/gpu_check.sh's answer on a machine without CUDA."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate as gen
import stats
from generate import generate
from model import ModelArgs, Transformer
from tokenizer import load_tokenizer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
TIE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}  # relative top-two gap that counts as a near-tie
TEXTS = ["The history of the printing press begins in the fifteenth century, when",
         "Photosynthesis is the process by which green plants", "Once upon a time",
         "Dear Sir, I write to you concerning the matter of the"]


@torch.no_grad()
def logits_after(model: Transformer, tokens: list[int]) -> torch.Tensor:
    """The model's next-token logits after `tokens`: one plain forward over all of them (fp32)."""
    dev = model.tok_embeddings.weight.device
    model.setup_caches(1, stats.cache_len(len(tokens), 0))
    pos = torch.arange(len(tokens), device=dev)[None]
    return model(torch.tensor([tokens], device=dev), pos, kv_len=len(tokens))[0, -1].float()


def near_tie_divergences(model, prompts, ref, new, rel_tol) -> list[tuple[int, int, float]]:
    """Where greedy speculation (`new`) left plain decoding (`ref`), row by row: at the first token
    that differs, the reference model's logits after the prompt and the reference tokens before it
    must hold the speculative token among their top two, within rel_tol * max(|top|, 1) of the top.
    -> [(row, position, relative gap)] of the divergences; AssertionError for any other."""
    found = []
    for i, (p, r, n) in enumerate(zip(prompts, ref, new)):
        assert len(n) == len(r), f"row {i}: {len(n)} tokens where plain decoding made {len(r)}"
        j = next((j for j, (a, b) in enumerate(zip(r, n)) if a != b), None)
        if j is None:
            continue
        top = logits_after(model, p + r[:j]).topk(2)
        v = top.values.tolist()
        gap = (v[0] - v[1]) / max(abs(v[0]), 1.0)
        assert n[j] in top.indices.tolist() and gap <= rel_tol, (
            f"row {i} leaves plain decoding at token {j} ({r[j]} -> {n[j]}), not at a near-tie: top two "
            f"{top.indices.tolist()} are {gap:.2e} apart (relative), tolerance {rel_tol:g}")
        found.append((i, j, gap))
    return found


def test_near_tie_rule_on_cpu():
    """A row perturbed at a token where the reference had a clear winner is caught; the same row
    passes once the tolerance covers that position's gap; identical rows pass."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, intermediate_size=128, max_seq_len=128)
    torch.manual_seed(0)
    model = Transformer(args)
    with torch.no_grad():
        for w in model.parameters():
            w.normal_(0, 0.3)
    model.eval()
    prompts = [[5, 17, 42, 8, 3], [60, 2, 71]]
    ref = generate(model, prompts, 12)[0]
    assert near_tie_divergences(model, prompts, ref, [list(r) for r in ref], 0.0) == []
    top = logits_after(model, prompts[1] + ref[1][:6]).topk(2)
    assert top.indices[0] == ref[1][6]  # the reference chose the top token there
    gap = float(top.values[0] - top.values[1]) / max(abs(float(top.values[0])), 1.0)
    assert gap > 1e-3  # a random model: a clear winner
    new = [list(ref[0]), ref[1][:6] + [int(top.indices[1])] + ref[1][7:]]  # the runner-up instead
    with pytest.raises(AssertionError, match="row 1 leaves plain decoding at token 6"):
        near_tie_divergences(model, prompts, ref, new, 1e-3)
    assert near_tie_divergences(model, prompts, ref, new, 2 * gap) == [(1, 6, pytest.approx(gap))]
    third = int(logits_after(model, prompts[1] + ref[1][:6]).topk(3).indices[2])
    with pytest.raises(AssertionError):  # not even among the top two: never a near-tie
        near_tie_divergences(model, prompts, ref, [list(ref[0]), ref[1][:6] + [third] + ref[1][7:]], 1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA says")
def test_gpu_check_without_cuda_says_so(tmp_path, default_ckpt):
    """A stage on a machine without CUDA: its preflight line names the GPU (and only it: the rest is
    here), then one line says there is nothing to run; exit 1, nothing written."""
    p = subprocess.run(["bash", "scripts/gpu_check.sh", "1"], cwd=Path(__file__).resolve().parents[1], text=True,
                       capture_output=True, env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path),
                                                 "CKPT": str(default_ckpt), "PROMPT_FILE": "README.md"})
    lines = (p.stdout + p.stderr).splitlines()
    assert p.returncode == 1 and len(lines) == 2, lines
    assert lines[0].startswith("gpu_check: preflight: missing: a CUDA device;") and lines[0].count("missing") == 1
    assert lines[1] == "gpu_check: no CUDA device here: nothing to run"
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.fixture(scope="module")
def gpu_prompts(default_ckpt):
    tok = load_tokenizer(default_ckpt)
    return default_ckpt, [tok.encode(t) for t in TEXTS]


@cuda
def test_fp32_self_speculation_matches_plain_decoding_up_to_near_ties(gpu_prompts):
    ckpt, prompts = gpu_prompts
    model = Transformer.from_checkpoint(ckpt, "cuda", torch.float32)
    ref = generate(model, prompts, 64)[0]
    for gamma, budget in [(1, 32), (4, 32), (6, 256)]:
        new = generate(model, prompts, 64, gamma=gamma, budget=budget, sink=16)[0]
        near_tie_divergences(model, prompts, ref, new, TIE[torch.float32])


@cuda
def test_compiled_cuda_graphs_without_recompiles(gpu_prompts):
    from torch._dynamo.utils import counters

    ckpt, prompts = gpu_prompts
    model = Transformer.from_checkpoint(ckpt, "cuda", torch.float32)
    ref = generate(model, prompts, 48)[0]
    torch._dynamo.reset()
    kw = dict(gamma=3, budget=32, sink=16, compile=True)
    first, _, stats = generate(model, prompts, 48, **kw)
    assert stats["compiled_graphs"] >= 2 and stats["compile_seconds"] > 0 and stats["attention"] == "flex"
    before = counters["stats"]["unique_graphs"]
    second, _, stats = generate(model, prompts[::-1], 48, **kw)  # the same shapes: nothing to compile
    assert counters["stats"]["unique_graphs"] == before and stats["compiled_graphs"] == 0
    near_tie_divergences(model, prompts, ref, first, TIE[torch.float32])  # (after: it resizes the caches)
    near_tie_divergences(model, prompts[::-1], ref[::-1], second, TIE[torch.float32])


@cuda
def test_bf16_compiled_speculation_matches_bf16_decoding_up_to_near_ties(gpu_prompts):
    ckpt, prompts = gpu_prompts
    model = Transformer.from_checkpoint(ckpt, "cuda", torch.bfloat16)
    ref = generate(model, prompts, 64)[0]
    new, _, stats = generate(model, prompts, 64, gamma=4, budget=32, sink=16, compile=True)
    near_tie_divergences(model, prompts, ref, new, TIE[torch.bfloat16])
    assert stats["acceptance_rate"] > 0.3


@two_gpus
def test_tp2_compiled_keeps_cuda_graph_trees_and_the_tokens(gpu_prompts, tmp_path):
    """--tp 2 --compile (CUDA-graph trees with the functional all-reduces inside the graphs) returns
    one compiled process's tokens, up to near-ties (NCCL sums in another order)."""
    import json

    from test_tp import torchrun

    ckpt, prompts = gpu_prompts
    tok = load_tokenizer(ckpt)
    argv = ["--checkpoint", str(ckpt), *sum((["--prompt", t] for t in TEXTS), []), "--max_new_tokens", "48",
            "--gamma", "3", "--draft_budget", "32", "--sink", "16", "--compile", "--dtype", "float32"]
    ref = [r["tokens"] for r in gen.main(argv)[0]]
    r = torchrun(*argv, "--tp", 2, "--json", tmp_path / "tp.json", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    new = [row["tokens"] for row in json.loads((tmp_path / "tp.json").read_text())["rows"]]
    model = Transformer.from_checkpoint(ckpt, "cuda", torch.float32)
    near_tie_divergences(model, [tok.encode(t) for t in TEXTS], ref, new, TIE[torch.float32])


@cuda
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_linear_on_cuda_is_the_dequantized_matmul(mode):
    """int8: a dequantization that Inductor fuses into the matmul; int4: torch._weight_int4pack_mm."""
    import torch.nn.functional as F

    from test_quantize import qlinear

    m, w = qlinear(mode, torch.bfloat16, device="cuda")
    x = torch.randn(2, 5, 128, device="cuda").bfloat16()
    ref = F.linear(x.float(), w, m.bias.float())
    for f in (m, torch.compile(m, fullgraph=True, dynamic=False)):
        torch.testing.assert_close(f(x).float(), ref, rtol=0, atol=1e-2 * ref.abs().max().item())


@cuda
def test_quantized_drafts_on_cuda_match_plain_decoding_up_to_near_ties(gpu_prompts, tmp_path):
    from conftest import quantized

    ckpt, prompts = gpu_prompts
    model = Transformer.from_checkpoint(ckpt, "cuda", torch.bfloat16)
    ref = generate(model, prompts, 48)[0]
    for mode in ("int8", "int4"):
        draft = Transformer.from_checkpoint(quantized(ckpt, tmp_path / mode, mode), "cuda", torch.bfloat16)
        new, _, s = generate(model, prompts, 48, gamma=3, draft_model=draft, budget=0, compile=True)
        near_tie_divergences(model, prompts, ref, new, TIE[torch.bfloat16])
        assert s["acceptance_rate"] > 0.5, mode
