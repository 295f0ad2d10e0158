"""The demo's shape in one process: plain decoding, gamma 2 and --gamma auto, an untimed round, then
8 interleaved repeats: ms per verify step, the tok/s ratio to plain decoding per repeat, auto's
gammas; greedy, so every run must return plain decoding's tokens.
    python benchmarks/cpu-auto-gamma/demo/inproc.py"""
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

from cli import read_checkpoint  # noqa: E402
from generate import generate  # noqa: E402
from model import Transformer  # noqa: E402

torch.set_grad_enabled(False)
ckpt = ROOT / "checkpoints" / "smollm2-135m"
_, tok = read_checkpoint(ckpt)
m = Transformer.from_checkpoint(ckpt, "cpu", torch.float32)
P = ["The old lighthouse keeper climbed the stairs one last time, and", "Photosynthesis is the process by which plants",
     "A short history of the bicycle begins in 1817, when", "Dear diary, today I finally"]
prompts = [tok.encode(p) for p in P]
CONFIGS = (("none", dict(gamma=0)), ("2", dict(gamma=2, budget=64, sink=16)),
           ("auto", dict(gamma="auto", budget=64, sink=16)))
for name, kw in CONFIGS:  # one untimed round
    generate(m, prompts, 64, **kw)
res = {}
for r in range(8):
    for name, kw in CONFIGS:
        g = generate(m, prompts, 64, **kw)
        res.setdefault(name, []).append(g.stats)
        ref = g.tokens if name == "none" else ref
        assert g.tokens == ref, f"{name}: not the tokens of plain decoding"
for k in ("none", "2", "auto"):
    ms = [s["decode_seconds"] / s["verify_steps"] * 1e3 for s in res[k]]
    print(k, "ms/step", [round(x, 1) for x in ms], "median", round(statistics.median(ms), 1))
    if k != "none":
        ratios = [a["tokens_per_second"] / n["tokens_per_second"] for a, n in zip(res[k], res["none"])]
        print(k, "/ none tok/s per repeat", [round(x, 3) for x in ratios], "median", round(statistics.median(ratios), 3))
used = {}
for s in res["auto"]:
    for g, n in s["gamma_used"].items():
        used[g] = used.get(g, 0) + n
print("auto's gamma used (8 runs)", dict(sorted(used.items())))
