"""What a run costs: the memory plan checked before anything is allocated, and the counters, timers
and derived statistics of a run (kept as raw counts so data-parallel groups can be merged)."""
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from model import BLOCK, ModelArgs, UsageError

PREFILL_TOKENS = 8192  # tokens per prefill forward across the batch: bounds the activations
PREFILL_MASK = 1 << 26  # elements of a prefill chunk's causal mask (G * chunk * S, shared by the rows)


def cache_len(max_len: int, gmax: int) -> int:
    """Slots per row of the full cache: a verify writes up to gmax slots past the last committed
    position; rounding up to a block lets runs of similar lengths share compiled graphs."""
    return -(-(max_len + gmax) // BLOCK) * BLOCK


def prefill_chunk(B: int, S: int, G: int) -> int:
    """Tokens per row per prefill forward. Prefill attention builds no score tensor (model.attend:
    SDPA's fused kernels with one causal mask for all rows), so a chunk is bounded by the batch's
    activations (PREFILL_TOKENS) and the mask of its G * chunk folded query rows over S slots."""
    return max(1, min(PREFILL_TOKENS // B, PREFILL_MASK // (G * S)))


def param_bytes(model, read=False) -> int:
    """Bytes of the model's weights, quantized codes and scales as they are; read: only what every
    forward reads, so not an embedding table of its own (a forward looks up B of its rows)."""
    ps, emb = {id(p): p for p in model.parameters()}, model.tok_embeddings.weight
    if read and sum(p is emb for _, p in model.named_parameters(remove_duplicate=False)) == 1:  # not the output too
        ps.pop(id(emb))
    return sum(p.numel() * p.element_size() for p in ps.values())


# ---------------------------------------------------------------------------------------- memory
def weight_bytes(cfg: ModelArgs, elem: int, tp_size: int = 1) -> int:
    """What loading the model's weights takes (see model.QLinear: codes + scales in the activations' dtype)."""
    q = cfg.quant or {}

    def linear(n_in, n_out):
        if q.get("mode") == "int8":
            return n_out * n_in + n_out * elem
        if q.get("mode") == "int4":
            return n_out * n_in // 2 + n_out * (n_in // q["groupsize"]) * 2 * elem
        return n_out * n_in * elem

    D, I = cfg.dim, cfg.intermediate_size
    per_layer = linear(D, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim) + linear(cfg.n_heads * cfg.head_dim, D) \
        + linear(D, 2 * I) + linear(I, D)
    output = 0 if cfg.tie_embeddings and not q else linear(D, cfg.vocab_size)
    return (cfg.n_layers * per_layer + cfg.vocab_size * D * elem + output) // tp_size


def memory_plan(cfg: ModelArgs, B: int, S: int, elem: int, *, tp_size: int = 1, gmax: int = 0,
                window: int = 0, draft_cfg: ModelArgs | None = None, weights: int | None = None) -> dict:
    """Bytes one rank needs: weights, the full KV cache, the draft cache, and the largest workspace
    (a prefill chunk's activations and causal mask, or a verify step's fp32 logits and
    probabilities). The draft cache: a window of `window` slots per row (of draft_cfg's model, or of
    the target's), else draft_cfg's full cache. weights: the loaded models' bytes (default: from the
    configs)."""
    kvh = -(-cfg.n_kv_heads // tp_size)  # the busiest rank's whole KV-head groups
    dcfg = draft_cfg or cfg
    if weights is None:
        weights = weight_bytes(cfg, elem, tp_size) + (weight_bytes(draft_cfg, elem, tp_size) if draft_cfg else 0)
    draft_slots = window or (S if draft_cfg is not None else 0)
    G = cfg.n_heads // cfg.n_kv_heads
    chunk = prefill_chunk(B, S, G)
    prefill = B * chunk * (6 * cfg.dim + 3 * cfg.intermediate_size) * elem + G * chunk * S * (1 + elem)  # + the mask
    vocab = -(-cfg.vocab_size // tp_size)
    verify = 4 * B * (gmax + 1) * vocab * 4  # logits, probabilities, random numbers, residual
    return {"weights": weights, "kv_cache": B * S * cfg.kv_bytes_per_token(elem, kvh),
            "draft_cache": B * draft_slots * dcfg.kv_bytes_per_token(elem, -(-dcfg.n_kv_heads // tp_size)),
            "workspace": max(prefill, verify)}


def free_memory(device: torch.device) -> int:
    """Bytes a new allocation may take: free GPU memory plus what torch's allocator holds unused,
    or the kernel's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(plan, B: int, device: torch.device, resident: int = 0):
    """Refuse, in one line, a batch whose plan (B -> memory_plan) does not fit: `resident` bytes
    of it are allocated already (loaded weights, caches that will be reused or freed). Keeps 5%
    for what no plan counts."""
    have = 0.95 * (free_memory(device) + resident)
    need = plan(B)
    if sum(need.values()) <= have:
        return
    lo, hi = 0, B  # the largest batch that fits: plan(lo) fits, plan(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if sum(plan(mid).values()) <= have else (lo, mid)
    gb = lambda n: f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"
    raise UsageError(f"batch {B} needs {gb(sum(need.values()))} per rank (" + ", ".join(
        f"{k.replace('_', ' ')} {gb(v)}" for k, v in need.items() if v) + f") but {device.type} has {gb(have)} "
        f"free: " + (f"the largest batch that fits is {lo}" if lo else "not even one row fits"))


# ---------------------------------------------------------------------------------------- counts
@dataclass
class Counters:
    """Raw counts of a run, device tensors while it runs (adding to them needs no host sync)."""
    generated: Tensor  # tokens committed
    row_steps: Tensor  # live rows summed over verify steps
    drafts_proposed: Tensor  # drafts proposed to live rows
    kv_read: Tensor  # K/V slots read by the target's forwards
    draft_kv_read: Tensor  # ... and by the drafter's
    drafts_tried: Tensor  # [gmax] draft i was judged (all before it passed)
    drafts_accepted: Tensor  # [gmax] draft i was accepted

    @classmethod
    def zeros(cls, gmax: int, device) -> "Counters":
        per_draft = ("drafts_tried", "drafts_accepted")
        return cls(**{f.name: torch.zeros(gmax if f.name in per_draft else (), dtype=torch.long, device=device)
                      for f in fields(cls)})


class Timer:
    """Phase times of every step without extra host syncs: perf_counter on the CPU (where a step's
    ops run synchronously); on CUDA one event per phase boundary, two sets used in turn, so a
    step's events are read after the next step's one sync, when they are complete."""
    PHASES = ("draft", "verify", "host")  # draft forwards; verify forward + acceptance; commit + counts

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.total = dict.fromkeys(self.PHASES, 0.0)
        n = len(self.PHASES) + 1
        self.sets = [[torch.cuda.Event(enable_timing=True) for _ in range(n)] for _ in range(2)] if self.cuda \
            else [[0.0] * n]
        self.tags, self.cur, self.pending = [None] * len(self.sets), 0, None

    def mark(self, i: int):
        if self.cuda:
            self.sets[self.cur][i].record()
        else:
            self.sets[0][i] = time.perf_counter()

    def end_step(self, tag=None):
        """At the end of a step (after its sync): -> (tag, {phase: seconds}) of the latest step
        whose times are known (this one on the CPU, the one before on CUDA), or None."""
        self.tags[self.cur] = tag
        if not self.cuda:
            return tag, self._add(0)
        done, self.pending, self.cur = self.pending, self.cur, self.cur ^ 1
        return None if done is None else (self.tags[done], self._add(done))

    def flush(self):
        """The last step's times on CUDA (one sync, at the end of a run); -> as end_step."""
        if not self.cuda or self.pending is None:
            return None
        done, self.pending = self.pending, None
        self.sets[done][-1].synchronize()
        return self.tags[done], self._add(done)

    def _add(self, i: int) -> dict:
        m = self.sets[i]
        t = [(m[j].elapsed_time(m[j + 1]) / 1e3) if self.cuda else m[j + 1] - m[j] for j in range(len(m) - 1)]
        for name, x in zip(self.PHASES, t):
            self.total[name] += x
        return dict(zip(self.PHASES, t))


def summarize(s: dict) -> dict:
    """Derived stats from the raw counts (kept separate so data-parallel groups can be merged)."""
    gen, tried, passed = s["generated_tokens"], s["drafts_tried"], s["drafts_accepted"]
    s |= {
        "seconds": s["prefill_seconds"] + s["decode_seconds"],
        "tokens_per_second": gen / max(s["decode_seconds"], 1e-9),  # decode throughput
        "end_to_end_tokens_per_second": gen / max(s["prefill_seconds"] + s["decode_seconds"], 1e-9),
        "bandwidth_gb_s": s["bytes_read"] / max(s["decode_seconds"], 1e-9) / 1e9,
        "mean_accepted": gen / max(s["row_steps"], 1),  # tokens committed per row per verify step
    }
    if tried:
        s["acceptance_rate"] = sum(passed) / max(s["drafts_proposed"], 1)
        # conditional: P(draft i accepted | the drafts before it were)
        s["acceptance_by_position"] = [p / max(t, 1) for p, t in zip(passed, tried)]
    return s


def merge_stats(parts: list[dict]) -> dict:
    """Stats of data-parallel groups that ran side by side: counts add up, times overlap."""
    if len(parts) == 1:
        return summarize(parts[0])
    m = {k: max(p[k] for p in parts) for k in ("prefill_seconds", "decode_seconds", "draft_seconds",
                                                "verify_seconds", "host_seconds", "verify_steps", "draft_forwards",
                                                "compiled_graphs", "compile_seconds")}
    for k in ("prompts", "generated_tokens", "row_steps", "drafts_proposed"):
        m[k] = sum(p[k] for p in parts)
    for k in ("drafts_tried", "drafts_accepted"):
        m[k] = [sum(x) for x in zip(*(p[k] for p in parts))]
    m["bytes_read"] = sum(p["bytes_read"] for p in parts) / len(parts)  # per rank, as in each part
    m["attention"] = parts[0]["attention"]
    if "gamma_used" in parts[0]:
        used = sorted({g for p in parts for g in p["gamma_used"]})
        m["gamma_used"] = {g: sum(p["gamma_used"].get(g, 0) for p in parts) for g in used}
    return summarize(m)


def stats_line(s: dict, B: int) -> str:
    line = (f"stats: B={B} {s['generated_tokens']} tokens in {s['seconds']:.2f} s | prefill "
            f"{s['prefill_seconds']:.2f} s | decode {s['decode_seconds']:.2f} s, "
            f"{s['tokens_per_second']:.1f} tok/s, {s['bandwidth_gb_s']:.1f} GB/s | end to end "
            f"{s['end_to_end_tokens_per_second']:.1f} tok/s")
    if "acceptance_rate" in s:
        by_pos = " ".join(f"{x:.2f}" for x in s["acceptance_by_position"])
        line += (f" | {s['verify_steps']} verify steps, {s['mean_accepted']:.2f} tokens/step, "
                 f"acceptance {s['acceptance_rate']:.2f} [{by_pos}] | draft {s['draft_seconds']:.2f} s, "
                 f"verify {s['verify_seconds']:.2f} s")
    if "gamma_used" in s:
        line += " | gamma used " + " ".join(f"{g}:{n}" for g, n in s["gamma_used"].items() if n)
    line += f" | attention {s['attention']}"
    if s["compiled_graphs"]:
        line += f" | compiled {s['compiled_graphs']} graphs in {s['compile_seconds']:.1f} s"
    return line
