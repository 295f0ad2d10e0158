import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=256, max_position_embeddings=256)


@pytest.fixture(scope="session")
def default_ckpt() -> Path:
    """The built-in SmolLM2-135M checkpoint (fp32), converted on first use."""
    from convert_checkpoint import default_checkpoint

    return default_checkpoint()


def make_hf_checkpoint(path, model_type="llama", save="safetensors", seed=0, **config):
    """Save a tiny random transformers model into `path`; returns the (fp32, eval) model.
    save: "safetensors" | "sharded" (several safetensors + index) | "bin" (pytorch_model.bin)."""
    import transformers

    cls = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[model_type]
    cfg = getattr(transformers, f"{cls}Config")(**{**TINY, **config})
    torch.manual_seed(seed)
    model = getattr(transformers, f"{cls}ForCausalLM")(cfg).float().eval()
    with torch.no_grad():  # HF init leaves norms at 1 and biases at 0: make every weight matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    path = Path(path)
    if save == "bin":  # transformers 5 dropped safe_serialization=False
        path.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    else:
        model.save_pretrained(path, **({"max_shard_size": "100KB"} if save == "sharded" else {}))
    return model


@pytest.fixture(scope="session")
def smol(default_ckpt):
    """The default model (fp32 on the CPU, whatever the machine has) and its tokenizer, loaded once."""
    from model import Transformer
    from tokenizer import load_tokenizer

    return Transformer.from_checkpoint(default_ckpt, "cpu", torch.float32), load_tokenizer(default_ckpt)


TEXTS = [
    "The history of the printing press begins in the fifteenth century, when",
    "Photosynthesis is the process by which green plants",
    "Once upon a time",
    "In mathematics, a prime number is a natural number greater than one that is not a product of "
    "two smaller natural numbers. The first few primes are",
    "Dear Sir, I write to you concerning the matter of the",
    "A recipe for bread: take flour, water and salt,",
]


@pytest.fixture(scope="session")
def greedy_refs(smol):
    """(prompts of TEXTS, their 64-token greedy continuations by plain decoding, batched): the
    reference of the exactness tests, anchored outside our loop: transformers' model of the same
    weights, decoded greedily one row at a time, gives the same tokens (up to the near-tie rule of
    tests/test_gpu.py)."""
    import transformers

    from convert_checkpoint import default_gguf
    from generate import generate
    from test_gpu import TIE, near_tie_divergences

    model, tok = smol
    prompts = [tok.encode(t) for t in TEXTS]
    ref = generate(model, prompts, 64)[0]
    transformers.logging.set_verbosity_error()
    gguf = default_gguf()
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    theirs = []
    with torch.no_grad():
        for p in prompts:
            out = hf.eval()(torch.tensor([p]), use_cache=True)
            new = []
            for _ in range(64):
                new.append(int(out.logits[0, -1].argmax()))
                out = hf(torch.tensor([new[-1:]]), past_key_values=out.past_key_values, use_cache=True)
            theirs.append(new)
    near_tie_divergences(model, prompts, ref, theirs, TIE[torch.float32])
    return prompts, ref


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: hf_checkpoint(model_type=..., save=..., **config) -> (dir, transformers model)."""
    def make(**kw):
        d = tmp_path / "hf"
        return d, make_hf_checkpoint(d, **kw)

    return make


@pytest.fixture(scope="session")
def truncated():
    """Factory: truncated(model, n) -> a copy of `model` with only its first n layers, a real
    (weaker) draft model that shares the vocabulary."""
    import copy
    import dataclasses

    def make(model, n_layers):
        model.free_caches()  # (rebuilt by its next run) not copied
        d = copy.deepcopy(model)
        d.layers = d.layers[:n_layers]
        d.args = dataclasses.replace(d.args, n_layers=n_layers)
        return d

    return make


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, default_ckpt) -> Path:
    """A small random model (2 layers, 4 heads over 2 KV heads) with the default model's
    tokenizer, written as a checkpoint: for tests that need many processes or many rows."""
    import shutil

    from safetensors.torch import save_file

    from model import ModelArgs, Transformer

    d = tmp_path_factory.mktemp("tiny")
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, intermediate_size=128,
                     max_seq_len=512, tie_embeddings=True, bos_id=1, eos_ids=[2])
    torch.manual_seed(0)
    model = Transformer(args)
    with torch.no_grad():
        for w in model.parameters():
            w.normal_(0, 0.3)
    state = {k: v for k, v in model.state_dict().items() if k != "output.weight"}
    save_file(state, d / "model.safetensors")
    args.save(d / "config.json")
    shutil.copy(default_ckpt / "tokenizer.json", d)
    return d


def quantized(src: Path, out: Path, mode: str, groupsize: int | None = None) -> Path:
    import quantize

    quantize.main(["--checkpoint", str(src), "--mode", mode, "--out", str(out)]
                  + (["--groupsize", str(groupsize)] if groupsize else []))
    return out


@pytest.fixture(scope="session")
def tiny_q(tmp_path_factory, tiny_ckpt) -> dict[str, Path]:
    """The tiny checkpoint quantized by quantize.py: {"int8": dir, "int4": dir (groups of 32)}."""
    d = tmp_path_factory.mktemp("tiny-q")
    return {"int8": quantized(tiny_ckpt, d / "int8", "int8"), "int4": quantized(tiny_ckpt, d / "int4", "int4", 32)}


@pytest.fixture(scope="session")
def default_q(tmp_path_factory, default_ckpt) -> dict[str, Path]:
    """The default model quantized by quantize.py: {"int8": dir, "int4": dir (groups of 64)}."""
    d = tmp_path_factory.mktemp("default-q")
    return {"int8": quantized(default_ckpt, d / "int8", "int8"), "int4": quantized(default_ckpt, d / "int4", "int4")}
