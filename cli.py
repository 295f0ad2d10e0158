"""The command line around the loop: arguments and their checks, prompt files and requests, the
--output JSONL file (its lock, resume, one whole line per result), progress, and `run`, which turns
a user's mistake into one `error: ...` line. Every script of the project takes its CLI helpers from
here; generate.py's `main` strings them together."""
import argparse
import atexit
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import stats
import tp
from model import ModelArgs, UsageError, check_weights
from sampling import AUTO_GAMMAS, max_gamma

DEFAULT_PROMPT = "The old lighthouse keeper climbed the stairs one last time, and"


class ArgParser(argparse.ArgumentParser):
    """argparse whose mistakes are UsageErrors: one `error: ...` line and exit 2, like the rest."""

    def error(self, message):
        raise UsageError(message)


def run(main):
    """Run a script's main(): a UsageError becomes one `error: ...` line (rank 0 only) and exit 2."""
    try:
        code = main()
    except UsageError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        code = 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    sys.exit(code if isinstance(code, int) else 0)


# --------------------------------------------------------------------------------------- requests
@dataclass
class Request:
    tokens: list[int]
    max_new_tokens: int
    id: object = None


@dataclass
class Result:
    id: object
    prompt_tokens: int
    tokens: list[int]
    finish_reason: str  # "eos" | "length"
    accepted: int  # drafts of this prompt the target accepted
    steps: int  # verify steps while this prompt was decoding


