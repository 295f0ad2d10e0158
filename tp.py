"""Tensor parallelism over torchrun's world.

RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun, on one node or many) define the world; --tp N
splits it into WORLD_SIZE / N data-parallel groups of N consecutive ranks, each serving its share
of the batch rows. Inside a group every rank owns whole GQA groups (KV heads split as evenly as
they go, so 3 KV heads over 2 ranks is 2 + 1), a slice of the MLP and a slice of the vocabulary;
the partial sums are all-reduced explicitly over the full [B, T, dim] activations with functional
collectives, so a compiled step stays one graph."""
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
import torch.nn as nn
import torch.nn.functional as F

from model import ModelArgs, QLinear, Transformer, UsageError, pack_linears


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    tp: int = 1
    group: object = None  # this rank's tensor-parallel process group

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def dp_size(self) -> int:
        return self.size // self.tp


def world_from_env(tp: int) -> World:
    """Read torchrun's environment and check --tp against it (before any process group exists,
    so a bad value fails on every rank alike instead of leaving some waiting)."""
    size = int(os.environ.get("WORLD_SIZE", 1))
    w = World(int(os.environ.get("RANK", 0)), size, int(os.environ.get("LOCAL_RANK", 0)), tp)
    if tp < 1 or size % tp:
        raise UsageError(f"--tp {tp} does not divide the world size {size} (torchrun's WORLD_SIZE)")
    return w


