"""Per-step costs of a LLaMA-shaped model: decode, verify of gamma = 1..6 drafts, and draft steps on
windows of 256 and 512 slots, at each batch x context, in ms and in decode steps, with the analytic
model's speedup at the paper's acceptance. The costs depend on the architecture and the shapes, not
on the weights: the model has random weights of the real shape (no download) and a random cache.
The steps are generate.py's own (verify_step, draft_step), compiled as `generate.py --compile` runs
them (FlexAttention; CUDA graphs on a GPU), every graph before the clock.

  python scripts/step_costs.py --arch llama-3.1-8b --batch_size 16 64 --prompt_len 8192 32768 --json out.json
  python scripts/step_costs.py --arch llama-3.1-8b --layers 2 --batch_size 2 --prompt_len 512 --device cpu --json out.json

--layers N (>= 2) builds only N of the architecture's layers (compiling is then quicker) and
extrapolates to the full depth from one more measurement with a single layer: t = t_1 + (t_N - t_1)
* (n_layers - 1) / (N - 1), as a step's layers cost alike. --json PATH (a contract): {"rows": [{"batch_size", "prompt_len",
"decode_ms", "verify_ms": {"1": .., "6": ..}, "draft_ms": {"256": .., "512": ..}, ...}], ...}, the
full-depth figures where --layers shrank the model ("noisy": [keys] where N layers timed no slower than
one, no "predicted" then). A shape that does not fit (the memory plan) is
a row with "skipped" and its reason.
"""
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # runnable from any cwd

import torch  # noqa: E402

import cli  # noqa: E402
import generate as gen  # noqa: E402
import stats  # noqa: E402
import tp  # noqa: E402
from model import Transformer, UsageError, WindowCache  # noqa: E402
from sampling import Sampling, expected_tokens  # noqa: E402
from speedup_model import MODELS, pg19_alpha  # noqa: E402

GAMMAS, BUDGETS, SINK = (1, 2, 3, 4, 5, 6), (256, 512), 16


def parse_args(argv):
    ap = cli.ArgParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="llama-3.1-8b", help=f"one of {', '.join(MODELS)}")
    ap.add_argument("--layers", type=int, help="build only this many layers (default: all of them)")
    ap.add_argument("--batch_size", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--prompt_len", type=int, nargs="+", default=[8192, 32768], help="tokens cached per row")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on CUDA, else float32")
    ap.add_argument("--eager", action="store_true", help="do not compile (SDPA, as generate.py without --compile)")
    ap.add_argument("--repeats", type=int, help="timed calls per step, medians (default: 10 on CUDA, 3 on CPU)")
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--time_limit", type=float, help="seconds: do not start a shape that would end past them "
                    "(judged by the last shape's time); the ones left are printed as a command")
    a = ap.parse_args(argv)
    if a.arch not in MODELS:
        raise UsageError(f"unknown --arch {a.arch!r} (known: {', '.join(MODELS)})")
    full = MODELS[a.arch].n_layers
    if a.layers is not None and not 2 <= a.layers <= full:
        raise UsageError(f"--layers must be in 2..{full} for {a.arch}")
    if min(a.batch_size + a.prompt_len) < 1 or (a.repeats or 1) < 1:
        raise UsageError("--batch_size, --prompt_len and --repeats must be >= 1")
    try:
        a.device = torch.device(a.device)
    except RuntimeError as e:
        raise UsageError(f"--device {a.device}: {e}") from None
    if a.device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device here")
    a.dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.type == "cuda" else "float32"))
    a.repeats = a.repeats or (10 if a.device.type == "cuda" else 3)
    return a


def random_model(cfg, device, dtype) -> Transformer:
    with torch.device("meta"):
        m = Transformer(cfg)
    m = m.to_empty(device=device).to(dtype)
    if cfg.tie_embeddings:
        m.output.weight = m.tok_embeddings.weight
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    return m.eval().requires_grad_(False)


