"""Document record -> per-token features, split into pieces of at most T tokens.

A piece is a dict of per-token arrays (l <= T):

    tokens       int32 [l]
    concept_ids  int32 [l, K]   the chunk's concepts, then token-level labels
                                covering the token (deduplicated), -1 padded
    chunk_ids    int64 [l]      global chunk id of the token's chunk
    chunk_local  int32 [l]      index of the chunk within the piece
    source_ids   int32 [l]

Documents longer than T are split at chunk boundaries (a chunk longer than T,
possible only when max_chunk_tokens > T, is cut at T); every piece is packed
as its own segment, so positions restart at 0 in each piece.

``PiecesOf`` is the grain flat-map transform that turns a dataset of piece
lists into a dataset of pieces (grain.experimental.FlatMapIterDataset keeps
the exact iterator state: parent state + index in the list).
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from cbm_lm.data.records import DocumentRecord


def token_concepts(rec: DocumentRecord, k: int) -> np.ndarray:
    """int32 [L, k]: chunk concepts broadcast to tokens, then token-level labels."""
    L = len(rec.tokens)
    lengths = np.diff(rec.chunk_bounds)
    chunk_of = np.repeat(np.arange(rec.num_chunks), lengths)
    out = np.full((L, k), -1, np.int32)
    kc = min(k, rec.chunk_concepts.shape[1])
    out[:, :kc] = rec.chunk_concepts[chunk_of, :kc]
    if len(rec.token_spans):
        fill = (out >= 0).sum(axis=1)
        for s, e, c in rec.token_spans.tolist():
            for t in range(s, e):
                f = fill[t]
                if f < k and c not in out[t, :f]:
                    out[t, f] = c
                    fill[t] = f + 1
    return out


def _piece_bounds(bounds: np.ndarray, T: int) -> list[tuple[int, int]]:
    """Greedy [start, end) pieces of <= T tokens cutting at chunk bounds."""
    out, start, L = [], 0, int(bounds[-1])
    b = bounds.tolist()
    while start < L:
        j = int(np.searchsorted(b, start + T, side="right")) - 1
        end = b[j] if b[j] > start else min(start + T, L)
        out.append((start, end))
        start = end
    return out


def to_pieces(rec: DocumentRecord, seq_len: int, k: int) -> list[dict[str, Any]]:
    """Splits one record into <= seq_len pieces of per-token features."""
    L = len(rec.tokens)
    lengths = np.diff(rec.chunk_bounds)
    chunk_of = np.repeat(np.arange(rec.num_chunks, dtype=np.int32), lengths)
    concepts = token_concepts(rec, k)
    chunk_ids = rec.chunk_ids[chunk_of]
    tokens = np.asarray(rec.tokens, np.int32)
    pieces = []
    for s, e in ([(0, L)] if L <= seq_len else _piece_bounds(rec.chunk_bounds, seq_len)):
        local = chunk_of[s:e]
        pieces.append({
            "tokens": tokens[s:e],
            "concept_ids": concepts[s:e],
            "chunk_ids": chunk_ids[s:e],
            "chunk_local": (local - local[0]).astype(np.int32),
            "source_ids": np.full(e - s, rec.source_id, np.int32),
        })
    return pieces


class PiecesOf(grain.experimental.FlatMapTransform):
    """A document's piece list (built by ``to_pieces`` in the read threads) -> its pieces."""

    max_fan_out = 1 << 20   # only MapDataset flat maps use it; pieces are listed, not indexed

    def flat_map(self, pieces: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return pieces
