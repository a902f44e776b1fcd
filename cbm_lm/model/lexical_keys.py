"""The lexical part of a chunk key: per-token random vectors drawn from hashes.

The key head (model/provenance.py) pools, per chunk, either its tokens and bigrams
(R_x[x_t] + g(x_{t-1}, x_t): what the train step logs, as it has no tokenizer) or its
whole words (w(word(x_t)): the re-keying pass and queries, which have the corpus
tokenizer, with provenance.lexical "words"). g and w are ``hashed_vectors`` of an
integer code (the bigram x_{t-1} V + x_t; the hash of the word's lowercased letters
and digits), so equal codes get equal vectors and the pooled mean is a
Johnson-Lindenstrauss sketch of the chunk's bag of bigrams or words.

With whole words a name matches however BPE split it. On the make-demo run the planted
statements "Tisend worked for forty years ..." begin a line ("Tis" "end") while a question
says " T" "is" "end": tokens and bigrams share only "end", and the paraphrased planted-
fact Recall@10 was 0.756 (first paraphrases 0.805); with words 0.978 (0.990), MRR 0.629 ->
0.928 (BM25, word-level: 1.000). The rest is d_p = 256 Johnson-Lindenstrauss noise: the
same bags compared exactly (no sketch) reach 1.000 with words and 0.975 with tokens +
bigrams (offline numpy on the same pooled surprisal weights, 2026-12-04); re-keyed at d_p
= 1024 (what gin_configs/tiny.py now sets; the tables are seeded, not trained, so d_p
changes without retraining) the same checkpoint reaches 1.000 (1.000), MRR 0.940.

Shapes: tokens, segment ids [B,T]; vectors [B,T,d_p]; word tables [V].
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def hashed_vectors(seed: int, part: int, codes: jax.Array, d_p: int, kind: str = "signs"
                   ) -> jax.Array:
    """v(c) [*codes.shape, d_p]: a random vector per integer code, seeded by (seed, part, c),
    entries of variance 1/d_p, so E[v(a) . v(b)] = [a = b] (a Johnson-Lindenstrauss sketch
    of the bag of codes).

    kind "signs": v(c)_i = (2 bit_i - 1) / sqrt(d_p), bit i = bit (i mod 32) of word
    floor(i / 32) of ``jax.random.bits(fold_in(key(seed, part), c), ceil(d_p / 32))``: one
    threefry word per 32 entries. kind "gaussian": ``jax.random.normal`` of the same key /
    sqrt(d_p), one threefry word per entry; per token of a train step at d_p 1024 that draw
    cost as much as a tenth of the tiny model's step (provenance.hashed_vectors)."""
    base = jax.random.fold_in(jax.random.key(seed), part)
    flat = codes.reshape(-1)
    if kind == "gaussian":
        v = jax.vmap(lambda c: jax.random.normal(jax.random.fold_in(base, c), (d_p,),
                                                 jnp.float32))(flat)
    else:
        n_words = -(-d_p // 32)
        words = jax.vmap(lambda c: jax.random.bits(jax.random.fold_in(base, c), (n_words,),
                                                   jnp.uint32))(flat)           # [N, n_words]
        bits = (words[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
        v = bits.reshape(flat.shape[0], 32 * n_words)[:, :d_p].astype(jnp.float32) * 2.0 - 1.0
    return v.reshape(*codes.shape, d_p) / jnp.sqrt(jnp.float32(d_p))


def bigram_project(seed: int, tokens: jax.Array, segment_ids: jax.Array, vocab: int,
                   d_p: int, kind: str = "signs") -> jax.Array:
    """g(x_{t-1}, x_t) [B,T,d_p]: ``hashed_vectors`` of code x_{t-1} V + x_t (part 4) per
    bigram, 0 at a segment's first token."""
    prev = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)))
    has = jnp.pad(segment_ids[:, 1:] == segment_ids[:, :-1], ((0, 0), (1, 0))) & (segment_ids > 0)
    code = prev.astype(jnp.uint32) * jnp.uint32(vocab) + tokens.astype(jnp.uint32)
    return jnp.where(has[..., None], hashed_vectors(seed, 4, code, d_p, kind), 0.0)


class WordTables(NamedTuple):
    """Per-token-id tables for whole-word lexical features (``word_tables``), [V] each:
    start: the token begins a new word (it starts with whitespace or punctuation);
    hash, mult: polynomial hash H(s) mod 2^32 of the token's lowercased alphanumeric
    characters s and B^len(s), so that H(a b) = H(a) B^len(b) + H(b) across a word's tokens;
    has: s is not empty (pure whitespace / punctuation tokens carry no word)."""
    start: jax.Array
    hash: jax.Array
    mult: jax.Array
    has: jax.Array


_WORD_BASE = 1000003


