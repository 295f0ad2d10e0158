"""The demo's shape in one process: plain decoding and --gamma auto, 8 interleaved repeats, ms per
verify step and the tok/s ratio per repeat. python benchmarks/cpu-auto-gamma/demo/inproc.py"""
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
res = {}
for r in range(8):
    for name, kw in (("none", dict(gamma=0)), ("auto", dict(gamma="auto", budget=64, sink=16))):
        st = generate(m, prompts, 64, **kw).stats
        res.setdefault(name, []).append(st)
for k, v in res.items():
    ms = [s["decode_seconds"] / s["verify_steps"] * 1e3 for s in v]
    print(k, "ms/step", [round(x, 1) for x in ms], "median", round(statistics.median(ms), 1))
ratios = [a["tokens_per_second"] / n["tokens_per_second"] for a, n in zip(res["auto"], res["none"])]
print("auto / none tok/s per repeat", [round(x, 3) for x in ratios], "median", round(statistics.median(ratios), 3))
