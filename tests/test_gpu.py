"""CUDA checks (skipped, and reported as skipped, without a GPU): exactness on the GPU, bf16,
and compiled steps with CUDA graphs. scripts/gpu_check.sh runs them on a lent GPU."""
import pytest
import torch

from generate import generate
from model import Transformer
from tokenizer import load_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TEXTS = ["The history of the printing press begins in the fifteenth century, when",
         "Photosynthesis is the process by which green plants", "Once upon a time",
         "Dear Sir, I write to you concerning the matter of the"]


@pytest.fixture(scope="module")
def gpu_model(default_ckpt):
    tok = load_tokenizer(default_ckpt)
    return default_ckpt, [tok.encode(t) for t in TEXTS]


def test_fp32_self_speculation_exact_on_gpu(gpu_model):
    ckpt, prompts = gpu_model
    model = Transformer.from_checkpoint(ckpt, "cuda", torch.float32)
    ref = generate(model, prompts, 64)[0]
    for gamma, budget in [(1, 32), (4, 32), (6, 256)]:
        assert generate(model, prompts, 64, gamma=gamma, budget=budget, sink=16)[0] == ref


def test_compiled_cuda_graphs_match_eager_without_recompiles(gpu_model):
    from torch._dynamo.utils import counters

    ckpt, prompts = gpu_model
    model = Transformer.from_checkpoint(ckpt, "cuda", torch.float32)
    ref = generate(model, prompts, 48)[0]
    torch._dynamo.reset()
    counters.clear()
    kw = dict(gamma=3, budget=32, sink=16, compile=True)
    assert generate(model, prompts, 48, **kw)[0] == ref
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2  # the draft step and the verify step
    assert generate(model, prompts[::-1], 48, **kw)[0] == ref[::-1]
    assert counters["stats"]["unique_graphs"] == graphs


def test_bf16_speculation_agrees_with_bf16_decoding(gpu_model):
    """In bf16 a [B, g+1] verify and a [B, 1] decode may round differently, so exact equality is
    not owed; but a broken loop would disagree almost everywhere."""
    ckpt, prompts = gpu_model
    model = Transformer.from_checkpoint(ckpt, "cuda", torch.bfloat16)
    ref = generate(model, prompts, 64)[0]
    new, _, stats = generate(model, prompts, 64, gamma=4, budget=32, sink=16, compile=True)
    first_diff = [next((i for i, (a, b) in enumerate(zip(r, n)) if a != b), len(r)) for r, n in zip(ref, new)]
    assert sum(first_diff) >= 0.5 * 64 * len(prompts), first_diff
    assert stats["acceptance_rate"] > 0.3
