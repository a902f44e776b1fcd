"""The held-out windows every metric is measured on.

One window per held-out document (its first T tokens), the documents drawn
without replacement with a seed, so every metric of a report sees the same
text:

  tokens       int32 [N,T]   pad id past the document's end
  segment_ids  int32 [N,T]   1 on the document's tokens, 0 on padding
  positions    int32 [N,T]   0..T-1 (0 on padding)
  chunk_of     int32 [N,T]   index into ``chunks`` of the token's chunk, -1 on padding
  chunks       list of HeldoutChunk: (window row, token span [start, end), concept ids,
               global chunk id)
  token_labels int32 [m,4]   token-level labels inside the windows: (row, start, end, concept)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cbm_lm.data.corpus import Corpus


@dataclasses.dataclass(frozen=True)
class HeldoutChunk:
    row: int
    start: int
    end: int
    concepts: tuple[int, ...]
    chunk_id: int
    source_id: int


@dataclasses.dataclass
class HeldoutWindows:
    tokens: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    chunk_of: np.ndarray
    chunks: list[HeldoutChunk]
    doc_keys: list[str]
    token_labels: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros((0, 4), np.int32))

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    def labels(self, n_concepts: int) -> np.ndarray:
        """Chunk x concept presence matrix [n_chunks, n_concepts] bool."""
        y = np.zeros((len(self.chunks), n_concepts), bool)
        for i, c in enumerate(self.chunks):
            ids = [j for j in c.concepts if 0 <= j < n_concepts]
            y[i, ids] = True
        return y

    def present(self, n_concepts: int) -> np.ndarray:
        """[n_concepts] bool: labelled somewhere in the windows (chunk or token labels)."""
        p = self.labels(n_concepts).any(axis=0)
        ids = self.token_labels[:, 3]
        p[ids[(ids >= 0) & (ids < n_concepts)]] = True
        return p


def heldout_windows(corpus: Corpus, num_examples: int, seq_len: int, seed: int,
                    split: str = "heldout", min_tokens: int = 2) -> HeldoutWindows:
    """Draws ``num_examples`` held-out documents (>= min_tokens tokens) into [N,T] windows.

    Raises ValueError when num_examples < 1 or the split has no such document."""
    if num_examples < 1:
        raise ValueError(f"num_examples={num_examples}: expected >= 1 held-out document")
    docs = [d for d in corpus.documents(split) if len(d.tokens) >= min_tokens]
    if not docs:
        raise ValueError(f"{corpus.dir}: the {split!r} split has no document of at least "
                         f"{min_tokens} tokens to evaluate on")
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(docs), size=min(num_examples, len(docs)), replace=False))
    n, t = len(pick), seq_len
    tokens = np.full((n, t), corpus.tokenizer.pad_id, np.int32)
    seg = np.zeros((n, t), np.int32)
    chunk_of = np.full((n, t), -1, np.int32)
    chunks, keys, tok_labels = [], [], []
    for row, k in enumerate(pick):
        doc = docs[k]
        length = min(len(doc.tokens), t)
        tokens[row, :length] = doc.tokens[:length]
        seg[row, :length] = 1
        keys.append(doc.doc_key)
        tok_labels += [(row, s, min(e, length), c) for s, e, c in doc.token_spans.tolist()
                       if s < length]
        for c in range(doc.num_chunks):
            start, end = int(doc.chunk_bounds[c]), min(int(doc.chunk_bounds[c + 1]), length)
            if start >= length:
                break
            chunk_of[row, start:end] = len(chunks)
            concepts = tuple(int(j) for j in doc.chunk_concepts[c] if j >= 0)
            chunks.append(HeldoutChunk(row, start, end, concepts, int(doc.chunk_ids[c]),
                                       int(doc.source_id)))
    positions = np.where(seg > 0, np.arange(t, dtype=np.int32)[None, :], 0).astype(np.int32)
    return HeldoutWindows(tokens, seg, positions, chunk_of, chunks, keys,
                          np.asarray(tok_labels, np.int32).reshape(-1, 4))
