"""Malformed or incomplete checkpoints (float or quantized), draft checkpoints, converter and
quantizer inputs: each is refused with exactly one `error: ...` line on stderr and exit status 2,
never a traceback. Every case is a copy of a good one with one thing broken. The commands run as
the scripts' __main__ in processes forked from one that imported torch once (tests/forkrun.py), as
many at a time as there are cores, once for the module."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
GENERATE = [str(ROOT / "generate.py"), "--max_new_tokens", "2", "--prompt", "hi"]
CONVERT = [str(ROOT / "convert_checkpoint.py")]
DROP = object()


def _write(path: Path, data: bytes):
    path.unlink(missing_ok=True)  # never write through a hard link to the good copy
    path.write_bytes(data)


def _config(**change):
    def make(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(change)
        _write(d / "config.json", json.dumps({k: v for k, v in cfg.items() if v is not DROP}).encode())
    return make


def _weights(edit):
    def make(d):
        state = load_file(d / "model.safetensors")
        edit(state)
        (d / "model.safetensors").unlink()
        save_file(state, d / "model.safetensors")
    return make


def _cut(name, keep):  # the file's first `keep` (a fraction) of bytes
    return lambda d: _write(d / name, (d / name).read_bytes()[: int(keep * (d / name).stat().st_size)])


def _smaller_vocab(d):  # a consistent model of 256 ids: fewer than its tokenizer has
    _weights(lambda s: s.update({"tok_embeddings.weight": s["tok_embeddings.weight"][:256].clone()}))(d)
    _config(vocab_size=256)(d)


RANDOM = np.random.default_rng(0).bytes(4096)

# name: (how to break a copy of the tiny checkpoint, text the error line must contain)
CHECKPOINT = {
    "config-not-json": (lambda d: _write(d / "config.json", b"{dim: 64,"), "config.json"),
    "config-json-list": (lambda d: _write(d / "config.json", b"[64, 2, 4]"), "config.json"),
    "config-missing-field": (_config(dim=DROP), "dim"),
    "config-dim-string": (_config(dim="64"), "dim"),
    "config-dim-float": (_config(dim=64.0), "dim"),
    "config-zero-layers": (_config(n_layers=0), "n_layers"),
    "config-negative-heads": (_config(n_heads=-4), "n_heads"),
    "config-heads-not-multiple-of-kv": (_config(n_kv_heads=3), "n_kv_heads"),
    "config-unknown-rope-scaling": (_config(rope_scaling={"type": "yarn", "factor": 4.0}), "yarn"),
    "config-unknown-key": (_config(hidden_size=64), "hidden_size"),
    "config-eos-outside-vocab": (_config(eos_ids=[60000]), "60000"),
    "weights-missing": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors"),
    "weights-empty": (lambda d: _write(d / "model.safetensors", b""), "model.safetensors"),
    "weights-truncated": (_cut("model.safetensors", 0.5), "model.safetensors"),
    "weights-random-bytes": (lambda d: _write(d / "model.safetensors", RANDOM), "model.safetensors"),
    "weights-wrong-shape": (_weights(lambda s: s.update({"norm.weight": torch.ones(65)})), "norm.weight"),
    "weights-missing-tensor": (_weights(lambda s: s.pop("layers.1.ffn_norm.weight")), "layers.1.ffn_norm.weight"),
    "tokenizer-missing": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer"),
    "tokenizer-json-truncated": (_cut("tokenizer.json", 0.3), "tokenizer.json"),
    "tokenizer-json-not-bpe": (lambda d: _write(d / "tokenizer.json", b'{"model": {"type": "WordPiece"}}'),
                               "tokenizer.json"),
    "tokenizer-model-corrupt": (lambda d: _write(d / "tokenizer.model", RANDOM), "tokenizer.model"),
    "tokenizer-larger-than-model": (_smaller_vocab, "tokenizer.json"),
}
DRAFT = ["config-missing-field", "weights-truncated", "tokenizer-json-truncated", "tokenizer-larger-than-model"]

# name: (the tiny checkpoint's int8 or int4 copy, how to break it, text the error line must contain)
QUANTIZED = {
    "scales-missing": ("int8", _weights(lambda s: s.pop("layers.0.attention.wqkv.scales")), "layers.0.attention.wqkv.scales"),
    "scales-wrong-shape": ("int4", _weights(lambda s: s.update({"layers.1.feed_forward.w2.scales": torch.ones(
        64, 1, 2, dtype=torch.bfloat16)})), "layers.1.feed_forward.w2.scales"),
    "codes-float": ("int8", _weights(lambda s: s.update({"output.weight": s["output.weight"].float()})), "output.weight F32"),
    "float-config-with-codes": ("int8", _config(quant=DROP), "unexpected"),
    "unknown-scheme": ("int8", _config(quant={"mode": "int3"}), "unknown quantization scheme 'int3'"),
    "groupsize-does-not-divide": ("int4", _config(quant={"mode": "int4", "groupsize": 128}),
                                  "int4 groupsize 128 does not divide dim = 64"),
}
# name: (quantize.py arguments, with {tiny} / {int8} for those checkpoints; text the error line must contain)
QUANTIZE = {
    "groupsize-does-not-divide": (["--checkpoint", "{tiny}", "--mode", "int4", "--groupsize", "128"],
                                  "int4 groupsize 128 does not divide dim = 64"),
    "already-quantized": (["--checkpoint", "{int8}", "--mode", "int4"], "already quantized"),
}


def _file(name, data):  # a source file of its own beside the copy
    def make(d):
        _write(d / name, data() if callable(data) else data)
        return d / name
    return make


def _gguf(name, arch, qtype):  # a one-tensor GGUF file
    def make(d):
        import gguf

        w = gguf.GGUFWriter(str(d / name), arch)
        w.add_block_count(1)
        q = getattr(gguf.GGMLQuantizationType, qtype)
        w.add_tensor("token_embd.weight", gguf.quants.quantize(np.ones((4, 32), np.float32), q), raw_dtype=q)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return d / name
    return make


def _big_tokenizer(d):  # 49152 ids for a model of 256
    _write(d / "tokenizer.json", (d.parents[1] / "smol.json").read_bytes())


def _gguf_head():
    from convert_checkpoint import default_gguf

    with open(default_gguf(), "rb") as f:
        return f.read(1 << 20)


# name: (how to break a copy `d` of a tiny Hugging Face llama directory, returning the source to
# convert when it is not `d` itself; text the error line must contain)
SOURCE = {
    "missing": (lambda d: d / "nope", "does not exist"),
    "neither-dir-nor-gguf": (lambda d: d / "config.json", "neither"),
    "no-config": (lambda d: (d / "config.json").unlink(), "no config.json"),
    "config-not-json": (lambda d: _write(d / "config.json", b"{"), "config.json"),
    "config-json-list": (lambda d: _write(d / "config.json", b"[]"), "config.json"),
    "config-missing-field": (_config(hidden_size=DROP), "hidden_size"),
    "config-wrong-type": (_config(num_hidden_layers="2"), "config.json"),
    "unsupported-model-type": (_config(model_type="gpt2"), "'gpt2'"),
    "sliding-window": (_config(model_type="mistral", sliding_window=64), "sliding"),
    "unknown-rope-scaling": (_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    "no-weights": (lambda d: (d / "model.safetensors").unlink(), "no *.safetensors"),
    "weights-truncated": (_cut("model.safetensors", 0.5), "model.safetensors"),
    "weights-wrong-shape": (_config(intermediate_size=96), "mlp"),
    "tokenizer-corrupt": (lambda d: _write(d / "tokenizer.json", b'{"model": ['), "tokenizer.json"),
    "tokenizer-larger-than-model": (_big_tokenizer, "tokenizer.json"),
    "gguf-truncated": (_file("cut.gguf", _gguf_head), "cut.gguf"),
    "gguf-random-bytes": (_file("random.gguf", RANDOM), "random.gguf"),
    "gguf-q5_0": (_gguf("q5.gguf", "llama", "Q5_0"), "Q5_0"),
    "gguf-gpt2": (_gguf("gpt2.gguf", "gpt2", "Q8_0"), "'gpt2'"),
}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_ckpt, default_ckpt, tiny_q):
    """{(kind, case): CompletedProcess} of every case."""
    import forkrun
    from conftest import make_hf_checkpoint

    base = tmp_path_factory.mktemp("bad")
    jobs = {("checkpoint", "control"): [*GENERATE, "--checkpoint", str(tiny_ckpt)]}
    for name, (make, _) in CHECKPOINT.items():
        make(_copy(tiny_ckpt, base / name))
        jobs["checkpoint", name] = [*GENERATE, "--checkpoint", str(base / name)]
    for name in DRAFT:
        jobs["draft", name] = [*GENERATE, "--checkpoint", str(tiny_ckpt), "--draft_checkpoint", str(base / name)]
    for name, (mode, make, _) in QUANTIZED.items():
        make(_copy(tiny_q[mode], base / "q" / name))
        jobs["quantized", name] = [*GENERATE, "--checkpoint", str(base / "q" / name)]
    for name, (argv, _) in QUANTIZE.items():
        jobs["quantize", name] = [str(ROOT / "quantize.py"), "--out", str(base / "qout" / name),
                                  *(a.format(tiny=tiny_ckpt, int8=tiny_q["int8"]) for a in argv)]
    make_hf_checkpoint(base / "hf")
    shutil.copy(default_ckpt / "tokenizer.json", base / "smol.json")  # 49152 ids, the model 256
    for name, (make, _) in SOURCE.items():
        d = _copy(base / "hf", base / "src" / name)
        jobs["convert", name] = [*CONVERT, str(make(d) or d), "--out", str(base / "out" / name)]
    done = forkrun.run({"/".join(k): argv for k, argv in jobs.items()})
    return {k: done["/".join(k)] for k in jobs}


def _refused(r, expect):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr


def test_good_checkpoint_runs(runs):
    r = runs["checkpoint", "control"]
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("case", CHECKPOINT)
def test_bad_checkpoint(case, runs):
    _refused(runs["checkpoint", case], CHECKPOINT[case][1])


@pytest.mark.parametrize("case", DRAFT)
def test_bad_draft_checkpoint(case, runs):
    _refused(runs["draft", case], CHECKPOINT[case][1])


@pytest.mark.parametrize("case", SOURCE)
def test_bad_converter_source(case, runs):
    _refused(runs["convert", case], SOURCE[case][1])


@pytest.mark.parametrize("case", QUANTIZED)
def test_bad_quantized_checkpoint(case, runs):
    _refused(runs["quantized", case], QUANTIZED[case][2])


@pytest.mark.parametrize("case", QUANTIZE)
def test_bad_quantize_input(case, runs):
    _refused(runs["quantize", case], QUANTIZE[case][1])
