"""A one-file LLaMA for inference: static KV caches with per-row positions, and a windowed
(attention sinks + recent ring) cache that lets the same weights act as their own draft."""
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    intermediate_size: int
    n_kv_heads: int | None = None  # None: = n_heads (no GQA)
    head_dim: int | None = None  # None: = dim // n_heads
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    # None, {"type": "linear", "factor": f} or {"type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict | None = None
    max_seq_len: int = 2048  # the context the model was trained for
    tie_embeddings: bool = False
    attn_bias: bool = False  # q/k/v bias (Qwen2)
    # special tokens travel with the checkpoint; the model itself ignores them
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)
    add_bos: bool = False

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        kind = (self.rope_scaling or {}).get("type")
        if kind not in (None, "linear", "llama3"):
            raise ValueError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3)")

    @classmethod
    def load(cls, path) -> "ModelArgs":
        d = json.loads(Path(path).read_text())
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}")
        return cls(**d)

    def save(self, path):
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


def rope_inv_freq(args: ModelArgs) -> Tensor:
    d = args.head_dim
    inv = 1.0 / args.rope_base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    s = args.rope_scaling or {}
    if s.get("type") == "linear":
        inv = inv / s["factor"]
    elif s.get("type") == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)  # long wavelengths: interpolate
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        inv = torch.where((wavelen >= old / hi) & (wavelen <= old / lo), mid, scaled)
    return inv.float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [B, T, H, D] in the half-split layout (dims i and i + D/2 form a rotation pair);
    # cos, sin: [B, T, 1, D] float32
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)


class KVCache(nn.Module):
    """Full static cache: slot s holds position s of each row."""

    def __init__(self, batch_size, n_kv_heads, max_seq_len, head_dim, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, kv_len: int | None = None):
        # input_pos: [B, T]; k, v: [B, T, H_kv, D] -> cache [B, H_kv, S, D], mask [B, T, S]
        b = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[b, :, input_pos] = k
        self.v[b, :, input_pos] = v
        S = kv_len or self.k.shape[2]  # prefill reads only the slots it can see
        mask = torch.arange(S, device=k.device) <= input_pos[..., None]
        return self.k[:, :, :S], self.v[:, :, :S], mask


