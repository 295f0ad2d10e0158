"""One tokenizer interface over sentencepiece, tiktoken BPE ranks (LLaMA-3) and byte-level BPE
(vocab + merges from a GGUF file or a Hugging Face tokenizer.json, run by tiktoken).

Special (control) tokens are never produced from text by default: a prompt that contains the
literal text "<|im_end|>" encodes it as ordinary text. Pass allow_special=True, or look ids up in
`special_tokens`, to build chat templates. Non-special added tokens (GGUF user-defined, tokenizer.json
added_tokens with special=false) are matched whole in text, as llama.cpp and HF tokenizers do.
"""
import base64
import json
import unicodedata
from pathlib import Path

import regex
import sentencepiece as spm
import tiktoken

from model import UsageError

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                  r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                 r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# GGUF tokenizer.ggml.pre -> split stages, applied in order like a HF pre_tokenizer Sequence (each
# stage re-splits every piece of the previous one; a piece's end acts as end-of-text for lookaheads).
# "smollm"/"starcoder"/"refact" isolate every digit first (SmolLM2's tokenizer.json: Digits(individual)
# then ByteLevel; llama.cpp does the same). Files without the key get GPT-2's pattern.
GGUF_PRE_TOKENIZERS = {
    **dict.fromkeys(["default", "gpt2", "mpt", "olmo"], [GPT2_PATTERN]),
    **dict.fromkeys(["smollm", "starcoder", "refact"], [r"\p{N}", GPT2_PATTERN]),
    **dict.fromkeys(["llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"], [LLAMA3_PATTERN]),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen"], [QWEN2_PATTERN]),
}
_LLAMA3_FAMILY = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"}


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's printable spelling of bytes: printable latin-1 bytes stand for themselves, the other
    # 68 bytes (controls, space, ...) are shifted to U+0100 and up, in byte order.
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


_B2U = _bytes_to_unicode()
_U2B = {u: b for b, u in _B2U.items()}


def _spelled_bytes(token: str) -> bytes | None:
    """Bytes of a byte-level spelled token ("Ġthe" -> b" the"); None if it is not spelled that way."""
    try:
        return bytes(_U2B[c] for c in token)
    except KeyError:
        return None


def _literal_regex(literals) -> regex.Pattern | None:
    # Longest first, so "<|a|>b" wins over a token that is its prefix.
    literals = sorted(literals, key=len, reverse=True)
    return regex.compile("|".join(map(regex.escape, literals))) if literals else None


def _split_literals(text: str, pattern, table: dict[str, int]):
    """Yield (chunk, None) for ordinary text and (literal, id) for each match of pattern."""
    last = 0
    if pattern is not None:
        for m in pattern.finditer(text):
            if m.start() > last:
                yield text[last:m.start()], None
            yield m.group(), table[m.group()]
            last = m.end()
    if last < len(text):
        yield text[last:], None


class Tokenizer:
    bos_id: int | None
    eos_ids: list[int]
    vocab_size: int
    add_bos: bool
    special_tokens: dict[str, int]  # control-token text -> id (only used with allow_special=True)

    def _init_common(self, bos_id, eos_ids, add_bos, special_tokens):
        self.bos_id = None if bos_id is None else int(bos_id)
        self.eos_ids = list(dict.fromkeys(int(i) for i in eos_ids))
        self.add_bos = bool(add_bos)
        self.special_tokens = dict(special_tokens)
        self._special_re = _literal_regex(self.special_tokens)
        for i in [self.bos_id, *self.eos_ids]:
            if i is not None and not 0 <= i < self.vocab_size:
                raise ValueError(f"special token id {i} is outside the vocabulary (size {self.vocab_size})")
        if self.add_bos and self.bos_id is None:
            raise ValueError("add_bos is set but the tokenizer has no bos_id")

    def encode(self, text: str, bos: bool | None = None, allow_special: bool = False) -> list[int]:
        """bos=None -> self.add_bos. allow_special=True turns control-token text into its id."""
        if bos is None:
            bos = self.add_bos
        if bos and self.bos_id is None:
            raise ValueError("this tokenizer has no BOS token")
        ids = [self.bos_id] if bos else []
        if not allow_special:
            return ids + self._encode_ordinary(text)
        for chunk, tid in _split_literals(text, self._special_re, self.special_tokens):
            ids += [tid] if tid is not None else self._encode_ordinary(chunk)
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    """LLaMA-2 style. decode() follows sentencepiece: control ids (<s>, </s>) render as "", and
    ids outside the vocabulary are treated as <unk> (" ⁇ ")."""

    def __init__(self, sp: spm.SentencePieceProcessor, bos_id=..., eos_ids=..., add_bos=True):
        self._sp = sp
        self.vocab_size = sp.vocab_size()
        if bos_id is ...:
            bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        if eos_ids is ...:
            eos_ids = [sp.eos_id()] if sp.eos_id() >= 0 else []
        control = {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i)}
        self._init_common(bos_id, eos_ids, add_bos, control)

    def _encode_ordinary(self, text):
        return self._sp.encode(text) if text else []

    def decode(self, ids):
        unk = self._sp.unk_id()
        return self._sp.decode([int(i) if 0 <= i < self.vocab_size else unk for i in ids])

    def id_to_piece(self, i):
        return self._sp.id_to_piece(int(i))