# word_tables of each tokenizer object by vocab_size, as numpy (a query, the eval and the
# re-keying pass each make a key function; decoding the vocabulary is the cost)
_WORD_TABLES = weakref.WeakKeyDictionary()


def word_tables(tokenizer, vocab_size: int) -> WordTables:
    """``WordTables`` of a tokenizer (token strings decoded one id at a time; ids the
    tokenizer lacks carry no word). Deterministic in the vocabulary; computed once per
    tokenizer object and vocab_size."""
    try:
        per_tok = _WORD_TABLES.setdefault(tokenizer, {})
    except TypeError:         # not weak-referenceable or hashable: no cache
        per_tok = {}
    if vocab_size not in per_tok:
        per_tok[vocab_size] = _word_tables_np(tokenizer, vocab_size)
    return WordTables(*(jnp.asarray(a) for a in per_tok[vocab_size]))


def _word_tables_np(tokenizer, vocab_size: int) -> tuple[np.ndarray, ...]:
    """(start, hash, mult, has) of ``WordTables`` as numpy; the hash is Horner's rule
    h <- h B + byte over the columns of the [V, longest] byte matrix, in uint32 (wrapping
    arithmetic is the mod 2^32)."""
    start = np.ones(vocab_size, bool)
    norms = [b""] * vocab_size
    for i in range(min(vocab_size, tokenizer.vocab_size)):
        try:
            s = tokenizer.decode([i])
        except Exception:   # noqa: BLE001 (an undecodable id carries no word)
            continue
        start[i] = not s[:1].isalnum()
        norms[i] = "".join(ch for ch in s.lower() if ch.isalnum()).encode("utf-8")
    lens = np.fromiter(map(len, norms), np.int64, vocab_size)
    width = int(lens.max(initial=0))
    codes = np.zeros((vocab_size, width), np.uint32)
    row = np.repeat(np.arange(vocab_size), lens)
    col = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    codes[row, col] = np.frombuffer(b"".join(norms), np.uint8)
    h = np.zeros(vocab_size, np.uint32)
    mult = np.ones(vocab_size, np.uint32)
    base = np.uint32(_WORD_BASE)
    for j in range(width):
        on = j < lens
        h = np.where(on, h * base + codes[:, j], h)
        mult = np.where(on, mult * base, mult)
    return start, h, mult, lens > 0


def word_hashes(tokens: jax.Array, segment_ids: jax.Array, words: WordTables
                ) -> tuple[jax.Array, jax.Array]:
    """(hash of each token's whole word uint32 [B,T], the token carries characters of a word
    [B,T] bool); see ``word_project``. Counting the flagged tokens counts a word once per
    token it spans: a word BPE splits into more tokens (a rarer one) weighs more, which
    told sources apart better on the demo run (source accuracy 0.934 this way, 0.862
    counting each word once; source_mass.py)."""
    t = tokens.astype(jnp.int32)
    first = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)),
                    constant_values=True)
    start = words.start[t] | first
    h, p = words.hash[t], words.mult[t]

    def combine(a, b):
        ha, pa, sa = a
        hb, pb, sb = b
        return (jnp.where(sb, hb, ha * pb + hb), jnp.where(sb, pb, pa * pb), sa | sb)

    prefix, _, _ = jax.lax.associative_scan(combine, (h, p, start), axis=1)
    n = t.shape[1]
    pos = jnp.arange(n, dtype=jnp.int32)
    ends = jnp.pad(start[:, 1:], ((0, 0), (0, 1)), constant_values=True)   # last of a word
    last = jax.lax.cummin(jnp.where(ends, pos, n - 1), axis=1, reverse=True)
    full = jnp.take_along_axis(prefix, last, axis=1)
    return full, words.has[t] & (segment_ids > 0)


def word_project(seed: int, tokens: jax.Array, segment_ids: jax.Array, words: WordTables,
                 d_p: int, hashes: tuple[jax.Array, jax.Array] | None = None,
                 kind: str = "signs") -> jax.Array:
    """w(word(x_t)) [B,T,d_p]: ``hashed_vectors`` (part 5) per whole word, keyed by the hash of the
    word's lowercased alphanumeric characters, at every token of the word that carries
    characters (0 elsewhere), so the pooled mean weighs a word by its tokens' pi.

    A word runs from a token that starts one (``WordTables.start``, or a segment's first
    token) to the token before the next start; its hash is the segmented scan
    (h, p) . (h', p') = (h p' + h', p p') over its tokens, read at its last token. The same
    word gets the same vector however BPE split it (" Tisend" and "Tisend" at a line's start
    share no token), which is what makes a paraphrase match its source's names.
    hashes: ``word_hashes(tokens, segment_ids, words)`` when the caller has them already
    (the re-keying pass also sums the word x source mass from them)."""
    full, counted = word_hashes(tokens, segment_ids, words) if hashes is None else hashes
    return jnp.where(counted[..., None], hashed_vectors(seed, 5, full, d_p, kind), 0.0)