def check_split(args: ModelArgs, tp: int):
    if tp > args.n_kv_heads:
        raise UsageError(f"--tp {tp} is more ranks than the model's {args.n_kv_heads} KV heads: each rank "
                         f"must own at least one whole GQA group (use --tp <= {args.n_kv_heads})")
    q = args.quant or {}
    if q.get("mode") != "int4":  # int8 cuts anywhere: its scales are per output row
        return
    g, G, D = q["groupsize"], args.n_heads // args.n_kv_heads, args.head_dim
    for r in range(tp):  # what load() will cut, for every rank (so all of them fail alike)
        (k0, k1), (i0, i1) = split(args.n_kv_heads, tp, r), split(args.intermediate_size, tp, r)
        for name, c in (("attention.wo", k0 * G * D), ("feed_forward.w2", i0)):
            if c % g:
                raise UsageError(f"--tp {tp} cuts the inputs of {name} at {c}, inside an int4 group of {g}: "
                                 f"quantize with a group size that divides {c}, or use another --tp")
        rows = (k1 - k0) * (G + 2) * D, 2 * (i1 - i0), -(-args.vocab_size // tp)
        if any(n % 16 for n in rows):
            raise UsageError(f"--tp {tp} leaves rank {r} {rows} rows of wqkv, w13 and the output layer: int4 "
                             f"kernels need multiples of 16; use another --tp")


def init(w: World, device: torch.device):
    if w.size == 1:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # (main may run more than once in a process)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # every rank must create every group, in the same order
    for g in range(w.dp_size):
        group = dist.new_group(list(range(g * w.tp, (g + 1) * w.tp)))
        if g == w.dp_rank:
            w.group = group


def agree(w: World, fn):
    """fn() on every rank (it may look at w.rank) -> rank 0's result on every rank; a UsageError
    on any rank is raised on all (the lowest rank's), so no rank is left waiting for the others."""
    try:
        res, err = fn(), None
    except UsageError as e:
        res, err = None, str(e)
    if w.size > 1:
        outs = [None] * w.size
        dist.all_gather_object(outs, (res, err))
        res, err = outs[0][0], next((e for _, e in outs if e), None)
    if err:
        raise UsageError(err)
    return res


def size(model) -> int:
    """The tensor-parallel degree a (loaded) model is sharded over."""
    g = getattr(model, "tp_group", None)
    return 1 if g is None else dist.get_world_size(g)


def split(n: int, parts: int, i: int) -> tuple[int, int]:
    """[start, end) of part i of n items over `parts` parts, the first n % parts one larger."""
    q, r = divmod(n, parts)
    start = i * q + min(i, r)
    return start, start + q + (i < r)


# --- sharded modules -----------------------------------------------------------------------------
class RowParallel(nn.Module):
    """A linear layer of this rank's input columns (x sharded on its last dim), summed over the group."""

    def __init__(self, lin: nn.Module, group):
        super().__init__()
        self.lin, self.group = lin, group

    def forward(self, x):
        return fc.all_reduce(self.lin(x), "sum", self.group)


class VocabParallelEmbedding(nn.Module):
    """Rows [v0, v0 + Vp) of the table per rank; ids outside give zeros, summed over the group."""

    def __init__(self, weight, v0, group):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.v0, self.group = v0, group

    def forward(self, idx):
        local = idx - self.v0
        ok = (local >= 0) & (local < self.weight.shape[0])
        e = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * ok[..., None]
        return fc.all_reduce(e, "sum", self.group)


class VocabParallelOutput(nn.Module):
    """Logits of this rank's vocabulary slice [..., Vp] (padding columns past the vocabulary: -inf),
    from a linear layer of those rows. They are never gathered: sampling reduces over the slices
    with `Vocab`."""

    def __init__(self, lin: nn.Module, vocab: "Vocab"):
        super().__init__()
        self.lin = lin
        self.pad = vocab.start + vocab.local - vocab.n  # > 0 on the last rank only

    def forward(self, x):
        y = self.lin(x)
        return y if self.pad <= 0 else y.index_fill(-1, torch.arange(y.shape[-1] - self.pad, y.shape[-1],
                                                                     device=y.device), -float("inf"))


_all_gather = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor  # renamed after 2.11


class Vocab:
    """The vocabulary dim of logits, which tensor parallelism splits between the ranks of a group:
    this rank holds `local` columns, ids [start, start + local) of `n`. The reductions sampling
    needs are collectives of [B, T] (or [B, T, k] for top-k/top-p) tensors, never of the
    vocabulary. One process: start 0, all n columns, no communication."""

    def __init__(self, n, start=0, local=None, group=None):
        self.n, self.start, self.local, self.group = n, start, local or n, group

    def _stack(self, x):  # [...] from every rank -> [tp, ...]
        return _all_gather(x[None].contiguous(), 0, self.group)

    def max(self, x):
        m = x.amax(-1)
        return m if self.group is None else fc.all_reduce(m, "max", self.group)

    def sum(self, x):
        s = x.sum(-1)
        return s if self.group is None else fc.all_reduce(s, "sum", self.group)

    def argmax(self, x):
        """Global ids of the largest entries; ties go to the lowest id, as torch.argmax does."""
        i = x.argmax(-1)
        if self.group is None:
            return i
        m, ids = self._stack(x.gather(-1, i[..., None])[..., 0]), self._stack(i + self.start)
        return ids.gather(0, m.argmax(0, keepdim=True))[0]

    def pick(self, x, ids):
        """x [..., V] at global ids [...] -> [...] (the rank that holds an id gives its value)."""
        local = ids - self.start
        ok = (local >= 0) & (local < self.local)
        v = torch.where(ok, x.gather(-1, local.clamp(0, self.local - 1)[..., None])[..., 0], 0)
        return v if self.group is None else fc.all_reduce(v, "sum", self.group)

    def topk(self, x, k):
        """The k largest values over the whole vocabulary, descending [..., k]."""
        v = x.topk(min(k, self.local), -1).values
        if self.group is None:
            return v
        v = self._stack(v)  # [tp, ..., k']
        return v.movedim(0, -2).flatten(-2).topk(k, -1).values

    def gather(self, x):
        """The whole vocabulary [..., n] (top_p's rare full sort)."""
        if self.group is None:
            return x
        return self._stack(x).movedim(0, -2).flatten(-2)[..., : self.n]

    def rand(self, x):
        """Uniform [0, 1) numbers like x: the whole vocabulary's are drawn (the same on every rank
        of a group) and this rank's slice kept, so a seed gives the same token on any TP degree."""
        u = torch.rand(*x.shape[:-1], self.n, device=x.device)[..., self.start: self.start + self.local]
        return u if u.shape[-1] == self.local else torch.cat((u, torch.full_like(u[..., :1], 0.5).expand(
            *u.shape[:-1], self.local - u.shape[-1])), -1)


def linear(weight, bias=None) -> nn.Linear:
    m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    m.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)  # tied: shared
    if bias is not None:
        m.bias = nn.Parameter(bias, requires_grad=False)
    return m


