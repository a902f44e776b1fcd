"""Tokenizers: a trained byte-level BPE (HF ``tokenizers``) or a tiktoken ranks file.

Both kinds are lossless on arbitrary text (byte-level), never parse special
tokens out of raw text, and expose the four special ids the model uses:

    pad_id, bos_id, endofchunk_id, mask_id

For tokenizers trained here they sit at the END of the vocabulary,
``pad=V-4, bos=V-3, endofchunk=V-2, mask=V-1`` (the model's default
mask_token_id is V-1), exactly as Steerling does. A tiktoken ranks file for
cl100k_base (100256 ranks) gets cl100k's own specials plus Steerling's
``<|pad|>, <|bos|>, <|endofchunk|>, <|mask|>`` at 100277..100280; any other
ranks file gets the four specials right after its last rank.

On disk a tokenizer is either ``tokenizer.json`` (HF) or a ranks file plus
``tokenizer_spec.json`` (``{"type": "tiktoken", "ranks": ..., "pattern": ...,
"special_tokens": {...}}``). ``load`` accepts either file or a directory.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable

import numpy as np
from etils import epath

from cbm_lm.atomic_io import write_text_atomic

SPECIALS = ("<|pad|>", "<|bos|>", "<|endofchunk|>", "<|mask|>")
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
                  r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
CL100K_NUM_RANKS = 100256
CL100K_SPECIALS = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                   "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}
STEERLING_SPECIAL_IDS = dict(zip(SPECIALS, range(100277, 100281)))
SPEC_FILE = "tokenizer_spec.json"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-char table used by HF ByteLevel."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class Tokenizer:
    """Uniform wrapper: ``encode``, ``encode_with_offsets``, ``decode``, special ids."""

    def __init__(self, kind: str, impl, token_bytes: list[bytes], special_tokens: dict[str, int],
                 spec: dict | None = None):
        self.kind = kind
        self._impl = impl
        self._spec = spec or {}
        self.special_tokens = dict(special_tokens)
        missing = [s for s in SPECIALS if s not in self.special_tokens]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}")
        self._token_len = np.array([len(b) for b in token_bytes], dtype=np.int64)

    # -- special ids ------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._token_len)

    @property
    def pad_id(self) -> int:
        return self.special_tokens["<|pad|>"]

    @property
    def bos_id(self) -> int:
        return self.special_tokens["<|bos|>"]

    @property
    def endofchunk_id(self) -> int:
        return self.special_tokens["<|endofchunk|>"]

    @property
    def mask_id(self) -> int:
        return self.special_tokens["<|mask|>"]

    # -- coding -----------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings are encoded as plain text."""
        if self.kind == "hf":
            return self._impl.encode(text, add_special_tokens=False).ids
        return self._impl.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "hf":
            return [e.ids for e in self._impl.encode_batch(texts, add_special_tokens=False)]
        return self._impl.encode_ordinary_batch(texts)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            return self._impl.decode(ids, skip_special_tokens=False)
        return self._impl.decode(ids)

    def char_offsets(self, text: str, ids) -> tuple[np.ndarray, np.ndarray]:
        """Character span [start, end) of each token of ``ids`` = encode(text).

        Computed from the exact byte length of every token, so it is right
        for both kinds; a token that ends inside a multi-byte character
        overlaps that character.  Shapes: int64 [len(ids)] each.
        """
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        ends_b = np.cumsum(self._token_len[ids])
        starts_b = ends_b - self._token_len[ids]
        raw = text.encode("utf-8")
        if ends_b[-1] != len(raw):
            raise ValueError(f"token bytes ({ends_b[-1]}) do not add up to the text "
                             f"({len(raw)} bytes); is the tokenizer byte-level?")
        if len(raw) == len(text):
            return starts_b, ends_b
        b = np.frombuffer(raw, np.uint8)
        char_of_byte = np.cumsum((b & 0xC0) != 0x80) - 1
        return char_of_byte[starts_b], char_of_byte[ends_b - 1] + 1

    # -- persistence ------------------------------------------------------
    def save(self, directory) -> epath.Path:
        """Writes the tokenizer into ``directory``; returns the main file. Each file is
        written whole or not at all (a tokenizer the corpus was built with stays readable)."""
        d = epath.Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self.kind == "hf":
            out = d / "tokenizer.json"
            write_text_atomic(out, self._impl.to_str(pretty=False))
            return out
        ranks = d / "tokenizer.tiktoken"
        lines = [f"{base64.b64encode(t).decode()} {r}"
                 for t, r in sorted(self._impl._mergeable_ranks.items(), key=lambda kv: kv[1])]
        write_text_atomic(ranks, "\n".join(lines) + "\n")
        spec = dict(self._spec, ranks="tokenizer.tiktoken")
        write_text_atomic(d / SPEC_FILE, json.dumps(spec, indent=1, sort_keys=True))
        return d / SPEC_FILE


