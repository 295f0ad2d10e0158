"""Public-domain book texts for the benchmarks: Project Gutenberg clean-up, and the built-in default
corpus that scripts/prepare_data.py cuts into prompts.

The default corpus: seven complete public-domain novels from two Debian packages (main,
bookworm), fetched once with `apt-get download` into a cache directory (default data/cache/, gitignored;
prepare_data.py --cache_dir)
and read straight from the .deb (no R, nothing installed; if apt cannot find the package and we are
root, `apt-get update` is run once):
  * r-cran-janeaustenr 1.0.0-1 (CRAN janeaustenr 1.0.0 by Julia Silge; package licence MIT):
    Jane Austen's six novels, Project Gutenberg texts with the PG headers already removed:
    Sense and Sensibility (1811), Pride and Prejudice (1813), Mansfield Park (1814), Emma (1815),
    Northanger Abbey (1817; its closing modern "A Note on the Text" is cut), Persuasion (1817).
  * r-cran-tokenizers 0.3.0-1 (CRAN tokenizers 0.3.0 by Lincoln Mullen et al.; package licence
    MIT): its `mobydick` data set, Herman Melville's Moby-Dick; or, The Whale (1851), Project
    Gutenberg EBook #2701 (header, "Produced by" line and licence footer cut here).
The novels themselves are in the public domain (authors died 1817 and 1891). The texts live in the
packages' R lazy-load databases (data/Rdata.rdx + Rdata.rdb: zlib-compressed R serializations of
character vectors), which this script decodes itself. With the SmolLM2 tokenizer the seven books
come to 1.31M tokens (Sense and Sensibility 168K, Pride and Prejudice 168K, Mansfield Park 217K,
Emma 222K, Northanger Abbey 105K, Persuasion 116K, Moby-Dick 317K): at most 179 prompts of 7168
tokens, 312 of 4096, 629 of 2048, 1262 of 1024 (the --num ceiling for the default corpus).
The pinned versions are tried first; if the archive no longer has them the current version is used
with a warning, and a text that differs from the checksums in DEFAULT_CORPUS is reported.
"""
import bz2
import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from any cwd

from model import UsageError  # noqa: E402

DEFAULT_CACHE = ROOT / "data" / "cache"


class Doc:
    __slots__ = ("source", "text", "skip")

    def __init__(self, source: str, text: str, skip: int = 0):
        self.source, self.text, self.skip = source, text, skip


# ------------------------------------------------------------------------------ Project Gutenberg

_PG_START = re.compile(
    r"^[ \t]*\*{3}[ \t]*START OF (?:THIS|THE) PROJECT GUTENBERG E-?BOOK.*$"
    r"|^[ \t]*\*END\*[ \t]*THE SMALL PRINT!.*$", re.I | re.M)
_PG_END = re.compile(
    r"^[ \t]*\*{3}[ \t]*END OF (?:THIS|THE) PROJECT GUTENBERG E-?BOOK"
    r"|^[ \t]*End of (?:the )?Project Gutenberg(?:'s)?\b", re.I | re.M)
_PG_CREDIT = re.compile(r"\s*(?:Produced|Prepared|Transcribed|E-?text prepared) by\b[^\n]*(?:\n[^\n]+)*", re.I)