def median_ms(fn, repeats: int, device) -> float:
    """Median of `repeats` timed calls, after three untimed ones (which compile and record)."""
    for _ in range(3):
        fn()
    ts = []
    for _ in range(repeats):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e))
        else:
            t = time.perf_counter()
            fn()
            ts.append(1e3 * (time.perf_counter() - t))
    return statistics.median(ts)


@torch.no_grad()
def measure(model, B: int, L: int, a) -> dict:
    """ms of each step with every row at position L (L slots cached, random contents)."""
    dev, flex, s = a.device, not a.eager, Sampling()
    vocab = tp.Vocab(model.args.vocab_size)
    S = stats.cache_len(L + 1, max(GAMMAS))
    model.setup_caches(B, S)
    for b in model.layers:
        b.attention.kv_cache.k.normal_()
        b.attention.kv_cache.v.normal_()
    pos = torch.full((B,), L, device=dev)
    seq = lambda T: torch.randint(0, model.args.vocab_size, (B, T), device=dev)
    at = lambda T: pos[:, None] + torch.arange(T, device=dev)
    vstep = gen.verify_step if a.eager else gen.compiled(gen.verify_step, dev, 1 + len(GAMMAS))
    dstep = gen.draft_step if a.eager else gen.compiled(gen.draft_step, dev, len(BUDGETS))
    row = {"decode_ms": 0.0, "verify_ms": {}, "draft_ms": {}}
    x = seq(1)
    row["decode_ms"] = median_ms(lambda: vstep(model, vocab, x, at(1), x[:, 1:], None, False, flex, s), a.repeats, dev)
    for b in BUDGETS:
        model.setup_draft_cache(WindowCache, sink=SINK, window=b - SINK)
        model.fill_draft_cache(pos)
        row["draft_ms"][str(b)] = median_ms(lambda: dstep(model, vocab, x, at(1), True, flex, s), a.repeats, dev)
    for g in GAMMAS:  # (with the hand-off into the last window, as a self-speculative verify)
        x = seq(g + 1)
        row["verify_ms"][str(g)] = median_ms(lambda: vstep(model, vocab, x, at(g + 1), x[:, 1:], None, True, flex, s),
                                             a.repeats, dev)
    model.free_caches()
    return row


def predicted(row: dict, L: int) -> dict:
    """The analytic speedup E(alpha, g) * t_decode / (g * t_draft + t_verify(g)) at the paper's
    acceptance (PG-19, Llama-3.1-8B, StreamingLLM) for this context: the best gamma per budget."""
    alpha, out = pg19_alpha(L), {}
    for b, td in row["draft_ms"].items():
        sp = {g: expected_tokens(alpha, int(g)) * row["decode_ms"] / (int(g) * td + tv) for g, tv in row["verify_ms"].items()}
        g = max(sp, key=sp.get)
        out[b] = {"gamma": int(g), "speedup": sp[g]}
    return {"alpha": alpha, "best": out}