def read_prompt_file(path) -> list[tuple[int, dict]]:
    """(line number, record) per prompt: a .jsonl holds one JSON object a line with a string
    "text" (blank lines skipped); any other file is one prompt, its whole text."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"prompt file {path}: {getattr(e, 'strerror', None) or e}") from None
    if path.suffix != ".jsonl":
        return [(1, {"text": text})]
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except ValueError:
                raise UsageError(f"{path}:{i}: not JSON") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise UsageError(f'{path}:{i}: expected a JSON object with a string "text" field')
            out.append((i, rec))
    return out


def rows_of(prompts: list, B: int) -> list:
    """B rows filled from the prompts in order, cycling."""
    return [prompts[i % len(prompts)] for i in range(B)]


def build_requests(args, tok, ctx: int) -> list[Request]:
    """Every prompt of --prompt and --prompt_file, checked before any work starts: a bad line is
    reported with its file and line number. id: a .jsonl line's "id", else its line number (or,
    for --prompt texts, their order)."""
    sources = [(None, i, {"text": t}) for i, t in enumerate(args.prompt or [], 1)]
    for f in args.prompt_file or []:
        if not Path(f).is_file():
            raise UsageError(f"--prompt_file {f}: no such file")
        sources += [(f, i, rec) for i, rec in read_prompt_file(f)]
    if not sources:
        sources = [(None, 1, {"text": DEFAULT_PROMPT})]
    reqs, seen = [], {}
    for f, line, rec in sources:
        where = f"{f}:{line}" if f else f"--prompt {line}"
        n = rec.get("max_new_tokens", args.max_new_tokens)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise UsageError(f"{where}: max_new_tokens must be an integer >= 1, not {n!r}")
        rid = rec.get("id", line)
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise UsageError(f"{where}: id must be a string or an integer, not {rid!r}")
        if args.output and rid in seen:
            raise UsageError(f"{where}: id {rid!r} repeats {seen[rid]} (each prompt needs its own id)")
        seen[rid] = where
        ids = tok.encode(rec["text"])
        if args.prompt_len is not None:
            if len(ids) < args.prompt_len:
                raise UsageError(f"{where}: --prompt_len {args.prompt_len}: a prompt has only {len(ids)} tokens")
            ids = ids[: args.prompt_len]
        if not ids:
            raise UsageError(f"{where}: the prompt encodes to no tokens")
        if len(ids) + n > ctx:
            raise UsageError(f"{where}: a prompt of {len(ids)} tokens + max_new_tokens {n} exceeds the model's "
                             f"context of {ctx} tokens")
        reqs.append(Request(ids, n, rid))
    if args.output and len({f for f, _, _ in sources}) > 1:
        raise UsageError("with --output, give the prompts as one --prompt_file (or --prompt texts only), "
                         "so that every prompt has one id")
    return reqs


# ----------------------------------------------------------------------------------- checkpoints
VOCAB_PROBE = "Speculation needs one vocabulary: 12 apples, naïve café, ½ €."


def read_checkpoint(path) -> tuple[ModelArgs, object]:
    from tokenizer import load_tokenizer

    if not (Path(path) / "config.json").is_file():
        raise UsageError(f"checkpoint {path}: no config.json there (make one with convert_checkpoint.py)")
    cfg = ModelArgs.load(Path(path) / "config.json")
    check_weights(path, cfg)  # before any process group: tensor-parallel ranks read only slices
    return cfg, load_tokenizer(path)


def read_checkpoints(args) -> tuple[ModelArgs, object, ModelArgs | None]:
    """--checkpoint's config and tokenizer, and --draft_checkpoint's config where it drafts (same
    vocabulary), both checked against --tp."""
    cfg, tok = read_checkpoint(args.checkpoint)
    tp.check_split(cfg, args.tp)
    if args.draft == "none" or args.draft_checkpoint is None:
        return cfg, tok, None
    dcfg, dtok = read_checkpoint(args.draft_checkpoint)
    tp.check_split(dcfg, args.tp)
    check_same_vocab(tok, cfg, dtok, dcfg, f"--draft_checkpoint {args.draft_checkpoint}")
    return cfg, tok, dcfg


def check_same_vocab(tok, cfg: ModelArgs, dtok, dcfg: ModelArgs, what: str):
    if dcfg.vocab_size != cfg.vocab_size or dtok.encode(VOCAB_PROBE) != tok.encode(VOCAB_PROBE):
        raise UsageError(f"{what} has another vocabulary than the target ({dcfg.vocab_size} vs {cfg.vocab_size} ids)")


# -------------------------------------------------------------------------------------- arguments
def gamma_arg(v: str) -> int | str:
    try:
        return v if v == "auto" else int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid gamma {v!r} (an integer or auto)") from None


def parse_args(argv=None):
    ap = ArgParser(description="Batched autoregressive and self-speculative generation.")
    add = ap.add_argument
    add("--checkpoint", help="converted checkpoint dir (default: the built-in SmolLM2-135M)")
    add("--prompt", action="append", help="prompt text (repeatable)")
    add("--prompt_file", action="append", help=".jsonl: one JSON object a line with \"text\" (and optionally "
        "\"id\", \"max_new_tokens\"); other files: the whole file is one prompt")
    add("--prompt_len", type=int, help="cut each prompt to its first N tokens")
    add("--batch_size", type=int, help="rows; without --output filled from the prompts in order, cycling "
        "(default: one row per prompt); with --output: rows refilled as prompts finish (default: min(prompts, 32))")
    add("--max_new_tokens", type=int, default=128, help="per prompt (a .jsonl line may override it)")
    add("--temperature", type=float, default=0.0, help="0 = greedy")
    add("--top_k", type=int, default=0, help="0 = off")
    add("--top_p", type=float, default=1.0)
    add("--seed", type=int, default=1234)
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--dtype", choices=["float32", "bfloat16", "float16"], help="activations (default: bfloat16 on CUDA and for "
        "a quantized checkpoint, else float32)")
    add("--compile", action="store_true", help="compile the decode steps (CUDA graphs on GPU)")
    add("--json", help="write config, rows and stats to this file")
    add("--output", help="stream every prompt through --batch_size refilled rows and append one JSON line per "
        "prompt to this .jsonl file as it finishes")
    add("--resume", action="store_true", help="with --output: skip the prompts already in it")
    add("--draft", choices=["none", "self"], default="self",
        help="self: the model drafts on a windowed cache; none: plain decoding")
    add("--draft_checkpoint", help="draft with this model instead (same tokenizer)")
    add("--draft_budget", type=int, default=256,
        help="draft KV slots: sink + recent window (0: a separate draft model's full cache)")
    add("--sink", type=int, default=16, help="attention-sink slots of the draft window")
    add("--draft_cache", choices=["streaming", "snapkv"], default="streaming", help="the self-draft's window "
        "(or --draft_checkpoint's): streaming = sinks + the most recent positions (StreamingLLM); snapkv = per KV "
        "head, the prompt positions its last 32 queries attend to most, + a ring of recent positions (half the budget)")
    add("--gamma", type=gamma_arg, default="auto", help="tokens drafted per verification, or auto (the default): "
        f"chosen before every step among {AUTO_GAMMAS} from this run's measured acceptance and step times "
        "(0 = a plain decoding step)")
    add("--tp", type=int, default=1, help="tensor-parallel degree (under torchrun); the world splits into "
        "WORLD_SIZE / tp data-parallel groups")
    args = ap.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    if args.max_new_tokens < 1:
        raise UsageError("--max_new_tokens must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch_size must be >= 1")
    if args.prompt_len is not None and args.prompt_len < 1:
        raise UsageError("--prompt_len must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise UsageError("need --temperature >= 0, 0 < --top_p <= 1, --top_k >= 0")
    if args.resume and not args.output:
        raise UsageError("--resume needs --output")
    if args.draft == "none":
        return
    if args.gamma != "auto" and args.gamma < 1:
        raise UsageError(f"--gamma must be >= 1 or auto (got {args.gamma}); use --draft none for plain decoding")
    if args.sink < 0:
        raise UsageError("--sink must be >= 0")
    if args.draft_budget < 0 or (args.draft_budget == 0 and args.draft_checkpoint is None):
        raise UsageError("--draft_budget 0 (a full draft cache) needs --draft_checkpoint; self-drafting needs a window")
    if args.draft_budget:
        check_window(args.draft_budget, args.sink, max_gamma(args.gamma))
        if args.draft_cache == "snapkv":
            snap_split(args.draft_budget, args.sink, max_gamma(args.gamma))


def check_window(budget: int, sink: int, gmax: int):
    """A draft window must hold a verify's gmax + 1 new positions beside its sinks."""
    if budget - sink < gmax + 1:
        raise UsageError(f"--draft_budget {budget} leaves fewer than gamma+1 = {gmax + 1} recent slots after "
                         f"--sink {sink}: need a budget >= {sink + gmax + 1}")


