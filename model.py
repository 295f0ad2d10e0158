"""A one-file LLaMA for inference: static KV caches with per-row positions, and small draft caches
(StreamingLLM's attention sinks + a ring of recent positions, or SnapKV's selected prompt positions
and a ring) that let the same weights act as their own draft. Attention takes each row's positions
as data: FlexAttention with a block mask when compiled, SDPA with a boolean mask when eager."""
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention


class UsageError(ValueError):
    """A user's mistake (a bad flag, file or checkpoint): every CLI prints it as one line
    `error: ...` and exits with status 2."""


QUANT_MODES = ("int8", "int4")
INT4_GROUPS = (32, 64, 128, 256)  # what torch's int4 kernels take


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
    # None (float weights) or weight-only quantization of every linear layer (see QLinear; made by
    # quantize.py): {"mode": "int8"} (a scale per output channel) or {"mode": "int4", "groupsize": g}
    quant: dict | None = None

    def __post_init__(self):
        def need(ok, what):
            if not ok:
                raise UsageError(what)

        def is_int(v, lo=1):
            return isinstance(v, int) and not isinstance(v, bool) and v >= lo

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

        for k in ("dim", "n_layers", "n_heads", "vocab_size", "intermediate_size", "max_seq_len"):
            need(is_int(getattr(self, k)), f"{k} must be a positive integer, not {getattr(self, k)!r}")
        for k in ("n_kv_heads", "head_dim"):
            need(getattr(self, k) is None or is_int(getattr(self, k)),
                 f"{k} must be a positive integer or null, not {getattr(self, k)!r}")
        for k in ("norm_eps", "rope_base"):
            need(is_num(getattr(self, k)), f"{k} must be a positive number, not {getattr(self, k)!r}")
        for k in ("tie_embeddings", "attn_bias", "add_bos"):
            need(isinstance(getattr(self, k), bool), f"{k} must be true or false, not {getattr(self, k)!r}")
        need(self.bos_id is None or is_int(self.bos_id, 0), f"bos_id must be a token id or null, not {self.bos_id!r}")
        need(isinstance(self.eos_ids, list) and all(is_int(i, 0) for i in self.eos_ids),
             f"eos_ids must be a list of token ids, not {self.eos_ids!r}")
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads
        need(self.head_dim % 2 == 0 and self.head_dim > 0, f"head_dim {self.head_dim} must be even (RoPE pairs)")
        need(self.n_heads % self.n_kv_heads == 0,
             f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        s = self.rope_scaling
        need(s is None or isinstance(s, dict), f"rope_scaling must be an object or null, not {s!r}")
        kind = (s or {}).get("type")
        need(kind in (None, "linear", "llama3"), f"unsupported rope scaling type {kind!r} (supported: linear, llama3)")
        want = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                  "original_max_position_embeddings")}.get(kind, ())
        need(all(is_num(s.get(k)) for k in want), f"rope_scaling {kind} needs positive numbers {', '.join(want)}")
        need(kind != "llama3" or s["high_freq_factor"] > s["low_freq_factor"],
             "rope_scaling llama3 needs high_freq_factor > low_freq_factor")
        q = self.quant
        need(q is None or isinstance(q, dict), f"quant must be an object or null, not {q!r}")
        mode = (q or {}).get("mode")
        need(q is None or mode in QUANT_MODES,
             f"unknown quantization scheme {mode!r} (supported: {', '.join(QUANT_MODES)}; make one with quantize.py)")
        need(set(q or {}) <= {"mode", "groupsize"}, f"quant: unknown keys {sorted(set(q or {}) - {'mode', 'groupsize'})}")
        if mode == "int4":  # torch's int4 kernels: these group sizes, output rows in multiples of 16
            g = q.get("groupsize")
            need(g in INT4_GROUPS, f"int4 groupsize must be one of {INT4_GROUPS}, not {g!r}")
            for k, n in (("dim", self.dim), ("n_heads * head_dim", self.n_heads * self.head_dim),
                         ("intermediate_size", self.intermediate_size)):
                need(n % g == 0, f"int4 groupsize {g} does not divide {k} = {n} (the inputs of a linear layer)")
            rows = ((self.n_heads + 2 * self.n_kv_heads) * self.head_dim, self.dim, 2 * self.intermediate_size,
                    self.vocab_size)
            need(all(n % 16 == 0 for n in rows), f"int4 needs linear layers of 16k outputs, not {rows}")
        elif mode == "int8":
            need(q.get("groupsize") is None, "int8 has a scale per output channel: no groupsize")

    @classmethod
    def load(cls, path) -> "ModelArgs":
        """config.json of a converted checkpoint; anything malformed is a UsageError naming the file."""
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UsageError(f"{path}: cannot read it as JSON ({e})") from None
        if not isinstance(d, dict):
            raise UsageError(f"{path}: expected a JSON object of model settings")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        missing = [f.name for f in fields(cls)
                   if f.default is MISSING and f.default_factory is MISSING and f.name not in d]
        if unknown or missing:
            raise UsageError(f"{path}: " + "; ".join(
                ([f"unknown keys {sorted(unknown)}"] if unknown else []) + ([f"missing {missing}"] if missing else []))
                + " (make checkpoints with convert_checkpoint.py)")
        try:
            return cls(**d)
        except UsageError as e:
            raise UsageError(f"{path}: {e}") from None

    def save(self, path):
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    def kv_bytes_per_token(self, elem: int, n_kv_heads: int | None = None) -> int:
        """K and V bytes one token holds over all layers (n_kv_heads: one rank's share under TP)."""
        return 2 * self.n_layers * (n_kv_heads or self.n_kv_heads) * self.head_dim * elem


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


