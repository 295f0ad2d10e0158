"""Quantized checkpoints against their full-precision model, on the project's real-text prompts:
  throughput: plain decoding tok/s per variant and batch size, the variants interleaved in every
              repeat (medians; ratios of runs moments apart);
  quality:    where greedy decoding first leaves the float32 model's, and the mean log-likelihood
              of held-out text (prompt-file lines the other measurements do not use);
  sizes:      model.safetensors on disk.
Variants: the checkpoint in float32 and in bfloat16, each --quantized checkpoint with the
--activations dtypes (bfloat16 by default: torch's CPU kernels for int8 / int4 weights take a slow
path with float32 activations, slowest at prefill; see BENCHMARKS). Writes results.json and
results.md to --out.

    python scripts/quant_benchmark.py --quantized checkpoints/smollm2-135m-int8 checkpoints/smollm2-135m-int4
"""
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # runnable from any cwd

import torch

import cli
from cli import ArgParser, read_checkpoint, read_prompt_file
from generate import generate
from model import Transformer, UsageError
from speedup_model import cpu_name


def parse_args(argv):
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    add = ap.add_argument
    add("--checkpoint", help="the full-precision checkpoint (default: the built-in SmolLM2-135M)")
    add("--quantized", nargs="+", required=True, help="quantized checkpoints of it (quantize.py)")
    add("--prompt_file", default=str(ROOT / "data" / "prompts_1024.jsonl"), help="real text, one prompt a line")
    add("--activations", nargs="+", choices=["bfloat16", "float32"], default=["bfloat16"],
        help="activation dtypes of the quantized variants (default: bfloat16)")
    add("--batch_size", type=int, nargs="+", default=[1, 8])
    add("--prompt_len", type=int, default=1024)
    add("--max_new_tokens", type=int, default=128)
    add("--repeats", type=int, default=3)
    add("--quality_prompts", type=int, default=16, help="prompts for the greedy comparison (from the same file)")
    add("--quality_len", type=int, default=256, help="their length in tokens")
    add("--heldout", type=int, default=8, help="held-out lines for the log-likelihood (the file's last ones)")
    add("--out", default=str(ROOT / "benchmarks" / "cpu-quantized"))
    return ap.parse_args(argv)


