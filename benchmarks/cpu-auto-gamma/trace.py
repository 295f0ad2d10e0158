"""--gamma auto's decisions step by step: plain decoding and auto, 2 interleaved runs on one prefill
(greedy, the benchmark's prompts, budget 256, sink 16, 64 new tokens); for each step of auto the
gamma chosen, the slowest row's tokens left and the finish times it weighed (`AutoGamma.finish`,
seconds per gamma), then the step's measured draft and verify seconds, the rates after them
(tokens/s per gamma, `AutoGamma.rates`) and the shared acceptance.
    python benchmarks/cpu-auto-gamma/trace.py 2048 8      # prompt length, batch size"""
import sys

from shape import load  # (first: it puts the project on sys.path)

import sampling  # noqa: E402
from generate import generate  # noqa: E402

L, B = int(sys.argv[1]), int(sys.argv[2])
m, prompts = load(L, B)
timed, choose = sampling.AutoGamma.timed, sampling.AutoGamma.choose
r2 = lambda d: {k: round(v, 2) for k, v in d.items()}


def traced_choose(self, covered=False, lag=None):
    g = choose(self, covered, lag)
    weighed = r2({x: self.finish(x, lag) for x in self.gammas}) if lag and self.t_draft is not None else "-"
    print(f"step {self.steps - 1:3d} gamma {g}  slowest row's tokens left {max(n for n, _, _ in lag) if lag else '-'}"
          f"  finish s {weighed}")
    return g


def traced_timed(self, g, t_draft, t_verify):
    timed(self, g, t_draft, t_verify)
    print(f"         draft {t_draft:.4f} s  verify {t_verify:.4f} s  rates {r2(self.rates()) if self.t_draft else '-'}"
          f"  alpha {self.alpha:.3f}")


kw = dict(budget=256, sink=16)
generate(m, prompts, 64, gamma="auto", **kw)  # the prefill the runs share
for r in range(2):
    ar = generate(m, prompts, 64, prefilled=True, gamma=0).stats
    print(f"=== run {r}: auto's steps")
    sampling.AutoGamma.choose, sampling.AutoGamma.timed = traced_choose, traced_timed
    auto = generate(m, prompts, 64, prefilled=True, gamma="auto", **kw).stats
    sampling.AutoGamma.choose, sampling.AutoGamma.timed = choose, timed
    print(f"=== run {r}: decode seconds: plain decoding {ar['decode_seconds']:.2f}, auto {auto['decode_seconds']:.2f}"
          f" (gamma used {auto['gamma_used']})")
