"""--gamma auto's policy (sampling.AutoGamma) on synthetic step times and acceptance: it settles on
the best gamma, 0 included, within a bounded number of steps, explores a bounded share of them,
follows step costs that change as the context grows, and does not speculate while the draft
window holds the whole context. No clock is read: the times are made up."""
import random

import pytest

from sampling import AUTO_GAMMAS, AutoGamma


def run(alpha, t_draft, t_verify, steps=400, covered=lambda i: False, seed=0, noise=0.05, rows=32):
    """Feed AutoGamma a made-up run; -> (the gamma of every step, the made-up time of every step,
    the policy). t_verify(g, i): a verify step's time at step i; acceptance per draft alpha(i)."""
    rng, auto, gs, ts = random.Random(seed), AutoGamma(), [], []
    for i in range(steps):
        g = auto.choose(covered(i))
        a = [next(j for j in range(g + 1) if j == g or rng.random() > alpha(i)) for _ in range(rows)]
        auto.update(g, sum(a), sum(x < g for x in a))
        td = g * t_draft * (1 + noise * rng.uniform(-1, 1))
        tv = t_verify(g, i) * (1 + noise * rng.uniform(-1, 1))
        auto.timed(g, td, tv)
        gs.append(g)
        ts.append((td + tv) / (sum(a) / rows + 1))  # seconds per token of this step
    return gs, ts, auto


def best_of(alpha, t_draft, t_verify):
    """The true best: tokens per step 1 + alpha + ... + alpha^g (computed here, not by sampling.py)."""
    rate = {g: sum(alpha ** k for k in range(g + 1)) / (g * t_draft + t_verify(g)) for g in AUTO_GAMMAS}
    return max(rate, key=rate.get), rate


CASES = {  # alpha, t_draft, t_verify(g): shapes of this CPU and of a GPU
    "cheap drafts, good acceptance": (0.9, 0.05, lambda g: 1.0),  # a GPU at long context: draft the most
    "drafts cost a step": (0.3, 1.0, lambda g: 1.0),  # never speculate
    "compute-bound verify": (0.8, 0.1, lambda g: 1.0 + 0.5 * g),  # this CPU at 6K x 32: gamma 1
    "compute-bound, short context": (0.8, 0.35, lambda g: 1.0 + 1.0 * g),  # this CPU at 2K: no speculation
    "moderate": (0.75, 0.12, lambda g: 1.0 + 0.08 * g),
    # this CPU at 6K x 32: verifying 2 tokens costs 1.36 plain steps, each further token 0.02 more
    "verify's jump from one token to several": (0.82, 0.2, lambda g: 1.0 if g == 0 else 1.34 + 0.02 * g),
}


@pytest.mark.parametrize("case", CASES)
def test_it_settles_on_the_best_gamma_and_explores_little(case):
    alpha, t_draft, t_verify = CASES[case]
    want, rate = best_of(alpha, t_draft, t_verify)
    gs, _, auto = run(lambda i: alpha, t_draft, lambda g, i: t_verify(g))
    near = {g for g, r in rate.items() if r >= 0.98 * rate[want]}  # as good as the best, within 2%
    assert auto.best in near, (auto.best, want)
    off = [g for g in gs[20:] if g not in near]
    assert len(off) <= 0.06 * len(gs[20:]), (len(off), off[:20])  # probes only, and few of them
    # the expected throughput of what it chose, against always choosing the best
    got = sum(1 / rate[g] for g in gs) / len(gs)  # seconds per token, on average
    assert got <= (1 / rate[want]) * 1.03


def test_speculative_steps_are_priced_by_their_own_line():
    """Verifying several tokens costs a jump over a plain step, then little per token (this CPU at
    6K x 32): after plain steps and steps of gamma 1 and 2, every gamma's step is priced at its
    cost; a line through the plain step would price gamma 6 at ~60% more."""
    _, t_draft, t_verify = CASES["verify's jump from one token to several"]
    auto = AutoGamma()
    for g in (0, 1, 0, 2, 0, 1, 2, 0):
        auto.update(g, g, 0)
        auto.timed(g, g * t_draft, t_verify(g))
    for g in AUTO_GAMMAS:
        assert auto.cost(g) == pytest.approx(g * t_draft + t_verify(g), rel=0.01), g


def test_exploration_grows_rarer_while_plain_decoding_wins():
    gs, _, auto = run(lambda i: 0.3, 1.0, lambda g, i: 1.0, steps=1000)
    probes = [i for i, g in enumerate(gs) if g]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps == sorted(gaps) and gaps[-1] == auto.max_gap  # widening, up to the cap
    assert len(probes) <= 2 + 1000 / auto.max_gap + 4


def test_it_follows_costs_that_change_as_the_context_grows():
    """Early on the attention is short and speculation does not pay; from step 300 on verifying is
    as cheap as decoding (long context, bandwidth-bound): it switches within a bounded delay."""
    late = lambda g, i: 1.0 + (1.0 * g if i < 300 else 0.02 * g)
    gs, _, _ = run(lambda i: 0.8, 0.2, late, steps=700)
    assert all(g == 0 for g in gs[40:300] if g != 1)
    switched = next(i for i in range(300, 700) if all(g >= 3 for g in gs[i:i + 20]))
    assert switched - 300 <= AutoGamma().max_gap + 40


def test_a_window_that_holds_the_context_is_not_drafted():
    gs, _, _ = run(lambda i: 0.95, 0.9, lambda g, i: 1.0, steps=200, covered=lambda i: i < 150)
    assert gs[:150] == [0] * 150  # not even a probe
    assert 1 in gs[150:152]  # then it explores at once