def snap_split(budget: int, sink: int, gmax: int, ring: int | None = None) -> tuple[int, int]:
    """A snapkv budget -> (selected slots, recent-ring slots); ring None: half the budget."""
    ring = budget // 2 if ring is None else ring
    if not gmax + 1 <= ring <= budget - sink:
        raise UsageError(f"snapkv: a ring of {ring} slots of --draft_budget {budget} needs gamma+1 = {gmax + 1} <= "
                         f"ring <= budget - --sink {sink} (the sinks are among the selected slots)")
    return budget - ring, ring


def device_of(args, world: tp.World) -> torch.device:
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise UsageError(f"--device {args.device}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device here")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", world.local_rank)
    return device


def dtype_of(args, device: torch.device, cfg: ModelArgs) -> torch.dtype:
    """The activations' dtype of a model: --dtype, else bfloat16 on CUDA and for a quantized
    checkpoint (torch's CPU int8 / int4 kernels take a slow path with float32), else float32."""
    return getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" or cfg.quant else "float32"))


# ----------------------------------------------------------------------------------- --output file
class Output:
    """The --output JSONL file: one line per finished prompt, appended whole under a file lock
    (data-parallel groups of one job append to the same file; a kill leaves at most one cut line at
    the end, which --resume drops). While a job runs, its first rank holds PATH.lock: a second job
    on the same file is refused instead of interleaving with it."""

    def __init__(self, path, resume: bool):
        self.path, self.resume, self.lock = Path(path), resume, None
        try:  # before the model loads: the file can be written
            with open(self.path, "ab"):
                pass
        except OSError as e:
            raise UsageError(f"--output {self.path}: cannot write it ({e.strerror or e})") from None

    def claim(self) -> set:
        """Take the job's lock (first rank only), then -> the ids already done (--resume; a cut
        line is removed from the file, under the lock)."""
        lock = self.path.with_name(self.path.name + ".lock")
        while True:  # a lock file that a finishing job unlinks after we opened it does not count
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise UsageError(f"--output {self.path}: cannot create its lock {lock} ({e.strerror or e})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise UsageError(f"--output {self.path} is being written by a run still going ({holder}, holding "
                                 f"{lock.name}): wait for it to end, or write elsewhere") from None
            try:
                if os.path.samestat(os.fstat(fd), os.stat(lock)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.lock = (fd, lock)
        atexit.register(self.release)
        if not self.resume and self.path.stat().st_size:
            self.release()
            raise UsageError(f"--output {self.path} exists and is not empty: pass --resume to continue it, or remove it")
        return self.done_ids() if self.resume else set()

    def release(self):
        if self.lock:
            fd, lock = self.lock
            lock.unlink(missing_ok=True)  # while holding it: a newcomer then re-opens a fresh file
            os.close(fd)
            self.lock = None

    def done_ids(self) -> set:
        """Ids of the results already in the file; a line cut by a crash is not a result and is
        removed (the file rewritten atomically)."""
        try:
            raw = self.path.read_bytes().split(b"\n")
        except OSError as e:
            raise UsageError(f"--output {self.path}: {e.strerror or e}") from None
        keep, ids = [], set()
        for line in raw:
            try:
                rec = json.loads(line)
                ids.add(rec["id"])
                keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        if len(keep) != len([ln for ln in raw if ln.strip()]) or raw[-1] != b"":
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_bytes(b"".join(ln + b"\n" for ln in keep))
            os.replace(tmp, self.path)
        return ids

    def append(self, res: Result, tok):
        rec = {"id": res.id, "prompt_tokens": res.prompt_tokens, "tokens": res.tokens, "text": tok.decode(res.tokens),
               "finish_reason": res.finish_reason, "accepted": res.accepted, "steps": res.steps}
        data = (json.dumps(rec, ensure_ascii=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, data)
        finally:
            os.close(fd)


def report(args, tok, todo: list[Request], parts: list, B: int, skipped: int, seconds: float):
    """Print and write (--json) what a run made; parts: one per data-parallel group, in order (a
    Generated, or with --output its stats). -> (rows, stats)."""
    if args.output:
        s = stats.merge_stats(parts)
        print(f"done: {s['prompts']} prompts, {s['generated_tokens']} tokens in {seconds:.1f} s"
              + (f" ({skipped} were already in {args.output})" if skipped else "") + f"; results in {args.output}",
              file=sys.stderr)
        rows = []
    else:
        s = stats.merge_stats([p.stats for p in parts])
        new, reasons = [n for p in parts for n in p.tokens], [f for p in parts for f in p.finish_reasons]
        rows = [{"prompt_tokens": len(r.tokens), "tokens": n, "text": tok.decode(n), "finish_reason": f}
                for r, n, f in zip(todo, new, reasons)]
        for i, r in enumerate(rows):
            print(f"--- row {i} ({r['prompt_tokens']} prompt tokens, {len(r['tokens'])} new, {r['finish_reason']})")
            print("..." + tok.decode(todo[i].tokens[-24:]) + r["text"])
    print(stats.stats_line(s, B))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), **({} if args.output else {"rows": rows}),
                                               "stats": s}, indent=1))
    return rows, s


class Progress:
    """A progress bar of prompts, tokens/s and acceptance on a terminal; nothing otherwise."""

    def __init__(self, total: int, shown: bool):
        self.bar, self.tokens, self.t0 = None, 0, time.perf_counter()
        if shown and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="prompt", file=sys.stderr, dynamic_ncols=True)

    def update(self, res: Result, acceptance):
        self.tokens += len(res.tokens)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.tokens / (time.perf_counter() - self.t0):.1f} tok/s, "
                                     f"acceptance {acceptance():.2f}")
            self.bar.update()

    def close(self):
        if self.bar is not None:
            self.bar.close()