def load(path, w: World, device, dtype=None) -> Transformer:
    """This rank's shard of a checkpoint, reading only its slices of model.safetensors. Quantized
    layers are cut like their weights: codes and scales by the same output rows, or by the same
    input columns (int4's groups must not be cut; int8's per-row scales are whole on every rank)."""
    from safetensors import safe_open

    path = Path(path)
    args = ModelArgs.load(path / "config.json")
    check_split(args, w.tp)
    H, Hkv, D, I, V = args.n_heads, args.n_kv_heads, args.head_dim, args.intermediate_size, args.vocab_size
    G, q = H // Hkv, args.quant
    k0, k1 = split(Hkv, w.tp, w.tp_rank)
    i0, i1 = split(I, w.tp, w.tp_rank)
    Vp = -(-V // w.tp)  # equal (zero-padded) vocabulary slices: all_gather wants equal sizes
    v0 = w.tp_rank * Vp
    with torch.device("meta"):
        model = Transformer(args)

    with safe_open(path / "model.safetensors", framework="pt", device=str(device)) as f:
        def get(name, rows=None, cols=None, n_in=None, pad=None):
            """Tensor `name`, whole, or its row ranges `rows` (concatenated, zero rows up to `pad`),
            or input columns cols = [c0, c1) of a linear layer of n_in inputs: a 2-D+ tensor's dim 1
            is in proportion to them (int4 codes: 2 a byte; int4 scales: 1 a group), a 1-D one is per
            output row (int8 scales, biases) and kept whole."""
            t = f.get_slice(name)
            if rows:
                t = torch.cat([t[a:b] for a, b in rows])
                t = torch.cat((t, t.new_zeros(pad - t.shape[0], *t.shape[1:]))) if pad else t
            elif cols and len(t.get_shape()) > 1:  # (check_split keeps int4 groups whole)
                n = t.get_shape()[1]
                t = t[:, cols[0] * n // n_in: cols[1] * n // n_in]
            else:
                t = t[:]
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        def lin(prefix, n_in, rows=None, cols=None, bias=False, pad=None) -> nn.Module:
            t = {k: get(prefix + k, rows, cols, n_in, pad) for k in ("weight",) + ("scales",) * bool(q) + ("bias",) * bias}
            if not q:
                return linear(t["weight"], t.get("bias"))
            with torch.device("meta"):
                m = QLinear(cols[1] - cols[0] if cols else n_in, t["weight"].shape[0], bias, **q)
            for k, v in t.items():
                setattr(m, k, nn.Parameter(v, requires_grad=False))
            return m

        emb = get("tok_embeddings.weight", [(v0, min(v0 + Vp, V))], pad=Vp)
        model.tok_embeddings = VocabParallelEmbedding(emb, v0, w.group)
        out = linear(model.tok_embeddings.weight) if args.tie_embeddings and not q else \
            lin("output.", args.dim, [(v0, min(v0 + Vp, V))], pad=Vp)
        model.vocab = Vocab(V, v0, Vp, w.group)
        model.output = VocabParallelOutput(out, model.vocab)
        model.norm.weight = nn.Parameter(get("norm.weight"), requires_grad=False)
        # wqkv rows: q heads, then k heads, then v heads; this rank's q heads serve its KV heads
        qkv = [(k0 * G * D, k1 * G * D), (H * D + k0 * D, H * D + k1 * D),
               ((H + Hkv) * D + k0 * D, (H + Hkv) * D + k1 * D)]
        for i, b in enumerate(model.layers):
            p = f"layers.{i}."
            a = b.attention
            a.wqkv = lin(p + "attention.wqkv.", args.dim, qkv, bias=args.attn_bias)
            a.wo = RowParallel(lin(p + "attention.wo.", H * D, cols=(k0 * G * D, k1 * G * D)), w.group)
            a.n_heads, a.n_kv_heads = (k1 - k0) * G, k1 - k0
            b.feed_forward.w13 = lin(p + "feed_forward.w13.", args.dim, [(i0, i1), (I + i0, I + i1)])
            b.feed_forward.w2 = RowParallel(lin(p + "feed_forward.w2.", I, cols=(i0, i1)), w.group)
            for n in ("attention_norm", "ffn_norm"):
                getattr(b, n).weight = nn.Parameter(get(p + n + ".weight"), requires_grad=False)
    pack_linears(model, model.tok_embeddings.weight.dtype)
    model.tp_group = w.group
    return model.eval()


def gather(obj, w: World) -> list | None:
    """One object per data-parallel group (from its first rank), in group order, on rank 0."""
    if w.size == 1:
        return [obj]
    objs = [None] * w.size
    dist.all_gather_object(objs, obj)
    return objs[:: w.tp] if w.rank == 0 else None
