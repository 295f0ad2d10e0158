"""Write long-context prompts (.jsonl, one {"text": ...} object per line) for the decoding benchmarks.

Every document is tokenized with the model's tokenizer, optionally its first --skip_tokens tokens are
dropped (the MagicDec PG-19 protocol drops 8000), and the rest is cut into non-overlapping chunks of
exactly --prompt_len tokens (several lengths at once: one output file per length). A chunk's `text`
is the tokenizer's decode() of exactly those tokens. A chunk is kept only when its text re-encodes
to at least --prompt_len tokens (so `generate.py --prompt_file F --prompt_len N` never runs short;
BPE can merge across the cut and give fewer) and when its text holds no U+FFFD (a cut inside a
multi-byte character). Chunks are taken round-robin over the documents (chunk 0 of every document,
then chunk 1, ...), so a batch mixes documents; the first --num kept chunks are written per length.
Each line: {"text", "tokens" (the text re-encoded, no BOS), "source", "chunk" (index in its
document), "start" (token offset in the document)}.

Inputs (--input, any number, mixed):
  * a directory: every *.txt below it (recursively, sorted) is one document;
  * a .jsonl / .json file (optionally .gz): one JSON object per line whose "text" is a whole book
    (the public PG-19 dumps; "short_book_title" names the source when present);
  * any other file (optionally .gz): PG-19 style, one whole book per line.
Project Gutenberg headers, footers and licence text are cut from every document that carries the
"*** START OF ... PROJECT GUTENBERG EBOOK" / "*** END OF ..." markers.
--skip_tokens defaults to 8000 for PG-19-style files (the paper's protocol) and to 0 for
directories and the default corpus (those books start at their title, and the shorter ones would
lose a large share of their text); a given value applies to every input.

Default corpus (no --input): seven public-domain novels read out of two Debian packages; see
scripts/corpus.py.

Usage:
  python scripts/prepare_data.py                                  # default corpus, 1K/2K/4K/7K
  python scripts/prepare_data.py --prompt_len 4096 --num 256
  python scripts/prepare_data.py --input pg19/test.jsonl --prompt_len 7168 --out pg19_7k.jsonl
  python scripts/prepare_data.py --input my_books/ --skip_tokens 0 --prompt_len 1024 2048

Errors print one line, `error: ...` (after any progress lines), and exit with status 2.
"""
import argparse
import gzip
import io
import json
import os
import sys
import tempfile
import zlib
from array import array
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from any cwd

import cli  # noqa: E402
from cli import ArgParser  # noqa: E402
from convert_checkpoint import default_checkpoint, default_mode  # noqa: E402
from corpus import DEFAULT_CACHE, Doc, default_corpus, strip_gutenberg  # noqa: E402
from model import UsageError  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

DEFAULT_LENS = [1024, 2048, 4096, 7168]
DEFAULT_OUT = ROOT / "data" / "prompts_{len}.jsonl"
PG19_SKIP = 8000  # MagicDec drops the first 8000 tokens of each PG-19 book


# ------------------------------------------------------------------------------ input files

def _open_text(path: Path):
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")


