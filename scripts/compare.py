"""One line comparing two `generate.py --json` runs of the same prompts (plain decoding first, then
speculation): both decode rates, their ratio, and whether every row's tokens are the same.

    python scripts/compare.py plain.json spec.json
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from any cwd

import cli  # noqa: E402
from model import UsageError  # noqa: E402


def load(path) -> dict:
    try:
        j = json.loads(Path(path).read_text())
        j["rows"], j["stats"]["tokens_per_second"], j["config"]
        return j
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path}: not the --json output of generate.py ({e})") from None


def compare(plain: dict, spec: dict) -> str:
    a, b = plain["stats"]["tokens_per_second"], spec["stats"]["tokens_per_second"]
    rows = [(p["tokens"], s["tokens"]) for p, s in zip(plain["rows"], spec["rows"])]
    if len(plain["rows"]) != len(spec["rows"]) or any(
            p["prompt_tokens"] != s["prompt_tokens"] for p, s in zip(plain["rows"], spec["rows"])):
        raise UsageError("the two runs did not decode the same prompts")
    same = sum(p == s for p, s in rows)
    r = b / max(a, 1e-9)
    line = (f"plain decoding {a:.1f} tok/s, self-speculation {b:.1f} tok/s: {r:.2f}x "
            + ("(faster)" if r >= 1.02 else "(slower)" if r <= 0.98 else "(about the same)"))
    s = spec["stats"]
    if "gamma_used" in s:
        line += "; gamma used " + " ".join(f"{g}:{n}" for g, n in s["gamma_used"].items() if n)
    budget = spec["config"].get("draft_budget") or 0
    longest = max(r["prompt_tokens"] + len(r["tokens"]) for r in spec["rows"])
    if r <= 0.98 and longest <= budget:
        line += (f"; every row's context ({longest} tokens at most) fits the draft's {budget} slots, so a draft "
                 "step reads what a decoding step reads: speculation pays at long context and large batch")
    elif r <= 0.98:
        line += "; at this batch and context the drafts cost more than they save on this machine"
    c = spec["config"]
    half = c.get("dtype") in ("bfloat16", "float16") or ("cuda" in str(c.get("device")) and not c.get("dtype"))
    if same == len(rows):
        line += f"; the same tokens in all {len(rows)} rows"
    else:
        why = ("sampled: other draws, the same distribution" if c.get("temperature") else
               "half precision: a near-tie may flip, README's Exactness" if half else "greedy fp32: a bug")
        line += f"; tokens differ in {len(rows) - same} of {len(rows)} rows ({why})"
    return line


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise UsageError("usage: python scripts/compare.py PLAIN.json SPEC.json")
    print(compare(load(argv[0]), load(argv[1])))
    return 0


if __name__ == "__main__":
    cli.run(main)