def strip_gutenberg(text: str) -> str:
    """Cut the Project Gutenberg header (through the START marker and a following "Produced by"
    paragraph) and everything from the first end-of-book marker on. Text without the markers is
    returned unchanged (besides a BOM and CRLF line ends, which are normalized for every input)."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    starts = list(_PG_START.finditer(text))
    if starts:
        text = text[starts[-1].end():]  # the old "small print" header precedes the START line
        credit = _PG_CREDIT.match(text)
        if credit:
            text = text[credit.end():]
    end = _PG_END.search(text)
    if end and (starts or end.start() > len(text) // 2):
        text = text[:end.start()]
    return text.strip("\n")


# ------------------------------------------------------------------------------ default corpus

# (Debian package, pinned version, R package dir, [(R object, source id, title, sha256 of
# the text as prepared here, UTF-8)])
DEFAULT_CORPUS = [
    ("r-cran-janeaustenr", "1.0.0-1", "janeaustenr", [
        ("sensesensibility", "austen-sense-and-sensibility", "Sense and Sensibility (Jane Austen, 1811)",
         "0996d90842bbe8093f3b8142c1e77d1b20cff52d1d0615f3ed67733653e74e26"),
        ("prideprejudice", "austen-pride-and-prejudice", "Pride and Prejudice (Jane Austen, 1813)",
         "2e44edaa4946d64ad541c68e0224f5d672f43bf3ce2a8a0b0637ad5e02fc6eb3"),
        ("mansfieldpark", "austen-mansfield-park", "Mansfield Park (Jane Austen, 1814)",
         "e0e9ef3863ea77f51f6070062ee0dd50ad9b933223880617629e4e4963ea40ff"),
        ("emma", "austen-emma", "Emma (Jane Austen, 1815)",
         "dd08b340a56ad4a0a00718d5682528a5a5886ae0aef91c9e0fa528074fa64b75"),
        ("northangerabbey", "austen-northanger-abbey", "Northanger Abbey (Jane Austen, 1817)",
         "aefa520645abc5e33e5f78592e905227ad6f2c2e36ccfc15d10b40660b66c662"),
        ("persuasion", "austen-persuasion", "Persuasion (Jane Austen, 1817)",
         "726513a6c18bb678427bcbcf7c72d0d20816a67c25b0471b26ddcabf3ebac140"),
    ]),
    ("r-cran-tokenizers", "0.3.0-1", "tokenizers", [
        ("mobydick", "melville-moby-dick", "Moby-Dick; or, The Whale (Herman Melville, 1851)",
         "97755d7199110b87f27a51e92f4af9c7081ad8ddd25db311d811200b16fc257a"),
    ]),
]


def _cached_deb(cache: Path, name: str, version: str | None) -> Path | None:
    pat = f"{name}_{version.replace(':', '%3a')}_*.deb" if version else f"{name}_*.deb"
    found = sorted(cache.glob(pat))
    return found[-1] if found else None


def _apt(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["apt-get", "-q", *args], cwd=cwd, capture_output=True, text=True)


def fetch_deb(name: str, version: str, cache: Path, fetch: bool = True) -> Path:
    """The cached .deb of name=version (or, failing that, of any version), downloading it with
    `apt-get download` when missing and fetch is set."""
    hit = _cached_deb(cache, name, version) or _cached_deb(cache, name, None)
    if hit or not fetch:
        if hit:
            return hit
        raise UsageError(f"the default corpus is not in {cache} ({name} {version} missing) and fetching "
                         f"is off: run without --no_fetch once, or pass --input")
    if shutil.which("apt-get") is None:
        raise UsageError(f"the default corpus comes from the Debian package {name}; apt-get is not available "
                         f"here: put {name}_{version}_*.deb into {cache}, or pass --input")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".apt-", dir=cache))
    try:
        print(f"fetching {name}={version} with apt-get download -> {cache}", file=sys.stderr)
        r = _apt(["download", f"{name}={version}"], tmp)
        if r.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            print("apt-get could not find it; running apt-get update once", file=sys.stderr)
            _apt(["update"], tmp)
            r = _apt(["download", f"{name}={version}"], tmp)
        if r.returncode != 0:
            r2 = _apt(["download", name], tmp)
            if r2.returncode == 0:
                print(f"warning: {name} {version} is no longer in the archive; using its current version",
                      file=sys.stderr)
            r = r2
        debs = sorted(tmp.glob("*.deb"))
        if r.returncode != 0 or not debs:
            msg = (r.stderr.strip().splitlines() or ["no .deb written"])[-1]
            raise UsageError(f"apt-get download {name} failed ({msg}); run apt-get update as root, "
                             f"or pass --input")
        dest = cache / debs[0].name
        os.replace(debs[0], dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def deb_files(deb: Path, wanted: dict[str, str]) -> dict[str, bytes]:
    """Read members of a .deb's data archive: wanted maps a key to the path's end ("x/data/Rdata.rdb").
    Parses the ar container and the (xz/gz/bz2/plain) tar with the standard library."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise UsageError(f"{deb} is not a Debian package")
    pos, data = 8, None
    while pos + 60 <= len(blob):
        hdr = blob[pos:pos + 60]
        member = hdr[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(hdr[48:58].decode("ascii").strip())
        if member.startswith("data.tar"):
            data = (member, blob[pos + 60:pos + 60 + size])
            break
        pos += 60 + size + (size & 1)
    if data is None:
        raise UsageError(f"{deb} has no data.tar member")
    member, payload = data
    if member.endswith(".xz"):
        payload = lzma.decompress(payload)
    elif member.endswith(".gz"):
        payload = gzip.decompress(payload)
    elif member.endswith(".bz2"):
        payload = bz2.decompress(payload)
    elif member != "data.tar":  # e.g. zstd: let dpkg-deb unpack it
        try:
            payload = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                                     check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            raise UsageError(f"{deb}: cannot unpack {member} (dpkg-deb is needed for it)") from None
    out = {}
    with tarfile.open(fileobj=io.BytesIO(payload)) as tf:
        for ti in tf:
            for key, end in wanted.items():
                if ti.isfile() and ti.name.endswith(end):
                    out[key] = tf.extractfile(ti).read()
    missing = sorted(set(wanted) - set(out))
    if missing:
        raise UsageError(f"{deb} lacks {', '.join(wanted[k] for k in missing)}")
    return out


class _RUnserializer:
    """Just enough of R's XDR serialization format (version 2/3) for character vectors, the lists
    and integer/logical/real vectors of a lazy-load index, and their attributes."""

    def __init__(self, buf: bytes):
        if buf[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.b, self.p, self.refs = buf, 2, []
        version = self.int()
        self.p += 8  # writer's and minimal reader's R versions
        if version == 3:
            n = self.int()  # native encoding name
            self.p += n

    def int(self) -> int:
        v = struct.unpack_from(">i", self.b, self.p)[0]
        self.p += 4
        return v

    def item(self):
        flags = self.int()
        t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if t in (254, 242, 253):  # NILVALUE, EMPTYENV, GLOBALENV
            return None
        if t == 255:  # REFSXP
            return self.refs[(flags >> 8) - 1]
        if t == 1:  # SYMSXP
            sym = self.item()
            self.refs.append(sym)
            return sym
        if t == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None  # NA_character_
            raw = self.b[self.p:self.p + n]
            self.p += n
            return raw.decode("latin-1" if (flags >> 12) & 4 else "utf-8", errors="replace")
        if t == 2:  # LISTSXP (pairlist): returned as {tag: value}
            out = {}
            while True:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else None
                out[tag] = self.item()
                flags = self.int()
                t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
                if t == 254:
                    return out
                if t != 2:
                    raise ValueError(f"unexpected R type {t} in a pairlist")
        if t in (10, 13, 14, 16, 19):  # LGLSXP INTSXP REALSXP STRSXP VECSXP
            n = self.int()
            if t in (10, 13):
                v = list(struct.unpack_from(f">{n}i", self.b, self.p))
                self.p += 4 * n
            elif t == 14:
                v = list(struct.unpack_from(f">{n}d", self.b, self.p))
                self.p += 8 * n
            else:
                v = [self.item() for _ in range(n)]
            attrs = self.item() if has_attr else None
            names = (attrs or {}).get("names")
            return dict(zip(names, v)) if names is not None and len(names) == len(v) else v
        raise ValueError(f"unsupported R type {t}")


def _decompress(b: bytes) -> bytes:
    if b[:2] == b"\x1f\x8b":
        return gzip.decompress(b)
    if b[:3] == b"BZh":
        return bz2.decompress(b)
    if b[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(b)
    return b


def read_r_lazyload(rdx: bytes, rdb: bytes) -> dict:
    """{name: value} of an R lazy-load database (e.g. a package's data/Rdata.rdx + Rdata.rdb)."""
    index = _RUnserializer(_decompress(rdx)).item()
    compressed = (index.get("compressed") or [1])[0]
    out = {}
    for name, (off, length) in index["variables"].items():
        blob = rdb[off:off + length]
        size = struct.unpack(">I", blob[:4])[0]
        if compressed in (2, 3) or blob[4:5] in (b"Z", b"2", b"X", b"0"):
            kind, body = blob[4:5], blob[5:]
            raw = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress,
                   b"0": lambda x: x}[kind](body)
        else:
            raw = zlib.decompress(blob[4:])
        if len(raw) != size:
            raise ValueError(f"R object {name}: {len(raw)} bytes, expected {size}")
        out[name] = _RUnserializer(raw).item()
    return out


def _book_text(obj_name: str, value) -> str:
    lines = value if isinstance(value, list) else list(value.values())
    text = "\n".join("" if s is None else s for s in lines)
    text = strip_gutenberg(text)
    if obj_name == "northangerabbey":  # a modern editorial note closes this edition
        cut = text.rfind("\nA NOTE ON THE TEXT")
        if cut > 0:
            text = text[:cut]
    if obj_name == "mobydick":  # the e-text's transcriber's notes sit between title and Etymology
        a, b = text.find("Original Transcriber's Notes:"), text.find("\nETYMOLOGY.")
        if 0 <= a < b:
            text = text[:a] + text[b + 1:]
    return text.strip("\n")


def default_corpus(cache_dir=DEFAULT_CACHE, fetch: bool = True) -> list[Doc]:
    """The built-in corpus (see the module docstring), fetched into cache_dir on first use."""
    cache = Path(cache_dir)
    docs = []
    for pkg, version, rdir, books in DEFAULT_CORPUS:
        deb = fetch_deb(pkg, version, cache, fetch)
        files = deb_files(deb, {"rdx": f"/{rdir}/data/Rdata.rdx", "rdb": f"/{rdir}/data/Rdata.rdb"})
        try:
            objs = read_r_lazyload(files["rdx"], files["rdb"])
        except (ValueError, KeyError, TypeError, struct.error, zlib.error, lzma.LZMAError, OSError) as e:
            raise UsageError(f"{deb.name}: cannot read its R data ({e})") from None
        for obj, source, title, sha in books:
            if obj not in objs:
                raise UsageError(f"{deb.name} has no R data set {obj!r}")
            text = _book_text(obj, objs[obj])
            if hashlib.sha256(text.encode("utf-8")).hexdigest() != sha:
                print(f"warning: {title} from {deb.name} differs from the text this script was written for",
                      file=sys.stderr)
            docs.append(Doc(f"{source}: {title}", text, 0))
    return docs


def default_corpus_cached(cache_dir=DEFAULT_CACHE) -> bool:
    cache = Path(cache_dir)
    return all(_cached_deb(cache, pkg, v) or _cached_deb(cache, pkg, None) for pkg, v, _, _ in DEFAULT_CORPUS)
