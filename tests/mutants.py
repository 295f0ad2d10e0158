"""Mutants of the draft caches (issues 19, 20) and of the model under its anchored reference (issue
21): each is a copy of the repository with one realistic bug,
and the tests named beside it must fail on it (they pass on the unmutated code).
    python tests/mutants.py [NAME ...]     # all mutants by default; prints CAUGHT or SURVIVED per mutant"""
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1]
SN = "tests/test_snapkv.py"
CONTENT = f"{SN}::test_fill_and_updates_keep_what_an_independent_reading_says"
REFILL = f"{SN}::test_refilled_rows_get_their_own_selection_and_leave_the_others"
KEEP = f"{SN}::test_prefill_keeps_each_rows_observation_queries"
ATT = "tests/test_attention.py::test_attention_backends_match_the_reference"
WINDOW = "tests/test_draft_cache.py::test_window_holds_sinks_and_the_last_positions"
LAZY = "tests/test_draft_cache.py::test_plain_steps_of_auto_skip_the_window_and_the_next_draft_catches_it_up"
ANCHOR = "tests/test_generate.py::test_gamma_auto_is_exact"  # through greedy_refs: transformers' tokens
MUTANTS = {  # name: (file, code, the bug, the tests that must catch it)
    'scores summed over the wrong query heads': (
        'model.py',
        'q.float().view(B, w, Hkv, G, D).permute(0, 2, 3, 1, 4)',
        'q.float().view(B, w, G, Hkv, D).permute(0, 3, 2, 1, 4)',
        [CONTENT]),
    'ring slot off by one in update': (
        'model.py',
        'self.select + input_pos % self.window',
        'self.select + (input_pos + 1) % self.window',
        [CONTENT]),
    'selection not per head (scores summed over KV heads)': (
        'model.py',
        '        p = torch.arange(L, device=dev)\n        before',
        '        s = s.sum(1, keepdim=True).expand_as(s)\n        p = torch.arange(L, device=dev)\n        before',
        [CONTENT]),
    'a refill empties every row first': (
        'model.py',
        '        dev, H = length.device, self.k.shape[1]\n',
        '        dev, H = length.device, self.k.shape[1]\n        self.pos.fill_(-1)\n',
        [REFILL]),
    'kept queries one position off': (
        'model.py',
        'i = obs - input_pos[:1, :1]',
        'i = obs - input_pos[:1, :1] + 1',
        [KEEP]),
    'the prefill keeps no queries': (
        'model.py',
        "            self.keep(q, input_pos, c.obs)\n",
        "            pass\n",
        [KEEP]),
    "score mask hides the query's own position": (
        'model.py',
        'torch.arange(L, device=q.device) > qp',
        'torch.arange(L, device=q.device) >= qp',
        [CONTENT]),
    'no pooling': (
        'model.py',
        '        return F.avg_pool1d(a, self.pool, stride=1, padding=self.pool // 2, count_include_pad=False)',
        '        return a',
        [CONTENT]),
    'sinks not forced': (
        'model.py',
        'forced = before & ((p < self.sink) | ',
        'forced = before & ((p < 0) | ',
        [CONTENT]),
    'observation window not forced': (
        'model.py',
        '| (p >= (length - q.shape[1])[:, None]))',
        '| (p < 0))',
        [CONTENT]),
    'selection ignores the ring (ring positions also selected)': (
        'model.py',
        's = s.masked_fill(~before[:, None], -math.inf)',
        's = s.masked_fill(~(p < length[:, None])[:, None], -math.inf)',
        [CONTENT]),
    "FlexAttention mask reads KV head 0's positions for every head": (
        'model.py',
        'kp = kv_pos[b, h, ki.clamp(max=kmax)]',
        'kp = kv_pos[b, 0, ki.clamp(max=kmax)]',
        [ATT + "[snapkv_case-G3-T1]"]),
    "eager mask reads KV head 0's positions for every head": (
        'model.py',
        'h = ar(kv_pos.shape[1], 1, -1, 1, 1) if',
        'h = ar(1, 1, -1, 1, 1) if',
        [ATT + "[snapkv_case-G3-T1]"]),
    "streaming ring slot off by one in update": (
        'model.py',
        'ring = self.sink + (input_pos - self.sink) % self.window',
        'ring = self.sink + (input_pos - self.sink + 1) % self.window',
        [WINDOW]),
    "streaming fill one lap stale (the ring of the positions a window earlier)": (
        'model.py',
        'ring = self.sink + ring_positions(length - self.sink, self.window)',
        'ring = self.sink + ring_positions(length - self.sink - self.window, self.window)',
        [WINDOW]),
    "auto's plain steps leave the window stale for the next draft": (
        'generate.py',
        '            self.model.catch_up_draft_cache(',
        '            (lambda p: None)(',
        [LAZY]),
    "auto's plain steps still write the window": (
        'generate.py',
        'self.lazy, self.stale = self.auto is not None and',
        'self.lazy, self.stale = False and',
        [LAZY]),
    "the stale flag is never set (plain steps write the window again)": (
        'generate.py',
        '        self.stale = self.stale + 1 if self.lazy and not g else 0\n',
        '        self.stale = 0\n',
        [LAZY]),
    "the catch-up copies one plain step's position too few": (
        'generate.py',
        'n = min(self.stale, self.o.budget - self.o.sink)',
        'n = min(self.stale - 1, self.o.budget - self.o.sink)',
        [LAZY]),
    "the catch-up copies the positions one step early": (
        'generate.py',
        '(pos[:, None] - n + torch.arange(n',
        '(pos[:, None] - n - 1 + torch.arange(n',
        [LAZY]),
    "the fills' gather strides rows by one head, not by H_kv (KVCache.take)": (
        'model.py',
        'at = ((r * H + torch.arange',
        'at = ((r + torch.arange',
        [WINDOW, CONTENT]),
    "an unaligned int8 weight handed to torch's CPU kernel as read (QLinear.pack)": (
        'model.py',
        '        if w.data_ptr() % 64:',
        '        if False:',
        ["tests/test_quantize.py::test_an_unaligned_int8_weight_is_copied_before_the_kernel_reads_it"]),
    "rope base ignored (plain and speculative decoding agree, transformers does not)": (
        'model.py',
        'inv = 1.0 / args.rope_base **',
        'inv = 1.0 / 10000.0 **',
        [ANCHOR]),
    "--gamma auto never told that no request is left (the batch's end)": (
        'generate.py',
        'self.auto.choose(self.covered, self.lag if self.draining else None)',
        'self.auto.choose(self.covered, None)',
        ["tests/test_refill.py::test_gamma_auto_sees_each_rows_progress_once_no_request_is_left"]),
    "a refilled row missing from --gamma auto's view until its first step": (
        'generate.py',
        '        self.lag = self.lag + [(q.max_new_tokens, 0, 0) for q in reqs]',
        '        pass',
        ["tests/test_refill.py::test_gamma_auto_sees_each_rows_progress_once_no_request_is_left"]),
    "the batch's end chosen at the shared acceptance, not each row's": (
        'sampling.py',
        'else (lambda a, r: (a + k * alpha) / (a + r + k))',
        'else (lambda a, r: alpha)',
        ["tests/test_auto_gamma.py::test_at_a_batchs_end_it_picks_for_its_slowest_row"]),
    "the batch's end set by the row that looks slowest by chance (no shrinkage toward the shared rate)": (
        'sampling.py',
        'return math.inf if between <= 0 else max(self.prior, noise / between - 1)',
        'return self.prior',
        ["tests/test_auto_gamma.py::test_rows_that_differ_by_chance_share_the_rate"]),
    "--gamma auto probes at a batch's end with no steps left to use the lesson": (
        'sampling.py',
        'self.steps >= self.next_probe and not (\n                lag and self.steps_left(self.best, lag) < self.gap))',
        'self.steps >= self.next_probe)',
        ["tests/test_auto_gamma.py::test_no_probe_the_batchs_end_leaves_no_steps_to_use"]),
    "a batch's end priced by each row's mean steps alone (the slowest row's scatter ignored)": (
        'sampling.py',
        'return n / m, math.sqrt(',
        'return n / m, 0 * math.sqrt(',
        ["tests/test_auto_gamma.py::test_a_batchs_end_waits_for_the_slowest_of_its_rows"]),
    "--gamma auto's verify line fitted through the plain step": (
        'sampling.py',
        '        (self.verify if g else self.plain).add(g, t_verify, self.decay)\n        (self.plain if g else self.verify).fade(self.decay)',
        '        self.verify.add(g, t_verify, self.decay)',
        ["tests/test_auto_gamma.py::test_speculative_steps_are_priced_by_their_own_line"]),
    "--gamma auto's verify line forgets only on speculative steps": (
        'sampling.py',
        '        (self.plain if g else self.verify).fade(self.decay)',
        '        pass',
        ["tests/test_auto_gamma.py::test_it_follows_costs_that_change_as_the_context_grows"]),
    "a user's mistake escapes cli.run as a traceback (the forked runs of tests/forkrun.py see it)": (
        'cli.py',
        '    except UsageError as e:\n        if int(os.environ',
        '    except ZeroDivisionError as e:\n        if int(os.environ',
        ["tests/test_cli.py::test_bad_input_is_one_line", "tests/test_bad_checkpoints.py::test_bad_checkpoint",
         "tests/test_refill.py::test_bad_lines_are_reported_before_any_work"]),
}


def main(names) -> int:
    out = {}
    for name in names or list(MUTANTS):
        f, a, b, tests = MUTANTS[name]
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp) / "copy"
            shutil.copytree(SRC, d, symlinks=True, ignore=shutil.ignore_patterns(".git", "__pycache__", ".venv"))
            src = (d / f).read_text()
            assert src.count(a) == 1, f"{name}: the code to break is not there once"
            (d / f).write_text(src.replace(a, b))
            r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=d,
                               capture_output=True, text=True)
        out[name] = {"tests": tests, "caught": r.returncode != 0}
        print(f"{'CAUGHT' if r.returncode else 'SURVIVED'}: {name} ({', '.join(tests)})", flush=True)
    print(json.dumps(out, indent=1))
    return 0 if all(v["caught"] for v in out.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