def _from_hf(tok) -> Tokenizer:
    tok.encode_special_tokens = True  # never parse "<|pad|>" etc. out of raw text
    inv = _bytes_to_unicode()
    char_to_byte = {c: b for b, c in inv.items()}
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    table = [b""] * tok.get_vocab_size(with_added_tokens=True)
    for s, i in tok.get_vocab(with_added_tokens=True).items():
        table[i] = s.encode() if s in added else bytes(char_to_byte[c] for c in s)
    specials = {s: tok.token_to_id(s) for s in SPECIALS if tok.token_to_id(s) is not None}
    return Tokenizer("hf", tok, table, specials)


def read_tiktoken_ranks(path) -> dict[bytes, int]:
    """Parses a tiktoken ranks file (``base64-token rank`` per line)."""
    ranks = {}
    for n, line in enumerate(epath.Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: expected '<base64 token> <rank>', got {line[:60]!r}") from e
    return ranks


def from_tiktoken(ranks_path, pattern: str | None = None,
                  special_tokens: dict[str, int] | None = None) -> Tokenizer:
    """Loads a local tiktoken ranks file (e.g. cl100k_base.tiktoken) with our specials."""
    import tiktoken

    ranks = read_tiktoken_ranks(ranks_path)
    n = max(ranks.values()) + 1
    if special_tokens is None:
        if n == CL100K_NUM_RANKS:
            special_tokens = {**CL100K_SPECIALS, **STEERLING_SPECIAL_IDS}
        else:
            special_tokens = {s: n + i for i, s in enumerate(SPECIALS)}
    pattern = pattern or CL100K_PATTERN
    enc = tiktoken.Encoding(name=epath.Path(ranks_path).stem, pat_str=pattern,
                            mergeable_ranks=ranks, special_tokens=special_tokens)
    size = max([n - 1, *special_tokens.values()]) + 1
    table = [b""] * size
    for t, r in ranks.items():
        table[r] = t
    for s, i in special_tokens.items():
        table[i] = s.encode()
    spec = {"type": "tiktoken", "pattern": pattern, "special_tokens": special_tokens}
    return Tokenizer("tiktoken", enc, table, special_tokens, spec)


def load(path) -> Tokenizer:
    """Loads ``tokenizer.json``, a ranks file, a ``tokenizer_spec.json`` or a directory."""
    from tokenizers import Tokenizer as HFTokenizer

    p = epath.Path(path)
    if p.is_dir():
        for name in (SPEC_FILE, "tokenizer.json"):
            if (p / name).exists():
                return load(p / name)
        raise FileNotFoundError(f"{p}: no {SPEC_FILE} or tokenizer.json in this directory")
    if p.name == SPEC_FILE:
        spec = json.loads(p.read_text())
        return from_tiktoken(p.parent / spec["ranks"], spec.get("pattern"),
                             spec.get("special_tokens"))
    if p.suffix == ".json":
        return _from_hf(HFTokenizer.from_str(p.read_text()))
    return from_tiktoken(p)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Trains a byte-level BPE with the four specials at ids V-4..V-1.

    Deterministic for a given text sequence. ``vocab_size`` counts the specials.
    """
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIALS), min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(list(SPECIALS))
    out = _from_hf(tok)
    if out.vocab_size < vocab_size:
        import warnings
        warnings.warn(f"BPE training reached only {out.vocab_size} of {vocab_size} tokens "
                      "(the training text is too small); specials are still the last four ids")
    if out.mask_id != out.vocab_size - 1 or out.pad_id != out.vocab_size - 4:
        raise AssertionError("special tokens must be the last four ids")
    return out
