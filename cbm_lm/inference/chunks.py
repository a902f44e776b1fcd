"""Output chunks: generated text split at <|endofchunk|> and at the end of generation.

Steerling's rule (steerling.attribution.utils.find_chunk_boundaries with
include_final_chunk=True), on the tokens of one sequence scanned from the
prompt's end:

  - the scan ends at the first stop token (excluded) or at the end of the
    generated tokens;
  - every <|endofchunk|> closes the chunk before it and is itself in no chunk;
  - the span after the last <|endofchunk|>, if non-empty, is the last chunk.

Chunks are half-open [start, end) intervals of absolute positions in
``trace.tokens[b]``; empty spans (two <|endofchunk|> in a row) are kept as
Steerling keeps them between boundaries, and never emitted at the end.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def find_chunks(tokens: Sequence[int], start: int, end: int, eoc_id: int,
                stop_ids: Iterable[int] = ()) -> list[tuple[int, int]]:
    """Chunks [(start, end)] of tokens[start:end] (absolute positions)."""
    tokens = np.asarray(tokens)[:end]
    stops = np.isin(tokens[start:], np.asarray(list(stop_ids), dtype=tokens.dtype))
    if stops.any():
        end = start + int(np.argmax(stops))
    boundaries = start + np.flatnonzero(tokens[start:end] == eoc_id)
    chunks, prev = [], start
    for b in boundaries.tolist():
        chunks.append((prev, b))
        prev = b + 1
    if prev < end:
        chunks.append((prev, end))
    return chunks


def trace_chunks(trace, eoc_id: int, stop_ids: Iterable[int] = ()) -> list[list[tuple[int, int]]]:
    """Per sequence of a GenerationTrace, its output chunks (absolute positions)."""
    stop_ids = tuple(stop_ids)
    out = []
    for b in range(trace.batch_size):
        p = int(trace.prompt_lens[b])
        out.append(find_chunks(trace.tokens[b], p, p + int(trace.gen_lens[b]), eoc_id, stop_ids))
    return out