class BPETokenizer(Tokenizer):
    """Byte-level BPE run by tiktoken. tiktoken merges the adjacent pair whose concatenated bytes
    have the lowest rank and treats rank as the token id; `rank_to_id` maps ranks to vocab ids when
    the vocabulary is not numbered in merge order. decode() joins token bytes and decodes UTF-8 with
    errors="replace" (so a character split across ids, or ids outside the vocabulary, show as U+FFFD);
    special tokens render as their text."""

    def __init__(self, ranks: dict[bytes, int], split_stages: list[str], *, id_to_bytes: list,
                 rank_to_id: list[int] | None = None, special_tokens=None, added_tokens=None,
                 normalizers=(), bos_id=None, eos_ids=(), add_bos=False, name="bpe"):
        # The last split stage is tiktoken's own pattern; earlier ones run here first (python `regex`).
        *pre, pattern = split_stages or [r"[\s\S]+"]
        self._pre = [regex.compile(p) for p in pre]
        self._enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        self._rank_to_id = rank_to_id
        self._id_to_bytes = id_to_bytes
        self._norm = list(normalizers)
        self._added = dict(added_tokens or {})
        self._added_re = _literal_regex(self._added)
        self.vocab_size = len(id_to_bytes)
        ids = ranks.values() if rank_to_id is None else (rank_to_id[r] for r in ranks.values())
        self._drops = any(not 0 <= i < self.vocab_size for i in ids)  # bytes without a token
        special_tokens = dict(special_tokens or {})
        self._text_ids = {*special_tokens.values(), *self._added.values()}  # spelled as text, not bytes
        self._init_common(bos_id, eos_ids, add_bos, special_tokens)

    def _encode_ordinary(self, text):
        out = []
        for chunk, tid in _split_literals(text, self._added_re, self._added):
            if tid is not None:
                out.append(tid)
                continue
            for form in self._norm:
                chunk = unicodedata.normalize(form, chunk)
            pieces = [chunk]
            for pat in self._pre:
                pieces = [s for p in pieces for s in _isolate(pat, p)]
            for p in pieces:
                ranks = self._enc.encode_ordinary(p)
                out += ranks if self._rank_to_id is None else [self._rank_to_id[r] for r in ranks]
        if self._drops:
            out = [i for i in out if 0 <= i < self.vocab_size]
        return out

    def decode(self, ids):
        n, tb = self.vocab_size, self._id_to_bytes
        # b"\xff" is never valid UTF-8, so an unknown id becomes exactly one U+FFFD.
        out = (tb[i] if 0 <= i < n else None for i in ids)
        return b"".join(b"\xff" if b is None else b for b in out).decode("utf-8", errors="replace")

    def id_to_piece(self, i):
        b = self._id_to_bytes[i] or b""
        return b.decode("utf-8", errors="replace") if i in self._text_ids else "".join(_B2U[c] for c in b)


def _isolate(pat, text):
    # HF Split(behavior="Isolated"): matches and the text between them become separate pieces.
    last = 0
    for m in pat.finditer(text):
        if m.start() > last:
            yield text[last:m.start()]
        if m.end() > m.start():
            yield m.group()
        last = m.end()
    if last < len(text):
        yield text[last:]


# ---------------------------------------------------------------- builders