def shown(path) -> str:
    """A path as the results print it: relative to the repository when inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else path)


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.no_grad()
def log_likelihood(model, docs: list[list[int]], chunk=256) -> float:
    """Mean log-probability (nats) of every token of `docs` given the ones before it."""
    total, n = 0.0, 0
    for d in docs:
        model.setup_caches(1, len(d))
        x = torch.tensor([d])
        for s in range(0, len(d) - 1, chunk):
            e = min(s + chunk, len(d) - 1)
            logp = model(x[:, s:e], torch.arange(s, e)[None], kv_len=e)[0].float().log_softmax(-1)
            total += logp.gather(-1, x[0, s + 1:e + 1, None]).sum().item()
            n += e - s
    return total / n


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.checkpoint is None:
        from convert_checkpoint import default_checkpoint

        a.checkpoint = str(default_checkpoint())
    cfg, tok = read_checkpoint(a.checkpoint)
    for q in a.quantized:
        if not read_checkpoint(q)[0].quant:
            raise UsageError(f"--quantized {q}: not a quantized checkpoint (config.json has no quant)")
    texts = [tok.encode(rec["text"]) for _, rec in read_prompt_file(a.prompt_file)]
    need = max(max(a.batch_size), a.quality_prompts) + a.heldout
    if len(texts) < need or min(map(len, texts)) < a.prompt_len:
        raise UsageError(f"{a.prompt_file}: need {need} lines of >= {a.prompt_len} tokens")
    heldout = texts[-a.heldout:]
    variants = {"fp32": (a.checkpoint, torch.float32), "bf16": (a.checkpoint, torch.bfloat16)}
    for q in a.quantized:
        mode = read_checkpoint(q)[0].quant["mode"]
        for dt in a.activations:
            variants[mode + ("-fp32" if dt == "float32" else "")] = (q, getattr(torch, dt))
    models = {v: Transformer.from_checkpoint(p, "cpu", dt) for v, (p, dt) in variants.items()}
    res = {"command": "python scripts/quant_benchmark.py " + shlex.join(argv), "machine": {
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "variants": {v: {"checkpoint": shown(p), "dtype": str(dt).removeprefix("torch."), "quant": m.args.quant,
                         "bytes_on_disk": (Path(p) / "model.safetensors").stat().st_size}
                     for (v, (p, dt)), m in zip(variants.items(), models.values())},
        "throughput": [], "quality": {}}

    for B in a.batch_size:  # one prefill per model, then every repeat runs each variant in turn
        prompts = [t[: a.prompt_len] for t in texts[:B]]
        runs = {v: [] for v in models}
        for v, m in models.items():
            generate(m, prompts, a.max_new_tokens)  # prefill + warm-up
        for _ in range(a.repeats):
            for v, m in models.items():
                runs[v].append(generate(m, prompts, a.max_new_tokens, prefilled=True).stats["tokens_per_second"])
        for v in models:
            res["throughput"].append({
                "batch_size": B, "variant": v, "tokens_per_second": statistics.median(runs[v]), "repeats": runs[v],
                "vs_bf16": statistics.median(x / y for x, y in zip(runs[v], runs["bf16"])),
                "vs_fp32": statistics.median(x / y for x, y in zip(runs[v], runs["fp32"]))})
        for m in models.values():
            m.free_caches()
        print(f"B={B}: " + ", ".join(f"{r['variant']} {r['tokens_per_second']:.1f}" for r in res["throughput"][-len(models):]),
              file=sys.stderr)

    prompts = [t[: a.quality_len] for t in texts[: a.quality_prompts]]
    greedy = {v: generate(m, prompts, a.max_new_tokens).tokens for v, m in models.items()}
    for v, m in models.items():
        t0 = time.perf_counter()
        diverge = [first_difference(x, y) for x, y in zip(greedy[v], greedy["fp32"])]
        res["quality"][v] = {"first_difference": diverge, "median_first_difference": statistics.median(diverge),
                             "identical_rows": sum(d == a.max_new_tokens for d in diverge),
                             "heldout_log_likelihood": log_likelihood(m, heldout)}
        print(f"{v}: quality in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "results.md").write_text(markdown(res, a))
    print((out / "results.md").read_text())


def markdown(res, a) -> str:
    m = res["machine"]
    lines = [f"- command: `{res['command']}`", f"- machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}",
             f"- throughput: L = {a.prompt_len}, {a.max_new_tokens} new tokens, plain decoding (greedy), eager, "
             f"{a.repeats} repeats (medians, variants interleaved)", "",
             "| B | variant | weights | activations | tok/s | vs bf16 | vs fp32 |", "|---:|---|---|---|---:|---:|---:|"]
    for r in res["throughput"]:
        v = res["variants"][r["variant"]]
        lines.append(f"| {r['batch_size']} | {r['variant']} | {(v['quant'] or {}).get('mode', 'float')} | {v['dtype']} | "
                     f"{r['tokens_per_second']:.1f} | {r['vs_bf16']:.2f} | {r['vs_fp32']:.2f} |")
    lines += ["", f"Quality: {a.quality_prompts} prompts of {a.quality_len} tokens, {a.max_new_tokens} greedy tokens "
              f"against the fp32 model's; log-likelihood over {a.heldout} held-out lines of {shown(a.prompt_file)}.", "",
              "| variant | first token that differs (median) | rows identical | held-out log-likelihood (nats/token) "
              "| perplexity |", "|---|---:|---:|---:|---:|"]
    for name, q in res["quality"].items():
        lines.append(f"| {name} | {q['median_first_difference']} | {q['identical_rows']}/{a.quality_prompts} | "
                     f"{q['heldout_log_likelihood']:.4f} | {math.exp(-q['heldout_log_likelihood']):.2f} |")
    lines += ["", "| checkpoint | model.safetensors |", "|---|---:|"]
    for path, size in {v["checkpoint"]: v["bytes_on_disk"] for v in res["variants"].values()}.items():
        lines.append(f"| `{path}` | {size / 1e6:.0f} MB |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    cli.run(main)
