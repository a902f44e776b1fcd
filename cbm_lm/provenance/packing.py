"""Training chunks (or query text) -> fixed-shape packed rows for keying.

A *unit* is token run keyed as one attention segment:
  context="chunk":    every chunk alone (positions from 0), as a query chunk is keyed;
  context="document": a document piece of <= T tokens with all its chunks,
                      as the chunk was seen in training (causal context).
Units are packed first-fit in order into rows of T tokens holding at most M
chunks, and rows into batches of B. Each batch is the batch contract of
cbm_lm/data/pipeline.py restricted to what keying reads:

  tokens, segment_ids, positions, chunk_segment_ids, source_ids   int32 [B,T]
  slot_ids                                                         int64 [B,M]
      the global chunk id in each chunk slot (chunk segment j -> slot j-1), -1 empty
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

import numpy as np

from cbm_lm.data.records import DocumentRecord


@dataclasses.dataclass
class Unit:
    tokens: np.ndarray      # int32 [l]
    chunk_of: np.ndarray    # int32 [l] chunk index within the unit, 0..n-1
    chunk_ids: np.ndarray   # int64 [n]
    source_id: int


def record_units(rec: DocumentRecord, context: str, seq_len: int) -> Iterator[Unit]:
    """The units of one document record (chunks longer than T are cut at T)."""
    b = rec.chunk_bounds
    if context == "chunk":
        for j in range(rec.num_chunks):
            toks = np.asarray(rec.tokens[b[j]:b[j + 1]][:seq_len], np.int32)
            yield Unit(toks, np.zeros(len(toks), np.int32), rec.chunk_ids[j:j + 1], rec.source_id)
        return
    chunk_of = np.repeat(np.arange(rec.num_chunks, dtype=np.int32), np.diff(b))
    start = 0
    while start < len(rec.tokens):
        end = min(start + seq_len, len(rec.tokens))
        if end < len(rec.tokens):   # cut at the last chunk boundary inside the window
            inside = b[(b > start) & (b <= end)]
            end = int(inside[-1]) if len(inside) else end
        local = chunk_of[start:end]
        first = int(local[0])
        yield Unit(np.asarray(rec.tokens[start:end], np.int32), local - first,
                   rec.chunk_ids[first:int(local[-1]) + 1], rec.source_id)
        start = end


def empty_batch(batch: int, seq_len: int, max_chunks: int, pad_id: int) -> dict[str, np.ndarray]:
    """A [batch, seq_len] batch of padding: no segment, no source, every chunk slot -1."""
    z = lambda: np.zeros((batch, seq_len), np.int32)  # noqa: E731
    return {"tokens": np.full((batch, seq_len), pad_id, np.int32), "segment_ids": z(),
            "positions": z(), "chunk_segment_ids": z(),
            "source_ids": np.full((batch, seq_len), -1, np.int32),
            "slot_ids": np.full((batch, max_chunks), -1, np.int64)}


def pack_batches(units: Iterable[Unit], batch: int, seq_len: int, max_chunks: int,
                 pad_id: int) -> Iterator[dict[str, np.ndarray]]:
    """First-fit-in-order packing of units into [B,T] batches (see module docstring)."""
    out = empty_batch(batch, seq_len, max_chunks, pad_id)
    row, fill, seg, chunks = 0, 0, 0, 0
    for u in units:
        n, l = len(u.chunk_ids), len(u.tokens)
        if n > max_chunks:
            raise ValueError(f"a unit of {n} chunks does not fit provenance.max_chunks_per_row="
                             f"{max_chunks}; raise it or key with rekey_context='chunk'")
        if fill + l > seq_len or chunks + n > max_chunks:
            row, fill, seg, chunks = row + 1, 0, 0, 0
            if row == batch:
                yield out
                out = empty_batch(batch, seq_len, max_chunks, pad_id)
                row = 0
        seg += 1
        sl = slice(fill, fill + l)
        out["tokens"][row, sl] = u.tokens
        out["segment_ids"][row, sl] = seg
        out["positions"][row, sl] = np.arange(l)
        out["chunk_segment_ids"][row, sl] = chunks + 1 + u.chunk_of
        out["source_ids"][row, sl] = u.source_id
        out["slot_ids"][row, chunks:chunks + n] = u.chunk_ids
        fill, chunks = fill + l, chunks + n
    if fill or row:
        yield out


def text_units(token_chunks: list[np.ndarray], first_id: int = 0) -> list[Unit]:
    """Query chunks (token arrays) as chunk-context units with ids first_id, first_id+1, ..."""
    return [Unit(np.asarray(t, np.int32), np.zeros(len(t), np.int32),
                 np.asarray([first_id + i], np.int64), -1) for i, t in enumerate(token_chunks)]