# ------------------------------------------------------------------------------------ attention
BLOCK = 128  # FlexAttention's block of queries and of KV slots
OBS = 32  # a prefill keeps the queries of each row's last OBS positions (Attention.q_obs: SnapKV's observation window)


@dataclass
class CacheArgs:
    """Which caches one forward reads and writes; built once per forward, read by every layer."""
    draft: bool = False  # read and write the draft cache instead of the full cache
    to_draft: bool = False  # also write the new K/V into the draft cache (verification's hand-off)
    rows: slice | Tensor = field(default_factory=lambda: slice(None))  # the caches' rows this forward's
    # rows are: a slice, or an index tensor [B'] (rows refilled together)
    kv_len: int | None = None  # full-cache slots a prefill chunk reads (its queries at the same positions in every row)
    flex: bool = False  # FlexAttention or SDPA (see attend)
    obs: Tensor | None = None  # a prefill: the positions [B', OBS] whose queries each layer keeps (Attention.keep)
    masks: dict = field(default_factory=dict)  # the full cache's mask, built by the first layer


def attend(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, kv_pos: Tensor | None, c: CacheArgs) -> Tensor:
    """q: [B, H, T, D] at positions q_pos [B, T]; k, v: [B, H_kv, S, D] (query head h reads KV
    head h // G, G = H / H_kv), slot s holding position kv_pos[b, s] (or kv_pos[b, h_kv, s]: per
    KV head; -1: empty) or, with kv_pos None (the full cache), position s. A slot is visible iff
    0 <= its position <= the query's (`visible`). -> [B, H, T, D]

    The G query heads of a KV group are folded into the query axis ([B, H_kv, G*T, D]: row
    g*T + t is head g's query t), so neither kernel copies K/V, and FlexAttention sees one query
    head per KV head: Inductor's split-KV decoding kernel wants H/H_kv a power of two and a query
    length below 128, which G*T is for every gamma <= 6 of LLaMA-shaped models (G <= 8).
    Backends: a prefill chunk (every row's queries at the same positions) is SDPA with one causal
    mask broadcast over the rows; c.flex is FlexAttention with a block mask of each row's KV
    blocks; else SDPA with a dense mask per row. The full cache's mask is built once per forward
    (c.masks), not once per layer."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    q = q.reshape(B, Hkv, G * T, D)
    key = ("prefill" if c.kv_len is not None else "flex" if c.flex else "dense") if kv_pos is None else None
    mask = c.masks.get(key)
    if mask is None:
        if key == "prefill":  # row 0's positions are every row's: [1, 1, G*T, S]
            mask = dense_mask(q_pos[:1], None, S, G)
        else:
            mask = block_mask(q_pos, kv_pos, S, G) if c.flex else dense_mask(q_pos, kv_pos, S, G)
        if key:
            c.masks[key] = mask
    if c.flex and key != "prefill":
        y = flex_attention(q, k, v, block_mask=mask)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y.view(B, H, T, D)


def dense_mask(q_pos: Tensor, kv_pos: Tensor | None, S: int, G: int = 1) -> Tensor:
    """`visible` on broadcast index ranges of G*T folded query rows: [B, 1 (or H_kv for per-head
    kv_pos), G*T, S] booleans."""
    B, T = q_pos.shape
    ar = lambda n, *shape: torch.arange(n, device=q_pos.device).view(*shape)
    h = ar(kv_pos.shape[1], 1, -1, 1, 1) if kv_pos is not None and kv_pos.dim() == 3 else None
    return visible(q_pos, kv_pos, S)(ar(B, -1, 1, 1, 1), h, ar(G * T, 1, 1, -1, 1), ar(S, 1, 1, 1, -1))


def block_mask(q_pos: Tensor, kv_pos: Tensor | None, S: int, G: int = 1) -> BlockMask:
    """The BlockMask of `attend` for G*T folded query rows: for the full cache each query block
    reads KV blocks up to its rows' largest position (so a row costs its own length, not S); a
    draft cache is small and read whole, its slots masked through kv_pos. Built from [B]-sized
    tensor ops, no S-sized mask; head dimension 1 (every KV head reads the same blocks)."""
    B, T = q_pos.shape[0], G * q_pos.shape[1]
    nq, nkv = -(-T // BLOCK), -(-S // BLOCK)
    idx = torch.arange(nkv, device=q_pos.device, dtype=torch.int32).expand(B, 1, nq, nkv)
    if kv_pos is None:
        last = F.pad(q_pos.repeat(1, G), (0, nq * BLOCK - T), value=0).view(B, nq, BLOCK).amax(-1)
        n = (last // BLOCK + 1).clamp(max=nkv)
    else:
        n = torch.full((B, nq), nkv, device=q_pos.device)
    return BlockMask.from_kv_blocks(n[:, None].to(torch.int32), idx, BLOCK_SIZE=BLOCK,
                                    mask_mod=visible(q_pos, kv_pos, S), seq_lengths=(T, S))


def visible(q_pos: Tensor, kv_pos: Tensor | None, S: int):
    """The one visibility rule of `attend`, as a FlexAttention mask_mod (b, h, query row, slot)
    -> bool; h is the KV head and query row r is query r % T (folded rows, see attend). The eager
    masks call it on broadcast index ranges. It reads only its arguments (Inductor's CPU template
    cannot take a mask_mod over tensors computed inside the graph)."""
    T, kmax = q_pos.shape[1], S - 1  # kernels pad slots to whole blocks: keep lookups in range
    if kv_pos is None:
        return lambda b, h, qi, ki: ki <= q_pos[b, qi % T]

    def mask_mod(b, h, qi, ki):
        kp = kv_pos[b, h, ki.clamp(max=kmax)] if kv_pos.dim() == 3 else kv_pos[b, ki.clamp(max=kmax)]
        return (kp >= 0) & (kp <= q_pos[b, qi % T])
    return mask_mod


# ---------------------------------------------------------------------------------------- caches
class KVCache(nn.Module):
    """Full static cache [B, H_kv, S, D]: slot s holds position s of each row."""

    def __init__(self, batch_size, n_kv_heads, max_seq_len, head_dim, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, rows=slice(None), kv_len=None):
        """Write k, v [B', T, H_kv, D] at input_pos [B', T] of `rows` (a slice of the batch or an
        index tensor [B']); -> (k, v, None): the slots a query may read (the first kv_len: prefill
        reads no further)."""
        r = torch.arange(self.k.shape[0], device=k.device)[rows][:, None]
        self.k[r, :, input_pos] = k
        self.v[r, :, input_pos] = v
        return self.k[rows][:, :, :kv_len], self.v[rows][:, :, :kv_len], None  # a slice: views

    def take(self, rows, pos: Tensor) -> tuple[Tensor, Tensor]:
        """K and V of `rows` at positions pos [B', H_kv, P] -> [B', H_kv, P, D] each: one index_select
        of the flattened cache (on the CPU several times faster than the same advanced indexing)."""
        B, H, S, D = self.k.shape
        r = torch.arange(B, device=pos.device)[rows][:, None, None]
        at = ((r * H + torch.arange(H, device=pos.device)[None, :, None]) * S + pos).reshape(-1)
        shape = (*pos.shape, D)
        return self.k.view(-1, D).index_select(0, at).view(shape), self.v.view(-1, D).index_select(0, at).view(shape)


class WindowCache(nn.Module):
    """The StreamingLLM draft cache: `sink` fixed slots for positions [0, sink) + a ring of
    `window` slots for the most recent positions. Keys keep their absolute rotation and `pos`
    (-1 = empty) masks, so ring order is free.

    A draft cache is any module with this interface (see Transformer.setup_draft_cache):
      __init__(batch_size, n_kv_heads, head_dim, dtype, device, **options)
      update(input_pos, k, v, rows) -> (k, v, kv_pos): store the new K/V, return what a query reads
      fill(full: KVCache, length, rows, q): take each row's prompt [0, length) from the full cache;
        q [B', OBS, H, D]: the prefill's queries at positions length - OBS .. length - 1 (a selecting
        cache scores the prompt with them; this one ignores them)"""

    def __init__(self, batch_size, n_kv_heads, head_dim, dtype, device=None, *, sink: int, window: int):
        super().__init__()
        self.sink, self.window = sink, window
        shape = (batch_size, n_kv_heads, sink + window, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("pos", torch.full((batch_size, sink + window), -1, device=device), persistent=False)

    def slot(self, input_pos: Tensor) -> Tensor:
        ring = self.sink + (input_pos - self.sink) % self.window
        return torch.where(input_pos < self.sink, input_pos, ring)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, rows=slice(None)):
        r, s = torch.arange(self.k.shape[0], device=k.device)[rows][:, None], self.slot(input_pos)
        self.k[r, :, s] = k
        self.v[r, :, s] = v
        self.pos[r, s] = input_pos
        return self.k[rows], self.v[rows], self.pos[rows]

    def fill(self, full: KVCache, length: Tensor, rows=slice(None), q: Tensor | None = None):
        """The sinks and the last `window` positions below each row's `length` [B'] from `full`;
        full=None empties the rows (a draft model then prefills them itself)."""
        if full is None:
            self.pos[rows] = -1
            return
        B, H = length.shape[0], self.k.shape[1]
        ring = self.sink + ring_positions(length - self.sink, self.window)
        ring = torch.where(ring >= self.sink, ring, -1)
        sinks = torch.arange(self.sink, device=length.device).expand(B, -1)
        pos = torch.cat((torch.where(sinks < length[:, None], sinks, -1), ring), dim=1)
        self.k[rows], self.v[rows] = full.take(rows, pos.clamp(min=0)[:, None, :].expand(-1, H, -1))
        self.pos[rows] = pos


def ring_positions(n: Tensor, window: int) -> Tensor:
    """[B'] counts -> [B', window]: the newest of positions [0, n) in ring slot j (p % window == j),
    or a negative number where there is none."""
    j = torch.arange(window, device=n.device)
    return j + window * torch.div(n[:, None] - 1 - j, window, rounding_mode="floor")


class SnapKVCache(nn.Module):
    """A SnapKV-selected draft cache (SnapKV, arXiv 2404.14469, as MagicDec v5 drafts with it): per
    row and KV head, `select` slots hold the prompt positions that the prompt's last OBS queries
    attend to most (`score`), the first `sink` positions and the observation window always among
    them; a ring of `window` slots holds the most recent positions (the prompt's last ones after
    `fill`, then what drafts and verification write), shared by the heads. Positions differ per
    KV head, so `pos` is [B, H_kv, select + window] (-1 = empty) and attention masks per head.
    Keys keep their absolute rotation, as in WindowCache.

    Another scoring: change `score` (observation queries and prompt keys -> a number per row, KV
    head and position); `fill` keeps the best ones, the ring is untouched."""

    def __init__(self, batch_size, n_kv_heads, head_dim, dtype, device=None, *, sink: int, select: int,
                 window: int, pool: int = 7):
        super().__init__()
        assert pool % 2 == 1, "pool: an odd number of neighbouring positions"
        self.sink, self.select, self.window, self.pool = sink, select, window, pool
        shape = (batch_size, n_kv_heads, select + window, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("pos", torch.full(shape[:3], -1, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, rows=slice(None)):
        """Into the ring, every head alike: position p at slot select + p % window."""
        r, s = torch.arange(self.k.shape[0], device=k.device)[rows][:, None], self.select + input_pos % self.window
        self.k[r, :, s] = k
        self.v[r, :, s] = v
        self.pos[r, :, s] = input_pos[..., None]  # [B', T, H_kv]
        return self.k[rows], self.v[rows], self.pos[rows]

    def score(self, q: Tensor, k: Tensor, length: Tensor) -> Tensor:
        """q [B', w, H, D]: the queries at positions length - w .. length - 1; k [B', H_kv, L, D]: the
        prompts' keys -> [B', H_kv, L]: each position's attention weight from the w queries, summed
        over them and over the KV head's G query heads, averaged over `pool` neighbours."""
        B, w, H, D = q.shape
        Hkv, L = k.shape[1], k.shape[2]
        G = H // Hkv
        q = q.float().view(B, w, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * w, D)  # row g*w + j
        qp = (length[:, None] - w + torch.arange(w, device=q.device)).repeat(1, G)[:, None, :, None]  # [B', 1, G*w, 1]
        a = (q @ k.float().transpose(-1, -2)) * D ** -0.5  # [B', H_kv, G*w, L]: a few queries, never L x L
        a = a.masked_fill(torch.arange(L, device=q.device) > qp, -math.inf).softmax(-1)
        a = a.masked_fill(qp < 0, 0).sum(2)  # queries before the prompt's start (a short prompt) count nothing
        return F.avg_pool1d(a, self.pool, stride=1, padding=self.pool // 2, count_include_pad=False)

    def fill(self, full: KVCache, length: Tensor, rows=slice(None), q: Tensor | None = None):
        """Select each row's slots from its prompt [0, length [B']) in `full`, scored with the prefill's
        queries q [B', OBS, H, D] at its last positions; full=None empties the rows."""
        if full is None:
            self.pos[rows] = -1
            return
        dev, H = length.device, self.k.shape[1]
        r = torch.arange(full.k.shape[0], device=dev)[rows]
        L = max(int(length.max()), 1)
        k = full.k[:, :, :L][rows]  # [B', H_kv, L, D]
        n = max(1, (1 << 26) // (q.shape[1] * q.shape[2] * L))  # rows per score tensor: <= 2^26 elements
        s = torch.cat([self.score(q[i: i + n], k[i: i + n], length[i: i + n]) for i in range(0, len(r), n)])
        p = torch.arange(L, device=dev)
        before = p < (length - self.window)[:, None]  # [B', L]: positions the ring does not hold
        forced = before & ((p < self.sink) | (p >= (length - q.shape[1])[:, None]))  # sinks, observation window
        s = s.masked_fill(~before[:, None], -math.inf).masked_fill(forced[:, None], math.inf)
        top, sel = F.pad(s, (0, max(0, self.select - L)), value=-math.inf).topk(self.select, -1)  # [B', H, select]
        sel = torch.where(top > -math.inf, sel, -1).sort(-1).values
        ring = ring_positions(length, self.window).clamp(min=-1)[:, None].expand(-1, H, -1)
        pos = torch.cat((sel, ring), -1)  # [B', H, select + window]
        self.k[rows], self.v[rows] = full.take(rows, pos.clamp(min=0))
        self.pos[rows] = pos


# ----------------------------------------------------------------------------------------- model
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
        self.draft_cache: nn.Module | None = None
        self.q_obs: Tensor | None = None  # [B', OBS, H, D]: the last prefill's queries at CacheArgs.obs

    def keep(self, q: Tensor, input_pos: Tensor, obs: Tensor):
        """q [B', T, H, D] of a prefill chunk (every row's queries at the same positions): keep those
        at obs [B', OBS] into q_obs. Each position is in one chunk; one not prefilled (< 0) keeps a
        stale query, which the draft cache's fill ignores."""
        i = obs - input_pos[:1, :1]  # [B', OBS]: index into this chunk
        got = q.gather(1, i.clamp(0, q.shape[1] - 1)[..., None, None].expand(-1, -1, *q.shape[2:]))
        if self.q_obs is None or self.q_obs.shape != got.shape:
            self.q_obs = torch.zeros_like(got)
        self.q_obs = torch.where(((i >= 0) & (i < q.shape[1]))[..., None, None], got, self.q_obs)

    def forward(self, x, cos, sin, input_pos, c: CacheArgs):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = apply_rope(q.view(B, T, H, D), cos, sin)
        k = apply_rope(k.view(B, T, Hkv, D), cos, sin)
        v = v.view(B, T, Hkv, D)
        if c.obs is not None:  # a prefill: the observation window's queries, for the draft cache's fill
            self.keep(q, input_pos, c.obs)
        if c.draft:
            k_all, v_all, kv_pos = self.draft_cache.update(input_pos, k, v, c.rows)
        else:
            k_all, v_all, kv_pos = self.kv_cache.update(input_pos, k, v, c.rows, c.kv_len)
        if c.to_draft:  # verification hands its (target-quality) K/V to the draft cache
            self.draft_cache.update(input_pos, k, v, c.rows)
        y = attend(q.transpose(1, 2), k_all, v_all, input_pos, kv_pos, c)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * D))


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

    def forward(self, x, cos, sin, input_pos, c: CacheArgs):
        x = x + self.attention(self.attention_norm(x), cos, sin, input_pos, c)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.quant:  # the output layer too, as its own copy of a tied embedding (see QLinear)
            swap_linears(self, args.quant)
        elif args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.batch_size = self.max_seq_len = -1
        self.draft_key = None

    def setup_caches(self, batch_size, max_seq_len, full=True):
        """RoPE tables for `max_seq_len` positions and (full=True) full caches of that many slots
        per row; full=False is for a draft model that only keeps a draft cache. Caches of the same
        shape are kept (compiled steps and CUDA graphs hold on to them) and need no clearing:
        prefill rewrites what a row reads, and every later slot is written before it is read."""
        w = self.tok_embeddings.weight
        c = self.layers[0].attention.kv_cache
        same = (batch_size, max_seq_len) == (self.batch_size, self.max_seq_len)
        if not (same and (c is not None) == full and (c is None or c.k.dtype == w.dtype)):
            self.free_caches()
            for b in self.layers:
                a = b.attention
                if full:
                    a.kv_cache = KVCache(batch_size, a.n_kv_heads, max_seq_len, a.head_dim, w.dtype, w.device)
            self.batch_size, self.max_seq_len = batch_size, max_seq_len
            self.register_buffer("cos", torch.zeros(max_seq_len, self.args.head_dim, device=w.device), persistent=False)
            self.register_buffer("sin", torch.zeros_like(self.cos), persistent=False)
        freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), rope_inv_freq(self.args))
        freqs = torch.cat((freqs, freqs), dim=-1).to(w.device)  # [S, D], half-split layout
        self.cos.copy_(freqs.cos())
        self.sin.copy_(freqs.sin())

    def setup_draft_cache(self, cls=WindowCache, **options):
        """One draft cache per layer, cls(batch_size, n_kv_heads, head_dim, dtype, device, **options),
        beside (or, for a separate draft model, instead of) the full cache. Kept across calls with
        the same class and options."""
        w = self.tok_embeddings.weight
        key = (cls, options, self.batch_size, w.dtype)
        if self.layers[0].attention.draft_cache is not None and self.draft_key == key:
            return
        for b in self.layers:
            a = b.attention
            a.draft_cache = None  # free before allocating
            a.draft_cache = cls(self.batch_size, a.n_kv_heads, a.head_dim, w.dtype, w.device, **options)
        self.draft_key = key

    def fill_draft_cache(self, length: Tensor, rows=slice(None)):
        """After a prefill of these rows: each draft cache takes their prompts [0, length) from the
        full cache, with the prefill's queries at their last OBS positions."""
        for b in self.layers:
            a = b.attention
            a.draft_cache.fill(a.kv_cache, length, rows, a.q_obs)

    def catch_up_draft_cache(self, input_pos: Tensor):
        """Write the full cache's K/V at positions input_pos [B, T] into each draft cache, as a
        verify's hand-off would have: the positions that plain steps wrote while the draft was idle."""
        for b in self.layers:
            a = b.attention
            k, v = a.kv_cache.take(slice(None), input_pos[:, None].expand(-1, a.kv_cache.k.shape[1], -1))
            a.draft_cache.update(input_pos, k.transpose(1, 2), v.transpose(1, 2))  # [B, T, H_kv, D] each

    def free_caches(self):
        for b in self.layers:
            b.attention.kv_cache = b.attention.draft_cache = b.attention.q_obs = None
        self.batch_size = self.max_seq_len = -1

    def forward(self, idx: Tensor, input_pos: Tensor, draft=False, to_draft=False, rows=slice(None), kv_len=None,
                flex=False, logits: bool | str = True, obs: Tensor | None = None) -> Tensor | None:
        """idx, input_pos: [B', T] tokens at per-row positions of `rows` (a slice of the caches' batch
        or an index tensor [B'])
        -> logits [B', T, V] (under tensor parallelism: this rank's slice of the vocabulary).
        draft: read/write the draft cache instead of the full cache; to_draft: also write the draft
        cache; kv_len: the full cache's slots the queries may read (a prefill chunk: every row's
        queries at the same positions); flex: see attend; logits: False (none), "last" (the last
        position's only, [B', 1, V]); obs: a prefill chunk's rows keep their queries at these
        positions [B', OBS] (Attention.keep)."""
        c = CacheArgs(draft, to_draft, rows, kv_len, flex, obs)
        cos, sin = self.cos[input_pos][:, :, None], self.sin[input_pos][:, :, None]
        x = self.tok_embeddings(idx)
        for b in self.layers:
            x = b(x, cos, sin, input_pos, c)
        if not logits:
            return None
        return self.output(self.norm(x[:, -1:] if logits == "last" else x))

    @classmethod
    def from_checkpoint(cls, path, device="cpu", dtype=None) -> "Transformer":
        """A converted checkpoint; a missing, malformed or mismatched one is a UsageError."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "config.json").is_file():
            raise UsageError(f"checkpoint {path} has no config.json (make one with convert_checkpoint.py)")
        args = ModelArgs.load(path / "config.json")
        check_weights(path, args)
        with torch.device("meta"):
            model = cls(args)
        state = load_file(path / "model.safetensors", device=str(device))
        if dtype is not None:  # quantized codes stay integers
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state, assign=True, strict=False)
        if args.tie_embeddings and not args.quant:
            model.output.weight = model.tok_embeddings.weight
        pack_linears(model, model.tok_embeddings.weight.dtype)
        return model.eval().requires_grad_(False)


def check_weights(path, args: ModelArgs):
    """model.safetensors' names, shapes and dtypes against config.json, from its header alone (so
    tensor-parallel ranks, which read slices, can check it before any process group exists)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise UsageError(f"checkpoint {path} has no model.safetensors (make one with convert_checkpoint.py)")
    try:
        with safe_open(path / "model.safetensors", framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            shapes = {k: list(s.get_shape()) for k, s in slices.items()}
            types = {k: s.get_dtype() for k, s in slices.items()}
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{path}/model.safetensors: cannot read it ({e})") from None
    with torch.device("meta"):
        ref = Transformer(args).state_dict()
    want = {k: list(v.shape) for k, v in ref.items()}
    if args.tie_embeddings and not args.quant:
        want.pop("output.weight")
    bad = [f"{k} {shapes[k]} (config.json implies {w})" for k, w in want.items() if k in shapes and shapes[k] != w]
    missing = [k for k in want if k not in shapes]
    unexpected = [k for k in shapes if k not in want and k != "output.weight"]
    if bad or missing or unexpected:
        raise UsageError(f"{path}/model.safetensors does not fit its config.json"
                         + (f" (quant {args.quant})" if args.quant else "") + ": "
                         + "; ".join([f"shapes {bad[:2]}"] * bool(bad) + [f"missing {missing[:3]}"] * bool(missing)
                                     + [f"unexpected {unexpected[:3]}"] * bool(unexpected)))
    # quantized codes are int8 / uint8 (see QLinear), every other tensor a float
    name = {"I8": torch.int8, "U8": torch.uint8, "F32": "float", "F16": "float", "BF16": "float"}
    kind = lambda k: ref[k].dtype if k in ref and not ref[k].dtype.is_floating_point else "float"
    wrong = [f"{k} {t}" for k, t in types.items() if name.get(t, t) != kind(k)]
    if wrong:
        why = f"does not hold config.json's quant {args.quant}" if args.quant else "holds non-float tensors"
        raise UsageError(f"{path}/model.safetensors {why} ({', '.join(wrong[:3])})")


# ------------------------------------------------------------------------------- quantized linears
class QLinear(nn.Module):
    """A linear layer with weight-only quantized weights (quantize.py makes them); activations stay
    in their dtype. As stored in model.safetensors:
      int8: weight [N, K] int8, scales [N]: w = weight * scales (one scale per output channel);
      int4: weight [N, K/2] uint8, two codes q in [0, 16) a byte (the even input in the high
            nibble), scales [N, K/g, 2] (scale, zero) per group of g inputs: w = (q - 8) * scale + zero.
    Scales are stored in bfloat16. pack() turns them into what the device's kernel reads."""

    def __init__(self, in_features: int, out_features: int, bias=False, *, mode: str, groupsize: int | None = None):
        super().__init__()
        N, K, self.mode, self.groupsize = out_features, in_features, mode, groupsize
        self.in_features, self.out_features, self.packed = K, N, None  # packed: the device type packed for
        int4 = mode == "int4"
        p = lambda t: nn.Parameter(t, requires_grad=False)  # integer tensors can only be frozen parameters
        self.weight = p(torch.zeros(N, K // 2 if int4 else K, dtype=torch.uint8 if int4 else torch.int8))
        self.scales = p(torch.ones((N, K // groupsize, 2) if int4 else (N,), dtype=torch.bfloat16))
        self.bias = p(torch.zeros(N)) if bias else None

    def pack(self, dtype: torch.dtype):
        """Scales to the activations' dtype (the kernels take them so) and the weights into the
        layout of their device's kernel: CPU int4 (torch's own blocked layout) and CUDA int4
        (tinygemm's) are repacked, int8 is used as stored. A device without a kernel: UsageError."""
        if self.packed:
            return
        w, s, dev = self.weight.contiguous(), self.scales.to(dtype).contiguous(), self.weight.device  # kernels' need
        if w.data_ptr() % 64:  # (a tensor read from a file can start anywhere; torch's CPU int8 kernel
            w = w.clone()      # loads W in aligned vectors and crashes on an unaligned one)
        if self.mode == "int4" and dev.type == "cpu":
            w = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(w).int(), 2)
            s = s.transpose(0, 1).contiguous()  # [K/g, N, 2]
        elif self.mode == "int4":
            if dev.type != "cuda" or torch.cuda.get_device_capability(dev) < (8, 0) or dtype != torch.bfloat16:
                what = f"sm_{''.join(map(str, torch.cuda.get_device_capability(dev)))}" if dev.type == "cuda" else dev.type
                raise UsageError(f"int4 weights run on the CPU, or on CUDA through torch._weight_int4pack_mm with "
                                 f"compute capability >= 8.0 and bfloat16 activations (here: {what}, "
                                 f"{str(dtype).removeprefix('torch.')}): use an int8 checkpoint or --dtype bfloat16")
            tiles = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)  # K in tiles of 16 * tiles
            w, s = torch._convert_weight_to_int4pack(w, tiles), s.transpose(0, 1).contiguous()
        self.weight, self.scales = nn.Parameter(w, requires_grad=False), nn.Parameter(s, requires_grad=False)
        self.packed = dev.type

    def forward(self, x: Tensor) -> Tensor:
        if self.packed != x.device.type:
            raise RuntimeError(f"QLinear packed for {self.packed}, called on {x.device.type}: pack() after loading")
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # the kernels take [M, K], contiguous
        if self.mode == "int4":
            mm = torch._weight_int4pack_mm_for_cpu if x.is_cpu else torch._weight_int4pack_mm
            y = mm(x2, self.weight, self.groupsize, self.scales)
        elif x.is_cpu:  # fast with bfloat16 activations; float32 takes a slow path in torch
            y = torch._weight_int8pack_mm(x2, self.weight, self.scales)
        else:  # torch.compile fuses the dequantization into the matmul (gpt-fast's way)
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scales
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def swap_linears(model: nn.Module, quant: dict):
    """Every nn.Linear of `model` -> an empty QLinear of the same shape (the embedding and the norms
    stay as they are: a lookup reads B rows of the table, so quantizing it would save no reads)."""
    for m in list(model.modules()):
        for name, c in m.named_children():
            if isinstance(c, nn.Linear):
                setattr(m, name, QLinear(c.in_features, c.out_features, c.bias is not None, **quant))


def pack_linears(model: nn.Module, dtype: torch.dtype):
    """After loading: every QLinear into its device's kernel layout, its scales in `dtype`."""
    for m in model.modules():
        if isinstance(m, QLinear):
            m.pack(dtype)


def unpack_int4(w: Tensor) -> Tensor:
    """int4 codes as stored, [N, K/2] uint8 -> [N, K] uint8 in [0, 16)."""
    return torch.stack((w >> 4, w & 15), -1).flatten(-2)
