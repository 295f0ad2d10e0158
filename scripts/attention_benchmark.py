"""FlexAttention against a dense mask + SDPA, compiled, at one long-context shape.

1. One layer's attention of a verify step (gamma + 1 queries per row) over the full cache, and the
   whole verify step (30 layers, acceptance), on random cache contents: medians of --repeats.
2. With --whole: whole runs on real prompts (one prefill, reused): decode tokens/s of plain
   decoding and self-speculation with each backend, the second of two runs each.
The dense-mask path is what generate.py ran before FlexAttention: a [B, 1, G*T, S] boolean mask per
layer, handed to scaled_dot_product_attention.

  python scripts/attention_benchmark.py --batch_size 32 --prompt_len 6144 --gamma 4 --whole
"""
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import cli  # noqa: E402
import generate as gen  # noqa: E402
import tp  # noqa: E402
from sampling import Sampling  # noqa: E402
from stats import cache_len  # noqa: E402
from model import Transformer, WindowCache, attend  # noqa: E402


def median_ms(fn, n, device):
    fn()
    ts = []
    for _ in range(n):
        gen.sync(device)
        t = time.perf_counter()
        fn()
        gen.sync(device)
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def main(argv=None):
    ap = cli.ArgParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="default: the built-in SmolLM2-135M")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--prompt_len", type=int, default=6144)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--whole", action="store_true", help="also whole runs on data/prompts_<n>.jsonl, n >= prompt_len")
    a = ap.parse_args(argv)
    from convert_checkpoint import default_checkpoint

    ckpt = a.checkpoint or str(default_checkpoint())
    dev = torch.device(a.device)
    dtype = getattr(torch, a.dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    model = Transformer.from_checkpoint(ckpt, dev, dtype)
    B, L, g = a.batch_size, a.prompt_len, a.gamma
    S = cache_len(L + a.max_new_tokens, g)
    torch.manual_seed(0)
    model.setup_caches(B, S)
    for b in model.layers:
        b.attention.kv_cache.k.normal_()
        b.attention.kv_cache.v.normal_()
    model.setup_draft_cache(WindowCache, sink=16, window=a.budget - 16)
    model.fill_draft_cache(torch.full((B,), L, device=dev))
    pos = L + a.max_new_tokens // 2 + torch.arange(g + 1, device=dev).expand(B, -1)  # mid-generation
    seq = torch.randint(0, model.args.vocab_size, (B, g + 1), device=dev)
    a_ = model.layers[0].attention
    q = torch.randn(B, a_.n_heads, g + 1, a_.head_dim, device=dev, dtype=dtype)
    kc = a_.kv_cache
    att = torch.compile(attend, fullgraph=True, dynamic=False)
    ver = torch.compile(gen.verify_step, fullgraph=True, dynamic=False)
    vocab, s = tp.Vocab(model.args.vocab_size), Sampling()
    print(f"B={B}, L={L} (S={S} slots), gamma={g} ({g + 1} queries per row), {dtype}, {dev}, compiled; "
          f"medians of {a.repeats}")
    print("| attention | one layer's attention ms | verify step ms |\n|---|---:|---:|")
    with torch.no_grad():
        for flex in (False, True):
            t_att = median_ms(lambda: att(q, kc.k, kc.v, pos, None, flex), a.repeats, dev)
            t_ver = median_ms(lambda: ver(model, vocab, seq, pos, seq[:, 1:], None, True, flex, s), a.repeats, dev)
            print(f"| {'flex (block mask)' if flex else 'dense mask + SDPA'} | {t_att:.1f} | {t_ver:.1f} |", flush=True)
    if not a.whole:
        return 0
    from tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt)
    n = min(n for n in (1024, 2048, 4096, 6144, 7168, 8192) if n >= L)
    texts = [rec["text"] for _, rec in cli.read_prompt_file(ROOT / "data" / f"prompts_{n}.jsonl")]
    prompts = [ids[:L] for ids in map(tok.encode, texts) if len(ids) >= L][:B]
    kw = dict(budget=a.budget, sink=16, compile=True)
    model.free_caches()
    _, _, st = gen.generate(model, prompts, a.max_new_tokens, gamma=g, attention="flex", **kw)  # the prefill
    print(f"\nwhole runs, {len(prompts)} prompts of {L} tokens, {a.max_new_tokens} new tokens each "
          f"(prefill {st['prefill_seconds']:.0f} s, once)")
    print("| attention | plain decoding tok/s | self-speculation tok/s | speedup |\n|---|---:|---:|---:|")
    for att_ in ("sdpa", "flex"):
        tps = {}
        for name, gamma in (("ar", 0), ("spec", g)) * 2:
            tps[name] = gen.generate(model, prompts, a.max_new_tokens, gamma=gamma, attention=att_, prefilled=True,
                                     **kw)[2]["tokens_per_second"]
        print(f"| {att_} | {tps['ar']:.1f} | {tps['spec']:.1f} | {tps['spec'] / tps['ar']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