def _bpe_from_vocab_merges(vocab: dict[str, int], merges, added: list[dict], split_stages, **kw) -> BPETokenizer:
    """vocab: byte-level spelled token -> id; merges: ordered pairs; added: HF-style added_tokens."""
    size = max([*vocab.values(), *(a["id"] for a in added)]) + 1
    id_to_bytes = [None] * size
    bytes_to_id = {}
    for tok, i in vocab.items():
        b = _spelled_bytes(tok)
        id_to_bytes[i] = b if b is not None else tok.encode()  # unreachable by BPE; decodes as its text
        if b is not None:
            bytes_to_id.setdefault(b, i)
    special, plain = {}, {}
    for a in added:
        (special if a.get("special") else plain)[a["content"]] = a["id"]
        id_to_bytes[a["id"]] = a["content"].encode()
    # HF merges in list order; tiktoken merges by lowest rank of the merged bytes. So a merged token's
    # rank is the index of the first merge producing it (single bytes rank below all merges).
    ranks = {bytes([b]): b for b in range(256)}
    for k, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        merged = _spelled_bytes(a + b)
        if merged is None or merged not in bytes_to_id:
            raise ValueError(f"merge {a!r} + {b!r} makes a token missing from the vocab")
        ranks.setdefault(merged, 256 + k)
    # tiktoken needs every single byte. Bytes the vocab lacks (SmolLM2 has no token for e.g. 0x04 or
    # 0xFF) get an id outside the vocab and are dropped after encoding, as HF tokenizers and llama.cpp do.
    ids = {t: bytes_to_id.get(t, size + t[0]) for t in ranks}
    # Only multi-byte tokens' relative order matters to merging: if vocab ids already follow merge
    # order (typical), ids serve as ranks directly; otherwise keep a rank -> id table.
    order = sorted((r, ids[t]) for t, r in ranks.items() if len(t) > 1)
    if all(x[1] < y[1] for x, y in zip(order, order[1:])):
        mergeable, rank_to_id = ids, None
    else:
        mergeable, rank_to_id = ranks, [-1] * (max(ranks.values()) + 1)
        for t, r in ranks.items():
            rank_to_id[r] = ids[t]
    return BPETokenizer(mergeable, split_stages, id_to_bytes=id_to_bytes, rank_to_id=rank_to_id,
                        special_tokens=special, added_tokens=plain, **kw)


def _hf_split_stages(pt) -> list[str]:
    """HF pre_tokenizer JSON -> split regexes. Only byte-level setups are supported."""
    if pt is None:
        raise ValueError("tokenizer.json has no pre_tokenizer; only byte-level BPE is supported")
    items, stages, byte_level = [pt], [], False
    while items:
        p = items.pop(0)
        kind = p.get("type")
        if kind == "Sequence":
            items = list(p["pretokenizers"]) + items
            continue
        if byte_level:
            raise ValueError(f"tokenizer.json pre_tokenizer {kind!r} after ByteLevel is not supported")
        if kind == "ByteLevel":
            if p.get("add_prefix_space"):
                raise ValueError("tokenizer.json ByteLevel add_prefix_space=true is not supported")
            if p.get("use_regex", True):
                stages.append(GPT2_PATTERN)
            byte_level = True
        elif kind == "Split":
            if p.get("behavior") != "Isolated" or p.get("invert"):
                raise ValueError(f"tokenizer.json Split behavior {p.get('behavior')!r} (invert={p.get('invert')}) is not supported")
            pat = p["pattern"]
            stages.append(pat["Regex"] if "Regex" in pat else _escape(pat["String"]))
        elif kind == "Digits":
            stages.append(r"\p{N}" if p.get("individual_digits") else r"\p{N}+")
        else:
            raise ValueError(f"tokenizer.json pre_tokenizer {kind!r} is not supported")
    if not byte_level:
        raise ValueError("tokenizer.json is not byte-level BPE (no ByteLevel pre_tokenizer)")
    return stages


def _escape(s: str) -> str:
    # Escape only characters that are meta in every regex dialect (tiktoken's fancy-regex included).
    return "".join("\\" + c if c in "\\.^$|?*+()[]{}" else c for c in s)


def _hf_normalizers(n) -> list[str]:
    if n is None:
        return []
    items = n["normalizers"] if n.get("type") == "Sequence" else [n]
    forms = [x.get("type") for x in items]
    bad = [f for f in forms if f not in ("NFC", "NFD", "NFKC", "NFKD")]
    if bad:
        raise ValueError(f"tokenizer.json normalizer {bad[0]!r} is not supported")
    return forms


def _bpe_from_hf_json(tj: dict, **kw) -> BPETokenizer:
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer.json model type {model.get('type')!r} is not supported (need 'BPE')")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError("tokenizer.json BPE with continuing_subword_prefix / end_of_word_suffix is not supported")
    return _bpe_from_vocab_merges(model["vocab"], model["merges"], tj.get("added_tokens") or [],
                                  _hf_split_stages(tj.get("pre_tokenizer")),
                                  normalizers=_hf_normalizers(tj.get("normalizer")), **kw)


LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>",
    *[f"<|reserved_special_token_{i}|>" for i in range(4)],
    "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>",
    *[f"<|reserved_special_token_{i}|>" for i in range(5, 251)],
]  # 256 tokens, ids right after the ranks