def _base_suffix(path: Path) -> str:
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def read_input(path, skip=None, max_docs=None):
    """Yield the documents of one input path (see the module docstring for the formats)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"input {path} does not exist")
    n = 0
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise UsageError(f"input directory {path} holds no *.txt files")
        for f in files:
            if max_docs is not None and n >= max_docs:
                return
            try:
                text = f.read_text(encoding="utf-8", errors="replace")
            except OSError as e:
                raise UsageError(f"cannot read {f}: {e.strerror or e}") from None
            n += 1
            yield Doc(str(f.relative_to(path)), strip_gutenberg(text), 0 if skip is None else skip)
        return
    skip = PG19_SKIP if skip is None else skip
    is_json = _base_suffix(path) in (".jsonl", ".json")
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, 1):
                if max_docs is not None and n >= max_docs:
                    return
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                source = f"{path.name}:{lineno}"
                if is_json:
                    try:
                        obj = json.loads(line)
                        text = obj["text"]
                        if not isinstance(text, str):
                            raise TypeError
                    except (ValueError, KeyError, TypeError):
                        msg = f'{path}:{lineno}: expected a JSON object with a string "text" field'
                        raise UsageError(msg) from None
                    title = obj.get("short_book_title") or obj.get("title")
                    if isinstance(title, str) and title.strip():
                        source = f"{title.strip()} ({source})"
                else:
                    text = line
                n += 1
                yield Doc(source, strip_gutenberg(text), skip)
    except (OSError, EOFError, zlib.error) as e:
        raise UsageError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


# ------------------------------------------------------------------------------ chunking

def _progress(msg: str, final: bool = False):
    if sys.stderr.isatty():
        print("\r\033[K" + msg, end="\n" if final else "", file=sys.stderr, flush=True)
    elif final:
        print(msg, file=sys.stderr, flush=True)


def _encode(tok, text: str) -> list[int]:
    return tok.encode(text, bos=False)


def make_prompts(docs, tok, lengths, num: int) -> tuple[dict[int, list[dict]], dict[int, int]]:
    """Tokenize docs and cut them (see the module docstring). Returns ({length: records}, {length:
    number of prompts possible}); the latter is exact only for lengths with fewer than num records."""
    toks, sources, n_tok = [], [], 0
    for i, d in enumerate(docs, 1):
        ids = array("l", _encode(tok, d.text)[d.skip:])
        toks.append(ids)
        sources.append(d.source)
        n_tok += len(ids)
        _progress(f"tokenized {i} documents, {n_tok:,} tokens")
    _progress(f"tokenized {len(toks)} documents, {n_tok:,} tokens (after --skip_tokens)", final=True)
    skips = [d.skip for d in docs]
    out, possible = {}, {}
    for n in lengths:
        per_doc = [len(t) // n for t in toks]
        recs, seen = [], 0
        for k in range(max(per_doc, default=0)):
            for j, t in enumerate(toks):
                if k >= per_doc[j]:
                    continue
                if len(recs) >= num:
                    break
                seen += 1
                chunk = t[k * n:(k + 1) * n].tolist()
                text = tok.decode(chunk)
                if "\ufffd" in text:
                    continue
                back = len(_encode(tok, text))
                if back < n:
                    continue
                recs.append({"text": text, "tokens": back, "source": sources[j], "chunk": k,
                             "start": skips[j] + k * n})
            if len(recs) >= num:
                break
            _progress(f"length {n}: {len(recs)}/{num} prompts")
        _progress(f"length {n}: {len(recs)} prompts kept of {seen} chunks checked", final=True)
        out[n] = recs
        possible[n] = len(recs)
    return out, possible


def _write_jsonl(path: Path, recs: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for r in recs:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.chmod(tmp, default_mode())  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------ CLI

def parse_args(argv=None):
    ap = ArgParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                 epilog="Formats, defaults and the default corpus: see the docstring of scripts/prepare_data.py.")
    ap.add_argument("--input", nargs="+", metavar="PATH",
                    help="directory of *.txt, PG-19 .jsonl (field text), or PG-19 text file with one book "
                         "per line (default: the built-in corpus of 7 public-domain novels)")
    ap.add_argument("--prompt_len", type=int, nargs="+", default=DEFAULT_LENS, metavar="N",
                    help=f"prompt length(s) in tokens (default: {' '.join(map(str, DEFAULT_LENS))})")
    ap.add_argument("--num", type=int, default=64, help="prompts per length (default 64)")
    ap.add_argument("--out", help="output path; with several lengths it must contain {len} "
                                  "(default: data/prompts_{len}.jsonl in the repository)")
    ap.add_argument("--skip_tokens", type=int, default=None,
                    help=f"drop each document's first N tokens (default: {PG19_SKIP} for PG-19-style files, "
                         f"0 for directories and the default corpus)")
    ap.add_argument("--max_docs", type=int, default=None, help="read at most N documents per input")
    ap.add_argument("--checkpoint", help="checkpoint directory whose tokenizer to use "
                                         "(default: the built-in SmolLM2-135M, converted on first use)")
    ap.add_argument("--cache_dir", default=str(DEFAULT_CACHE), help="where the default corpus .deb files are kept")
    ap.add_argument("--no_fetch", action="store_true", help="never run apt-get; fail if the default corpus "
                                                            "is not cached")
    a = ap.parse_args(argv)
    if any(n < 1 for n in a.prompt_len):
        raise UsageError("--prompt_len must be >= 1")
    a.prompt_len = list(dict.fromkeys(a.prompt_len))
    if a.num < 1:
        raise UsageError("--num must be >= 1")
    if a.skip_tokens is not None and a.skip_tokens < 0:
        raise UsageError("--skip_tokens must be >= 0")
    if a.max_docs is not None and a.max_docs < 1:
        raise UsageError("--max_docs must be >= 1")
    if a.out is not None and len(a.prompt_len) > 1 and "{len}" not in a.out:
        raise UsageError("--out must contain {len} when several --prompt_len are given")
    return a


def load_tok(checkpoint):
    if checkpoint is None:
        try:
            checkpoint = default_checkpoint()
        except OSError as e:
            raise UsageError(f"default checkpoint: {e}") from None
    if not Path(checkpoint).is_dir():
        raise UsageError(f"--checkpoint {checkpoint} is not a directory")
    return load_tokenizer(checkpoint)


def run(a) -> list[tuple[Path, int, int]]:
    if a.input:
        for p in a.input:  # fail before any slow work
            if not Path(p).exists():
                raise UsageError(f"input {p} does not exist")
    tok = load_tok(a.checkpoint)
    if a.input:
        docs = [d for p in a.input for d in read_input(p, a.skip_tokens, a.max_docs)]
    else:
        docs = default_corpus(a.cache_dir, fetch=not a.no_fetch)
        if a.skip_tokens is not None:
            for d in docs:
                d.skip = a.skip_tokens
        if a.max_docs is not None:
            docs = docs[:a.max_docs]
    if not docs:
        raise UsageError("the input holds no documents")
    recs, possible = make_prompts(docs, tok, a.prompt_len, a.num)
    short = [n for n in a.prompt_len if possible[n] < a.num]
    if short:
        what = ", ".join(f"{possible[n]} prompts of {n} tokens" for n in short)
        raise UsageError(f"corpus too small: only {what} possible ({a.num} requested with --num; "
                         f"{len(docs)} documents); lower --num, --prompt_len or --skip_tokens, or add --input")
    written = []
    for n in a.prompt_len:
        path = Path(a.out.replace("{len}", str(n))) if a.out else Path(str(DEFAULT_OUT).replace("{len}", str(n)))
        try:
            _write_jsonl(path, recs[n])
        except OSError as e:
            raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
        written.append((path, n, len({r["source"] for r in recs[n]})))
    return written


def main(argv=None) -> int:
    a = parse_args(argv)
    for path, n, nsrc in run(a):
        print(f"wrote {path}: {a.num} prompts of {n} tokens from {nsrc} documents")
    return 0


if __name__ == "__main__":
    cli.run(main)
