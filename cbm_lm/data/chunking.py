"""Concept resolution, tokenization and chunking of one labelled document.

Each labelled character span (an input chunk, or the gaps between them, or the
whole document) is tokenized on its own, so chunk boundaries are exact token
boundaries and ``decode(tokens) == text`` (byte-level tokenizers are lossless
under concatenation). A span longer than ``max_chunk_tokens`` is split into
pieces of at most that many tokens, cutting after a newline when one falls in
the second half of the window. Each piece is a chunk carrying the span's
concepts (document-level first, then the span's own; deduplicated; at most K).
Token-level labels (character spans) become token spans over every token that
overlaps the labelled characters.
"""

from __future__ import annotations

import numpy as np

from cbm_lm.data.errors import DataError
from cbm_lm.data.inputs import LabelledDoc


def resolve(doc: LabelledDoc, name_to_id: dict[str, int], num_concepts: int,
            vocab_file: str | None, concept: object, field: str) -> int:
    """Concept name or id -> dense id, or a DataError naming the document."""
    if isinstance(concept, int):
        if vocab_file is None:
            raise doc.error(f"{field}: integer concept id {concept} needs a concept vocabulary "
                            "(pass --concepts); expected concept names")
        if not 0 <= concept < num_concepts:
            raise doc.error(f"{field}: concept id {concept} out of range; expected 0..{num_concepts - 1} "
                            f"({num_concepts} concepts in {vocab_file})")
        return concept
    if concept not in name_to_id:
        src = vocab_file or "the concept vocabulary"
        raise doc.error(f"{field}: unknown concept name {concept!r}; expected a name listed in {src}")
    return name_to_id[concept]


def resolve_doc(doc: LabelledDoc, name_to_id, num_concepts, vocab_file):
    """Returns (doc concept ids, [(s, e, ids)], [(s, e, id)])."""
    r = lambda c, f: resolve(doc, name_to_id, num_concepts, vocab_file, c, f)  # noqa: E731
    doc_ids = [r(c, "concepts") for c in doc.concepts]
    spans = [(s, e, [r(c, f"chunks[{i}].concepts") for c in cs])
             for i, (s, e, cs) in enumerate(doc.spans)]
    tok = [(s, e, r(c, "token label")) for s, e, c in doc.token_labels]
    return doc_ids, spans, tok


def _split_points(n_tokens: int, ends_with_newline: np.ndarray, max_len: int) -> list[int]:
    """Cut positions (exclusive ends) splitting n_tokens into pieces <= max_len."""
    if not max_len >= 1:      # 0 would never advance (an endless loop); NaN fails too
        raise ValueError(f"chunk length {max_len!r} tokens (max_chunk_tokens); expected an "
                         "integer >= 1")
    cuts, start = [], 0
    while n_tokens - start > max_len:
        window = ends_with_newline[start + max_len // 2: start + max_len]
        nl = np.nonzero(window)[0]
        cut = start + max_len // 2 + int(nl[-1]) + 1 if len(nl) else start + max_len
        cuts.append(cut)
        start = cut
    return cuts + [n_tokens]


def _dedupe(ids: list[int]) -> list[int]:
    seen, out = set(), []
    for i in ids:
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


def tokenize_and_chunk(doc: LabelledDoc, doc_ids, spans, token_labels, tokenizer,
                       max_chunk_tokens: int, max_concepts: int):
    """Tokenizes and chunks one document.

    Returns a dict: tokens int32 [L], chunk_bounds int32 [n+1], chunk_concepts
    int32 [n, K] (-1 padded), token_spans int32 [m, 3], truncated (number of
    chunk concept lists cut to K).
    """
    text = doc.text
    segments, pos = [], 0
    for s, e, ids in spans:
        if s > pos:
            segments.append((pos, s, []))
        segments.append((s, e, ids))
        pos = e
    if pos < len(text):
        segments.append((pos, len(text), []))
    pieces = tokenizer.encode_batch([text[s:e] for s, e, _ in segments])
    tokens, starts, ends, bounds, concepts = [], [], [], [0], []
    truncated = 0
    for (s, e, ids), toks in zip(segments, pieces):
        if not toks:
            continue
        cs, ce = tokenizer.char_offsets(text[s:e], toks)
        nl = np.array([text[s + int(c) - 1] == "\n" for c in ce], dtype=bool)
        labels = _dedupe(list(doc_ids) + list(ids))
        if len(labels) > max_concepts:
            truncated += 1
            labels = labels[:max_concepts]
        base = len(tokens)
        for cut in _split_points(len(toks), nl, max_chunk_tokens):
            bounds.append(base + cut)
            concepts.append(labels)
        tokens.extend(toks)
        starts.append(cs + s)
        ends.append(ce + s)
    if not tokens:
        raise doc.error("document tokenizes to zero tokens; expected non-empty text")
    starts, ends = np.concatenate(starts), np.concatenate(ends)
    tok_spans = []
    for s, e, cid in token_labels:
        ts = int(np.searchsorted(ends, s, side="right"))
        te = int(np.searchsorted(starts, e, side="left"))
        if ts < te:
            tok_spans.append((ts, te, cid))
    cc = np.full((len(concepts), max_concepts), -1, np.int32)
    for i, ids in enumerate(concepts):
        cc[i, :len(ids)] = ids
    return {
        "tokens": np.asarray(tokens, np.int32),
        "chunk_bounds": np.asarray(bounds, np.int32),
        "chunk_concepts": cc,
        "token_spans": np.asarray(tok_spans, np.int32).reshape(-1, 3),
        "truncated": truncated,
    }


def check_tokens(doc: LabelledDoc, tokens: np.ndarray, vocab_size: int) -> None:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise DataError(doc.path, doc.where, f"token id out of range; expected 0..{vocab_size - 1}")