def _looks_like_tiktoken_ranks(path: Path) -> bool:
    with open(path, "rb") as f:
        line = f.readline(4096).strip()
    return regex.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", line) is not None


def _tiktoken_from_ranks_file(path: Path, **kw) -> BPETokenizer:
    ranks = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if line.strip():
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"line {n} is not a tiktoken ranks line: {line[:80]!r}") from e
    n_ranks = len(ranks)
    if sorted(ranks.values()) != list(range(n_ranks)):
        raise ValueError(f"ranks are not 0..{n_ranks - 1}")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError("tiktoken ranks must include all 256 single bytes")
    id_to_bytes = [b""] * n_ranks
    for t, r in ranks.items():
        id_to_bytes[r] = t
    special = {s: n_ranks + i for i, s in enumerate(LLAMA3_SPECIAL_TOKENS)}
    id_to_bytes += [s.encode() for s in LLAMA3_SPECIAL_TOKENS]
    kw.setdefault("bos_id", special["<|begin_of_text|>"])
    kw.setdefault("eos_ids", [special["<|end_of_text|>"], special["<|eot_id|>"]])
    kw.setdefault("add_bos", True)
    return BPETokenizer(ranks, [LLAMA3_PATTERN], id_to_bytes=id_to_bytes, special_tokens=special,
                        name=path.name, **kw)


def read_json(path) -> dict:
    """A JSON object from a file; anything else is a UsageError naming the file."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(d, dict):
        raise UsageError(f"{path}: expected a JSON object, not {type(d).__name__}")
    return d


def _token_ids(x, where) -> list[int]:
    ids = x if isinstance(x, list) else [] if x is None else [x]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise UsageError(f"{where} must be a token id or a list of them, not {x!r}")
    return ids


def hf_special_tokens(d) -> dict:
    """bos_id / eos_ids / add_bos as a Hugging Face model directory states them, resolved as
    transformers does; what no file states is left out (the tokenizer file's own default applies).
    - add_bos and bos_id: with a tokenizer.json, its post-processor alone decides (transformers then
      ignores tokenizer_config.json's add_bos_token): BOS is the special token its template puts
      before the text, if any. Without one: tokenizer_config.json's add_bos_token.
    - bos_id otherwise: tokenizer_config.json's bos_token, else generation_config.json's, else
      config.json's bos_token_id.
    - eos_ids: generation_config.json's eos_token_id (what generate() stops on: a list in Llama 3
      instruct models, whose config.json may name only one), else config.json's, else
      tokenizer_config.json's eos_token."""
    d = Path(d)
    files = {f: read_json(d / f) if (d / f).is_file() else {}
             for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json")}
    tj, tc = files["tokenizer.json"], files["tokenizer_config.json"]
    vocab = {**((tj.get("model") or {}).get("vocab") or {}),
             **{a.get("content"): a.get("id") for a in tj.get("added_tokens") or []}}

    def named(key):  # tokenizer_config.json's token text (or {"content": text}) -> its id
        t = tc.get(key)
        return vocab.get(t.get("content") if isinstance(t, dict) else t)

    def stated(key):  # the first of generation_config.json, config.json that has the key
        f = next((f for f in ("generation_config.json", "config.json") if files[f].get(key) is not None), None)
        return _token_ids(files[f][key], f"{d / f}: {key}") if f else []

    out = {}
    if (d / "tokenizer.json").is_file():
        out["add_bos"] = False
        pp = tj.get("post_processor") or {}
        for p in pp.get("processors", [pp]):
            first = p.get("type") == "TemplateProcessing" and (p.get("single") or [{}])[0].get("SpecialToken")
            if first:
                ids = (p.get("special_tokens") or {}).get(first["id"], {}).get("ids") or [vocab.get(first["id"])]
                out["bos_id"] = _token_ids(ids[0], f"{d / 'tokenizer.json'}: the post_processor's first token")[0]
                out["add_bos"] = True
                break
    elif "add_bos_token" in tc:
        out["add_bos"] = bool(tc["add_bos_token"])
    if "bos_id" not in out:
        bos = [named("bos_token")] if named("bos_token") is not None else stated("bos_token_id")
        if bos:
            out["bos_id"] = bos[0]
        elif out.get("add_bos"):
            out["add_bos"] = False  # nothing to add (transformers drops the flag too)
    eos = stated("eos_token_id") or ([named("eos_token")] if named("eos_token") is not None else [])
    if eos:
        out["eos_ids"] = eos
    return out


def load_tokenizer(checkpoint_dir) -> Tokenizer:
    """tokenizer.model (sentencepiece, or tiktoken ranks) or tokenizer.json (byte-level BPE), in that
    order. bos_id / eos_ids / add_bos: a converted checkpoint's config.json has them (the converter
    wrote what this function resolved on its source); any other directory gets hf_special_tokens(),
    then the tokenizer file's own. A missing, corrupt or unsupported tokenizer, or one with more ids
    than config.json's vocab_size, is a UsageError naming the file."""
    d = Path(checkpoint_dir)
    cfg = read_json(d / "config.json") if (d / "config.json").is_file() else {}
    keys = ("bos_id", "eos_ids", "add_bos")
    path = next((d / f for f in ("tokenizer.model", "tokenizer.json") if (d / f).is_file()), None)
    if path is None:
        raise UsageError(f"no tokenizer in {d}: looked for tokenizer.model or tokenizer.json")
    try:
        kw = {k: cfg[k] for k in keys} if all(k in cfg for k in keys) else hf_special_tokens(d)
        if path.name == "tokenizer.json":
            tok = _bpe_from_hf_json(read_json(path), name=path.name, **kw)
        elif _looks_like_tiktoken_ranks(path):
            tok = _tiktoken_from_ranks_file(path, **kw)
        else:
            sp = spm.SentencePieceProcessor()
            try:
                sp.load(str(path))
            except Exception as e:  # sentencepiece raises RuntimeError / OSError on junk
                raise ValueError(f"neither a sentencepiece model nor a tiktoken ranks file ({e})") from None
            tok = SentencePieceTokenizer(sp, **kw)
    except UsageError:
        raise
    # a corrupt file fails anywhere in the builders
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, regex.error) as e:
        why = f"no {e}" if isinstance(e, KeyError) else str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"{path}: not a usable tokenizer ({why})") from None
    n = cfg.get("vocab_size")
    if isinstance(n, int) and tok.vocab_size > n:
        raise UsageError(f"{path} has another vocabulary than the model: {tok.vocab_size} ids, "
                         f"{d / 'config.json'} has {n}")
    return tok


