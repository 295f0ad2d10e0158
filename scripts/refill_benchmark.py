"""Refill vs static batches over many prompts whose output lengths vary widely.

Static: the prompts in batches of B rows, each batch running until its slowest row ends.
Refill: one Decoder of B rows, a finished row taking the next prompt at once. Same prompts, same
per-prompt max_new_tokens (uniform in [--min_new, --max_new], seeded), greedy, one process; the
two must return the same tokens for every prompt. Throughput counts the prefills too.

  python scripts/refill_benchmark.py --prompt_file data/prompts_1024.jsonl --num 24 --batch_size 8 \\
      --gamma 0 4 --out benchmarks/cpu-refill
"""
import json
import platform
import random
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import cli  # noqa: E402
import generate as gen  # noqa: E402
from model import Transformer, UsageError  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def parse_args(argv):
    ap = cli.ArgParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="default: the built-in SmolLM2-135M")
    ap.add_argument("--prompt_file", required=True, help=".jsonl with a \"text\" field per line")
    ap.add_argument("--prompt_len", type=int, default=1024, help="tokens per prompt (longer ones are cut)")
    ap.add_argument("--num", type=int, default=24, help="prompts")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--min_new", type=int, default=16)
    ap.add_argument("--max_new", type=int, default=512)
    ap.add_argument("--gamma", type=cli.gamma_arg, nargs="+", default=[0, 4], help="0 = plain decoding")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--sink", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="directory for results.json and results.md")
    a = ap.parse_args(argv)
    if min(a.num, a.batch_size, a.min_new, a.prompt_len) < 1 or a.max_new < a.min_new:
        raise UsageError("need --num, --batch_size, --prompt_len, --min_new >= 1 and --max_new >= --min_new")
    return a


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    from convert_checkpoint import default_checkpoint

    ckpt = a.checkpoint or str(default_checkpoint())
    tok = load_tokenizer(ckpt)
    texts = [rec["text"] for _, rec in cli.read_prompt_file(a.prompt_file)]
    prompts = [ids[: a.prompt_len] for ids in map(tok.encode, texts) if len(ids) >= a.prompt_len][: a.num]
    if len(prompts) < a.num:
        raise UsageError(f"{a.prompt_file}: only {len(prompts)} prompts of >= {a.prompt_len} tokens, --num {a.num}")
    rng = random.Random(a.seed)
    limits = [rng.randint(a.min_new, a.max_new) for _ in prompts]
    model = Transformer.from_checkpoint(ckpt, "cpu", getattr(torch, a.dtype))
    B, rows = a.batch_size, []
    for g in a.gamma:
        kw = dict(gamma=g, budget=a.budget, sink=a.sink, compile=a.compile)
        t0, static, decode = time.perf_counter(), [], 0.0
        for i in range(0, len(prompts), B):  # static: each batch waits for its slowest row
            new, _, st = gen.generate(model, prompts[i: i + B], limits[i: i + B], **kw)
            static += new
            decode += st["decode_seconds"]
        t_static = time.perf_counter() - t0
        dec = gen.Decoder(model, B, max(len(p) + n for p, n in zip(prompts, limits)), max(limits), **kw)
        t0 = time.perf_counter()
        refill = {r.id: r.tokens for r in dec.run(gen.Request(p, n, i) for i, (p, n) in
                                                   enumerate(zip(prompts, limits)))}
        t_refill = time.perf_counter() - t0 - dec.compile_seconds
        n = sum(map(len, static))
        rows.append({"gamma": g, "tokens": n, "static_seconds": t_static, "refill_seconds": t_refill,
                     "static_tokens_per_second": n / t_static, "refill_tokens_per_second": n / t_refill,
                     "refill_vs_static": t_static / t_refill, "static_decode_seconds": decode,
                     "refill_decode_seconds": dec.decode_seconds,
                     "same_tokens": [refill[i] for i in range(len(prompts))] == static})
        print(f"gamma {g}: static {n / t_static:.1f} tok/s, refill {n / t_refill:.1f} tok/s "
              f"({t_static / t_refill:.2f}x), same tokens: {rows[-1]['same_tokens']}", file=sys.stderr)
    cmd = "python scripts/refill_benchmark.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    md = ["# refill vs static batches", "", f"- command: `{cmd}`",
          f"- machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, {a.dtype}; {len(prompts)} prompts of {a.prompt_len} tokens, B = {B}, "
          f"max_new_tokens {min(limits)}-{max(limits)} (mean {sum(limits) / len(limits):.0f}), greedy", "",
          "| gamma | tokens | static tok/s | refill tok/s | refill / static | same tokens |", "|---:|---:|---:|---:|---:|---|"]
    md += [f"| {r['gamma']} | {r['tokens']} | {r['static_tokens_per_second']:.1f} | {r['refill_tokens_per_second']:.1f}"
           f" | {r['refill_vs_static']:.2f} | {'yes' if r['same_tokens'] else '**NO**'} |" for r in rows]
    print("\n".join(md))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"command": cmd, "limits": limits, "rows": rows}, indent=1))
        (out / "results.md").write_text("\n".join(md) + "\n")
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    cli.run(main)
