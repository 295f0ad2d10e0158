"""Plain decoding against --gamma auto with gamma 0 forced on every step (AutoGamma.choose patched)
and free auto, one process, 3 interleaved repeats: seconds per verify step.
    python benchmarks/cpu-auto-gamma/forced0.py 2048 1     # prompt length, batch size"""
import statistics
import sys

from shape import load  # (first: it puts the project on sys.path)

import sampling  # noqa: E402
from generate import generate  # noqa: E402

L, B, N = int(sys.argv[1]), int(sys.argv[2]), 64
m, prompts = load(L, B)
free = sampling.AutoGamma.choose


def forced(self, covered=False, lag=None):
    self.used[0] = self.used.get(0, 0) + 1
    self.steps += 1
    return 0


kw = dict(budget=256, sink=16)
generate(m, prompts, N, gamma="auto", **kw)  # the prefill the runs share
res = {}
for r in range(3):
    for name, g in (("ar", 0), ("auto0", "auto"), ("auto", "auto")):
        sampling.AutoGamma.choose = forced if name == "auto0" else free
        st = generate(m, prompts, N, prefilled=True, gamma=g, **kw).stats
        res.setdefault(name, []).append(st["decode_seconds"] / st["verify_steps"])
        print(name, r, {k: st.get(k) for k in ("decode_seconds", "verify_steps", "verify_seconds", "host_seconds",
                                               "gamma_used")}, flush=True)
ar = statistics.median(res["ar"])
for k, v in res.items():
    print(k, "median s/step", round(statistics.median(v), 4), "vs ar", round(statistics.median(v) / ar, 3))