# ---------------------------------------------------------------- GGUF

def _gguf_tokenizer_json(src) -> tuple[dict, dict]:
    """GGUF tokenizer.ggml.* -> (HF tokenizer.json dict, {"bos_id", "eos_ids", "add_bos"})."""
    import gguf  # only needed for GGUF sources

    reader = src if isinstance(src, gguf.GGUFReader) else gguf.GGUFReader(str(src))

    def get(key, default=None):
        f = reader.fields.get(f"tokenizer.ggml.{key}")
        return default if f is None else f.contents()

    model = get("model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer.ggml.model {model!r} is not supported (only 'gpt2' byte-level BPE)")
    pre = get("pre", "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"unknown GGUF tokenizer.ggml.pre {pre!r} (known: {', '.join(sorted(GGUF_PRE_TOKENIZERS))})")
    tokens, merges = get("tokens"), get("merges")
    if not tokens or merges is None:
        raise ValueError("GGUF file has no tokenizer.ggml.tokens / tokenizer.ggml.merges")
    types = get("token_type") or [1] * len(tokens)
    # token_type 3 = control -> special; 4 = user-defined -> added but matched in text (like llama.cpp).
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": ty == 3}
             for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)]
    bos = get("bos_token_id")
    bos = int(bos) if bos is not None and 0 <= bos < len(tokens) else None
    eos = [get(k) for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    eos = list(dict.fromkeys(int(e) for e in eos if e is not None and 0 <= e < len(tokens)))
    add_bos = get("add_bos_token")  # absent: only LLaMA-3-style vocabularies want BOS by default
    add_bos = bool(pre in _LLAMA3_FAMILY if add_bos is None else add_bos) and bos is not None
    meta = {"bos_id": bos, "eos_ids": eos, "add_bos": add_bos}

    seq = [{"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": False}
           for p in GGUF_PRE_TOKENIZERS[pre]]
    seq.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False})
    post = None
    if add_bos:
        bos_tok = tokens[bos]
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos_tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos_tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos_tok, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos_tok: {"id": bos_tok, "ids": [bos], "tokens": [bos_tok]}}}
    tj = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": seq},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in merges]},
    }
    return tj, meta


def write_gguf_tokenizer(gguf_reader_or_path, out_dir) -> dict:
    """Write out_dir/tokenizer.json from a GGUF file; return {"bos_id", "eos_ids", "add_bos"} for config.json."""
    tj, meta = _gguf_tokenizer_json(gguf_reader_or_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    return meta