def extrapolate(r: dict, r0: dict, k: float) -> dict:
    """A row at full depth from one at N layers (r) and one at a single layer (r0): t0 + (t - t0) * k."""
    f = lambda t, t0: t0 + (t - t0) * k
    out = {"decode_ms": f(r["decode_ms"], r0["decode_ms"]),
           "verify_ms": {g: f(t, r0["verify_ms"][g]) for g, t in r["verify_ms"].items()},
           "draft_ms": {b: f(t, r0["draft_ms"][b]) for b, t in r["draft_ms"].items()}}
    # a layer's cost lost in the noise (N layers timed no slower than one): the figures mean nothing
    pairs = {"decode_ms": [(r["decode_ms"], r0["decode_ms"])],
             **{k_: [(t, r0[k_][g]) for g, t in r[k_].items()] for k_ in ("verify_ms", "draft_ms")}}
    noisy = [k_ for k_, ts in pairs.items() if any(t <= t0 for t, t0 in ts)]
    return out | ({"noisy": noisy} if noisy else {})


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    full = MODELS[a.arch]
    cfg = replace(full, n_layers=a.layers or full.n_layers)
    elem = torch.tensor([], dtype=a.dtype).element_size()
    t0, n0 = time.perf_counter(), gen.unique_graphs()
    model = random_model(cfg, a.device, a.dtype)
    one = random_model(replace(cfg, n_layers=1), a.device, a.dtype) if cfg.n_layers < full.n_layers else None
    rows = []
    print(f"{a.arch}: {cfg.n_layers} of {full.n_layers} layers, random weights, {str(a.dtype)[6:]}, {a.device.type}, "
          f"{'eager' if a.eager else 'compiled'}; ms per step, medians of {a.repeats}" + (
              "; full depth extrapolated from one more model of a single layer" if one else ""))
    print("| B | L | decode ms | verify (decode steps) γ=1..6 | draft (decode steps) 256, 512 | speedup at the "
          "paper's α (γ), budget 256, 512 |\n|---:|---:|---:|---|---|---|")
    last, left = 0.0, []
    for L in a.prompt_len:
        for B in a.batch_size:
            row = {"batch_size": B, "prompt_len": L}
            if a.time_limit and time.perf_counter() - t0 + last > a.time_limit:
                rows.append(row | {"skipped": f"--time_limit {a.time_limit:g} s"})
                left.append((B, L))
                continue
            t_shape = time.perf_counter()
            S = stats.cache_len(L + 1, max(GAMMAS))
            plan = lambda c: lambda b: stats.memory_plan(c, b, S, elem, gmax=max(GAMMAS), window=max(BUDGETS))
            row["fits_full_model"] = sum(plan(full)(B).values()) <= stats.free_memory(a.device) + sum(
                stats.param_bytes(m) for m in (model, one) if m is not None)
            try:  # what this probe allocates (the target's cache and the largest window), as generate.py plans it
                stats.check_memory(plan(cfg), B, a.device, resident=stats.param_bytes(model))
            except UsageError as e:
                rows.append(row | {"skipped": str(e)})
                print(f"| {B} | {L} | skipped: {e} |||")
                continue
            row |= measure(model, B, L, a)
            if one is not None:
                row["measured_layers"] = cfg.n_layers
                row["layers_1"] = measure(one, B, L, a)
                row |= extrapolate(row, row["layers_1"], (full.n_layers - 1) / (cfg.n_layers - 1)) | {
                    "measured": {k: row[k] for k in ("decode_ms", "verify_ms", "draft_ms")}}
            rows.append(row)
            if "noisy" in row:
                print(f"| {B} | {L} | noisy: {cfg.n_layers} layers timed no slower than 1 ({', '.join(row['noisy'])}); "
                      "measure with more --layers or --repeats |||", flush=True)
                continue
            row["predicted"] = predicted(row, L)
            d = row["decode_ms"]
            ver = " / ".join(f"{t / d:.2f}" for t in row["verify_ms"].values())
            dra = " / ".join(f"{t / d:.2f}" for t in row["draft_ms"].values())
            best = ", ".join(f"{p['speedup']:.2f} ({p['gamma']})" for p in row["predicted"]["best"].values())
            print(f"| {B} | {L} | {d:.1f} | {ver} | {dra} | {best} |", flush=True)
            last = time.perf_counter() - t_shape
    graphs, seconds = gen.unique_graphs() - n0, time.perf_counter() - t0
    print(f"{graphs} graphs compiled; {seconds:.0f} s in all")
    if left:
        argv_ = [x for x in (sys.argv[1:] if argv is None else argv)]
        print(f"not measured within --time_limit: {', '.join(f'B={B} L={L}' for B, L in left)}; run them with "
              f"--batch_size {' '.join(sorted({str(B) for B, _ in left}))} --prompt_len "
              f"{' '.join(sorted({str(L) for _, L in left}))} (the other flags as here: {' '.join(argv_)})")
    if a.json:
        Path(a.json).write_text(json.dumps({"arch": a.arch, "layers": cfg.n_layers, "full_layers": full.n_layers,
                                            "device": a.device.type, "dtype": str(a.dtype)[6:],
                                            "compiled": not a.eager, "graphs": graphs, "seconds": seconds,
                                            "command": "python scripts/step_costs.py " + " ".join(
                                                sys.argv[1:] if argv is None else argv),
                                            "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    cli.run(main)