def batch_steps(rows, g, trials=4000, seed=0):
    """Monte Carlo: the mean steps until the last of `rows` [(tokens left, acceptance)] is done at g."""
    rng, total = random.Random(seed), 0
    for _ in range(trials):
        most = 0
        for n, a in rows:
            steps = 0
            while n > 0:
                h = min(g, n - 1)
                n -= 1 + next(j for j in range(h + 1) if j == h or rng.random() > a)
                steps += 1
            most = max(most, steps)
        total += most
    return total / trials


def test_at_a_batchs_end_it_picks_for_its_slowest_row():
    """With no request left to refill a row (`lag`), the run lasts as long as its slowest row: the
    gamma is the one that finishes the batch soonest with each row at its own acceptance, not the
    batch's best (the finish read here by simulating the rows); a row with one token left needs a
    plain step."""
    alpha, t_draft, t_verify = CASES["moderate"]
    _, _, auto = run(lambda i: alpha, t_draft, lambda g, i: t_verify(g))
    pooled, _ = best_of(alpha, t_draft, t_verify)
    slow = (40, 30, 70)  # 40 tokens left; 30 drafts accepted, 70 rejections: alpha ~0.3
    fast = [(8, 90, 10)] * 20  # nearly done
    k = auto.strength(fast + [slow])
    assert auto.prior <= k < 20  # rows this far apart keep their own rates
    own = [(n, (a + k * alpha) / (a + r + k)) for n, a, r in fast + [slow]]  # shrunk toward the shared rate
    t = {g: batch_steps(own, g, 1000) * (g * t_draft + t_verify(g)) for g in AUTO_GAMMAS}
    want = min(t, key=t.get)
    assert want != pooled  # (the case tells the two apart)
    auto.next_probe = auto.steps + 10  # (between probes)
    near = {g for g in t if t[g] <= 1.02 * t[want]}
    assert auto.choose(lag=fast + [slow]) in near
    t = {g: batch_steps([(40, alpha)] * 8, g, 1000) * (g * t_draft + t_verify(g)) for g in AUTO_GAMMAS}
    near = {g for g in t if t[g] <= 1.02 * min(t.values())}
    assert auto.choose(lag=[(40, 0, 0)] * 8) in near  # rows that have shown nothing: the shared rate
    assert auto.choose(lag=[(1, 9, 1)] * 8) == 0


def test_a_batchs_end_waits_for_the_slowest_of_its_rows():
    """Speculation that pays a row by 6% (gamma 1: 1.8 tokens a step for 1.7 plain steps' time)
    loses for a batch of 32 such rows: their step counts scatter and the batch waits for the
    slowest of them (read here by simulating the rows); one row alone speculates."""
    auto = AutoGamma()
    for g in (0, 1) * 30:
        auto.update(g, 80 * g, 20 * g)  # acceptance 0.8
        auto.timed(g, 0.3 * g, 1.0 + 0.4 * g)  # gamma 1: 1.7 plain steps
    assert abs(auto.alpha - 0.8) < 0.01
    auto.next_probe = auto.steps + 10  # (between probes)
    assert auto.choose(lag=[(64, 0, 0)]) == 1
    batch = {g: batch_steps([(64, 0.8)] * 32, g, 400) * (1.0 + 0.7 * g) for g in (0, 1)}
    assert batch[0] < batch[1]  # (the case tells them apart)
    assert auto.choose(lag=[(64, 0, 0)] * 32) == 0


def test_no_probe_the_batchs_end_leaves_no_steps_to_use():
    """A probe is due, but the slowest row needs fewer steps than the gap: in a fixed batch a probe
    rarely shortens that row, so it would cost its whole step for a lesson with no steps left to use."""
    alpha, t_draft, t_verify = CASES["drafts cost a step"]
    _, _, auto = run(lambda i: alpha, t_draft, lambda g, i: t_verify(g), steps=60)
    assert auto.best == 0
    auto.next_probe = auto.steps  # (a probe is due)
    probe = auto.gammas[1]  # the neighbour of gamma 0
    assert auto.choose(lag=[(auto.gap - 2, 3, 7)] * 8) == 0  # fewer steps left than the gap
    auto.next_probe = auto.steps
    assert auto.choose(lag=[(auto.gap + 2, 3, 7)] * 8) == probe  # enough left: the probe runs
    assert auto.probe == probe


def test_rows_that_differ_by_chance_share_the_rate():
    """32 rows of one true acceptance, their counts as binomial as real drafts': the row that looks
    the slowest by chance does not set the gamma (it would pick a plain step here); rows whose
    counts spread far beyond that noise keep their own rates."""
    alpha, t_draft, t_verify = CASES["verify's jump from one token to several"]
    _, _, auto = run(lambda i: alpha, t_draft, lambda g, i: t_verify(g))
    rng = random.Random(1)
    lag = []
    for _ in range(32):
        a = sum(rng.random() < alpha for _ in range(20))
        lag.append((30, a, 20 - a))
    assert auto.strength(lag) > 100
    auto.next_probe = auto.steps + 10  # (between probes)
    shared = {g: auto.finish(g, [(30, 0, 0)] * 32) for g in AUTO_GAMMAS}  # every row at the shared rate
    assert auto.choose(lag=lag) in {g for g in shared if shared[g] <= 1.02 * min(shared.values())} - {0}
    worst = min(lag, key=lambda x: x[1])
    assert best_of(worst[1] / 20, t_draft, t_verify)[0] != auto.best  # (the case tells the two apart)
    apart = [(30, 19, 1)] * 16 + [(30, 8, 12)] * 16  # acceptance 0.95 and 0.4
    assert auto.strength(apart) < 10