class WindowCache(nn.Module):
    """`sink` fixed slots for positions [0, sink) + a ring of `window` slots for the most recent
    positions. Keys keep their absolute rotation; `pos` (-1 = empty) masks, so ring order is free."""

    def __init__(self, batch_size, n_kv_heads, sink, window, head_dim, dtype, device=None):
        super().__init__()
        self.sink, self.window = sink, window
        shape = (batch_size, n_kv_heads, sink + window, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("pos", torch.full((batch_size, sink + window), -1, device=device), persistent=False)

    def slot(self, input_pos: Tensor) -> Tensor:
        ring = self.sink + (input_pos - self.sink) % self.window
        return torch.where(input_pos < self.sink, input_pos, ring)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, kv_len: int | None = None):
        b = torch.arange(k.shape[0], device=k.device)[:, None]
        s = self.slot(input_pos)
        self.k[b, :, s] = k
        self.v[b, :, s] = v
        self.pos[b, s] = input_pos
        pos = self.pos[:, None, :]
        mask = (pos >= 0) & (pos <= input_pos[..., None])
        return self.k, self.v, mask

    def fill(self, cache: KVCache, length: Tensor):
        """Take the sinks and the last `window` positions below each row's `length` [B] from the
        full cache."""
        B, H, _, D = self.k.shape
        last = length[:, None] - 1 - self.sink
        j = torch.arange(self.window, device=length.device)
        # newest position p >= sink with ring slot j and p <= length - 1
        ring = self.sink + j + self.window * torch.div(last - j, self.window, rounding_mode="floor")
        ring = torch.where(ring >= self.sink, ring, -1)
        sinks = torch.arange(self.sink, device=length.device).expand(B, -1)
        pos = torch.cat((torch.where(sinks < length[:, None], sinks, -1), ring), dim=1)
        idx = pos.clamp(min=0)[:, None, :, None].expand(B, H, -1, D)
        self.k.copy_(cache.k.gather(2, idx))
        self.v.copy_(cache.v.gather(2, idx))
        self.pos.copy_(pos)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        qkv = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
        self.wqkv = nn.Linear(args.dim, qkv, bias=args.attn_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None
        self.window: WindowCache | None = None

    def forward(self, x, cos, sin, input_pos, draft=False, to_window=False, kv_len=None):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = apply_rope(q.view(B, T, H, D), cos, sin)
        k = apply_rope(k.view(B, T, Hkv, D), cos, sin)
        v = v.view(B, T, Hkv, D)
        cache = self.window if draft else self.kv_cache
        k_all, v_all, mask = cache.update(input_pos, k, v, kv_len)
        if to_window:  # verification hands its (target-quality) K/V to the draft window
            self.window.update(input_pos, k, v)
        # GQA without copying K/V: the G query heads of a KV group become G*T query rows
        G = H // Hkv
        q = q.view(B, T, Hkv, G, D).permute(0, 2, 1, 3, 4).reshape(B, Hkv, T * G, D)
        mask = mask[:, None, :, None, :].expand(-1, -1, -1, G, -1).reshape(B, 1, T * G, -1)
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        return self.wo(y.view(B, Hkv, T, G, D).permute(0, 2, 1, 3, 4).reshape(B, T, H * D))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)  # [gate; up]
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, input_pos, draft, to_window, kv_len):
        x = x + self.attention(self.attention_norm(x), cos, sin, input_pos, draft, to_window, kv_len)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size = self.max_seq_len = -1

    def setup_caches(self, batch_size, max_seq_len, dtype=None):
        """Full caches of `max_seq_len` slots per row. Old contents need no clearing: prefill
        rewrites what a row reads, and every later slot is written before it is read."""
        dtype = dtype or self.tok_embeddings.weight.dtype
        device = self.tok_embeddings.weight.device
        t = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = torch.outer(t, rope_inv_freq(self.args))
        freqs = torch.cat((freqs, freqs), dim=-1).to(device)  # [S, D], half-split layout
        c = self.layers[0].attention.kv_cache
        if c is not None and c.k.shape[0] == batch_size and c.k.shape[2] == max_seq_len and c.k.dtype == dtype:
            self.cos.copy_(freqs.cos())  # same buffers: compiled steps and CUDA graphs hold on to them
            self.sin.copy_(freqs.sin())
            return
        self.max_batch_size, self.max_seq_len = batch_size, max_seq_len
        for b in self.layers:
            a = b.attention
            a.window = a.kv_cache = None  # free the old caches before allocating new ones
            a.kv_cache = KVCache(batch_size, a.n_kv_heads, max_seq_len, a.head_dim, dtype, device)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def setup_window(self, budget, sink):
        """A draft window beside the full caches: `sink` sink slots + `budget - sink` recent ones."""
        for b in self.layers:
            a = b.attention
            if a.window is None or (a.window.sink, a.window.window) != (sink, budget - sink):
                k = a.kv_cache.k
                a.window = None
                a.window = WindowCache(k.shape[0], a.n_kv_heads, sink, budget - sink, a.head_dim, k.dtype, k.device)

    def fill_window(self, length: Tensor):
        for b in self.layers:
            b.attention.window.fill(b.attention.kv_cache, length)

    def forward(self, idx: Tensor, input_pos: Tensor, draft=False, to_window=False, kv_len=None,
                logits=True) -> Tensor | None:
        """idx, input_pos: [B, T] tokens at per-row positions -> logits [B, T, V].
        draft: read/write the window instead of the full cache; to_window: also write the window."""
        cos, sin = self.cos[input_pos][:, :, None], self.sin[input_pos][:, :, None]
        x = self.tok_embeddings(idx)
        for b in self.layers:
            x = b(x, cos, sin, input_pos, draft, to_window, kv_len)
        return self.output(self.norm(x)) if logits else None

    @classmethod
    def from_checkpoint(cls, path, device="cpu", dtype=None) -> "Transformer":
        from safetensors.torch import load_file

        path = Path(path)
        for f in ("config.json", "model.safetensors"):
            if not (path / f).is_file():
                raise FileNotFoundError(f"checkpoint {path} has no {f} (make one with convert_checkpoint.py)")
        args = ModelArgs.load(path / "config.json")
        with torch.device("meta"):
            model = cls(args)
        state = load_file(path / "model.safetensors", device=str(device))
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, assign=True, strict=False)
        if args.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight
            missing = [k for k in missing if k != "output.weight"]
        if missing or unexpected:
            raise ValueError(f"{path}/model.safetensors does not fit its config.json: "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model.eval().requires_grad_(False)
