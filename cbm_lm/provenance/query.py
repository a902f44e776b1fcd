"""Answering provenance queries: text -> its chunks -> top-k training chunks + sources.

One forward pass over all queries' chunks (batched, each chunk keyed alone as
in ``rekey_context='chunk'``), then an index lookup per chunk. Each query's
answer has the shape of tools/provenance_query.py --json:

  {"query": i, "text": ..., "chunks": [{"chunk": j, "text": ..., "sources": {name: p},
     "matches": [{"chunk_id", "source", "score", "text"}, ...]}]}

``sources`` is the chunk's concept shares times the normalized concept x
source mass (cbm_lm/provenance/source_mass.py). The matches come from a
*retriever*: the provenance index (default) or BM25, both answering
``search(chunks, k) -> (scores [N,k], ids [N,k])``.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np

from cbm_lm.config import ProvenanceConfig
from cbm_lm.data.chunking import _split_points
from cbm_lm.data.corpus import Corpus
from cbm_lm.provenance.chunks import ChunkLookup
from cbm_lm.provenance.index import KeyIndex
from cbm_lm.provenance.packing import pack_batches, text_units
from cbm_lm.provenance.rekey import make_key_fn

ENDOFCHUNK = "<|endofchunk|>"


class QueryChunks(Protocol):
    texts: list[str]            # [N] chunk texts
    tokens: list[np.ndarray]    # [N] chunk token ids
    keys: np.ndarray            # [N,d_p] provenance keys


class Retriever(Protocol):
    def search(self, chunks: QueryChunks, k: int) -> tuple[np.ndarray, np.ndarray]: ...


def split_text(text: str, tokenizer, max_chunk_tokens: int) -> list[np.ndarray]:
    """A query's chunks: split at <|endofchunk|>, then at <= max_chunk_tokens tokens
    (cutting after a newline in the second half of a window, as the corpus build does)."""
    out = []
    for part in text.split(ENDOFCHUNK):
        if not part.strip():
            continue
        toks = np.asarray(tokenizer.encode(part), np.int32)
        ends_nl = np.array([tokenizer.decode([t]).endswith("\n") for t in toks], bool)
        start = 0
        for cut in _split_points(len(toks), ends_nl, max_chunk_tokens):
            out.append(toks[start:cut])
            start = cut
    return out


def keying_like(prov: ProvenanceConfig, meta: dict | None) -> ProvenanceConfig:
    """The config that keys queries as the index described by ``meta`` (its meta.json) keyed
    its chunks: its d_p (a key index, which names its store; the gradient reference's does
    not), and the hashed vectors and lexical features it names (indexes that predate those
    fields hold gaussian vectors of tokens + bigrams)."""
    if meta is None:
        return prov
    out = dataclasses.replace(prov, hashed_vectors=meta.get("hashed_vectors", "gaussian"),
                              lexical=meta.get("lexical", "tokens"))
    d = int(meta.get("d_p", prov.d_p))
    if "store" in meta and d != prov.d_p:
        if prov.head != "fixed":
            raise ValueError(f"the index holds {d}-dim keys but the run's learned key head keys "
                             f"at provenance.d_p={prov.d_p}; rebuild the index "
                             "(tools/build_provenance_index.py --rekey)")
        out = dataclasses.replace(out, d_p=d)
    return out


class _Chunks:
    def __init__(self, texts, tokens, keys, sources):
        self.texts, self.tokens, self.keys, self.sources = texts, tokens, keys, sources


class IndexRetriever:
    """The provenance index: cosine top-k of the centred keys."""

    def __init__(self, index: KeyIndex):
        self.index = index

    def search(self, chunks, k):
        return self.index.search(chunks.keys, k)


class ProvenanceQuery:
    """Keys text with ``model`` and answers from ``retriever`` (see module docstring)."""

    def __init__(self, model, prov: ProvenanceConfig, corpus: Corpus, retriever: Retriever,
                 mass: np.ndarray | None, seq_len: int, word_mass: np.ndarray | None = None):
        meta = getattr(getattr(retriever, "index", None), "meta", None)
        prov = keying_like(prov, meta)   # key queries as the index's keys were
        self.model, self.prov, self.corpus = model, prov, corpus
        self.word_mass = word_mass
        self.retriever, self.mass, self.seq_len = retriever, mass, seq_len
        self.lookup = ChunkLookup(corpus)
        self.key_fn = make_key_fn(model, prov, tokenizer=corpus.tokenizer, lexical=prov.lexical)
        self.max_chunk_tokens = int(corpus.manifest.get("max_chunk_tokens", seq_len))

    def encode(self, texts: Sequence[str]) -> tuple[_Chunks, list[list[int]]]:
        """All chunks of all texts, keyed in batches; (chunks, per-text chunk rows)."""
        tok = self.corpus.tokenizer
        per_text, all_tokens = [], []
        for text in texts:
            chunks = split_text(text, tok, min(self.max_chunk_tokens, self.seq_len))
            per_text.append(list(range(len(all_tokens), len(all_tokens) + len(chunks))))
            all_tokens += chunks
        n, d_p = len(all_tokens), self.prov.d_p
        keys = np.zeros((n, d_p), np.float32)
        n_src = len(self.corpus.sources)
        sources = np.full((n, n_src), 1.0 / max(n_src, 1), np.float32)
        mass = None if self.mass is None else self.mass[:, :self.prov.max_sources]
        for batch in pack_batches(text_units(all_tokens), self.prov.rekey_batch_size,
                                  self.seq_len, self.prov.max_chunks_per_row,
                                  tok.pad_id):
            res = self.key_fn(batch, mass, None if self.word_mass is None
                              else self.word_mass[:, :self.prov.max_sources])
            slots = batch["slot_ids"]
            ok = slots >= 0
            keys[slots[ok]] = res["keys"][ok]
            if "sources" in res:
                sources[slots[ok]] = res["sources"][ok][:, :n_src]
        texts_out = [tok.decode(t) for t in all_tokens]
        return _Chunks(texts_out, all_tokens, keys, sources), per_text

    def answer(self, texts: Sequence[str], k: int = 10) -> list[dict]:
        chunks, per_text = self.encode(texts)
        scores, ids = (self.retriever.search(chunks, k) if len(chunks.tokens)
                       else (np.zeros((0, k)), np.zeros((0, k), np.int64)))
        names = self.corpus.sources
        out = []
        for qi, (text, rows) in enumerate(zip(texts, per_text)):
            cs = []
            for j, r in enumerate(rows):
                matches = [{"chunk_id": int(c), "source": self.lookup.source_name(int(c)),
                            "score": float(s), "text": self.lookup.text(int(c))}
                           for s, c in zip(scores[r], ids[r]) if c >= 0]
                cs.append({"chunk": j, "text": chunks.texts[r],
                           "sources": {names[s]: float(chunks.sources[r, s])
                                       for s in range(len(names))},
                           "matches": matches})
            out.append({"query": qi, "text": text, "chunks": cs})
        return out


def read_queries(path: str) -> list[str]:
    """One query per line: plain text, or JSONL objects with a "text" field."""
    import json
    from etils import epath
    out = []
    for n, line in enumerate(epath.Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: line starts with '{{' but is not JSON ({e}); "
                                 "expected plain text or a JSON object with a \"text\" field")
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise ValueError(f"{path}:{n}: JSON line has no string \"text\" field")
            out.append(rec["text"])
        else:
            out.append(line)
    if not out:
        raise ValueError(f"{path}: no queries (expected one per line)")
    return out
