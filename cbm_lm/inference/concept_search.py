"""Finding and inspecting concepts: search by name/description, top tokens, pooled embeddings.

  search_concepts(vocab, "royal family", k)  -> [(id, score)]   BM25 (bm25s) over
      "name group description" of every entry of concepts.json, plus a bonus
      for an exact (10) or substring (2) name match, so "king" finds
      "topic:kings" and a full name always ranks first. The substring bonus
      needs a query of >= 2 characters (every name contains ""), and an empty
      query finds nothing.
  concept_top_tokens(model, c, k)            -> (token ids [k], alignment [k])
      the unit concept embedding projected on the LM head, W e_c / ||e_c||:
      the tokens the concept promotes when it is active (Steerling's
      concept_top_tokens); unknown=True for the unknown head.
  pooled_embedding(model, tokens, kind, pooling) -> [B,D] (or [B,T,D] for "none")
      kind: hidden (final-norm backbone output) | composed (what the LM head
      reads) | known (known features) | unknown (unknown features, or
      h - known without an unknown head, as Steerling's unk);
      pooling: mean | first | last | none, over each row's real tokens.
"""

from __future__ import annotations

import re

import bm25s
import jax.numpy as jnp
import numpy as np
from flax import nnx

EMBEDDING_KINDS = ("hidden", "composed", "known", "unknown")
POOLINGS = ("mean", "first", "last", "none")


class ConceptIndex:
    """A BM25 index over a concept vocabulary (built once, queried many times)."""

    def __init__(self, vocab):
        self.vocab = vocab
        docs = [f"{c.name} {c.group} {c.description}".replace(":", " ").replace("_", " ")
                for c in vocab.concepts]
        self._names = [c.name.lower() for c in vocab.concepts]
        self._bm25 = bm25s.BM25()
        self._bm25.index(bm25s.tokenize(docs, show_progress=False), show_progress=False)

    def search(self, query: str, k: int = 10) -> list[tuple[int, float]]:
        n = len(self._names)
        low = query.strip().lower()
        if not low:
            return []
        scores = np.zeros(n, np.float32)
        q = query.replace(":", " ").replace("_", " ")
        if re.search(r"\w\w", q):
            ids, s = self._bm25.retrieve(bm25s.tokenize([q], show_progress=False), k=n,
                                         show_progress=False)
            scores[ids[0]] = s[0]
        scores += np.asarray([10.0 if nm == low else 2.0 if len(low) >= 2 and low in nm else 0.0
                              for nm in self._names], np.float32)
        order = np.argsort(-scores, kind="stable")[:k]
        return [(int(i), float(scores[i])) for i in order if scores[i] > 0]


_INDEX_CACHE: dict[int, ConceptIndex] = {}


def search_concepts(vocab, query: str, k: int = 10) -> list[tuple[int, float]]:
    """[(concept id, score)] best first; empty when nothing matches."""
    index = _INDEX_CACHE.get(id(vocab))
    if index is None or index.vocab is not vocab:
        index = _INDEX_CACHE[id(vocab)] = ConceptIndex(vocab)
    return index.search(query, k)


def concept_top_tokens(model, concept_id: int, k: int = 15, *, unknown: bool = False):
    """(token ids [k], scores [k]): the vocabulary a concept's unit embedding promotes most."""
    head = model.rewrite.unknown_head if unknown else model.rewrite.known_head
    if head is None:
        raise ValueError("the model has no unknown head")
    if not 0 <= concept_id < head.n_concepts:
        raise ValueError(f"concept id {concept_id} is outside [0, {head.n_concepts})")
    e = np.asarray(head.concept_vectors(jnp.asarray([concept_id])), np.float32)[0]
    align = np.asarray(model.unembedding(), np.float32) @ (e / (np.linalg.norm(e) + 1e-12))
    top = np.argsort(-align, kind="stable")[:k]
    return top.astype(np.int32), align[top]


@nnx.jit
def _features(model, tokens, seg):
    """{kind: [B,T,*]} per-token features of one forward pass (compiled once per shape)."""
    out = model(tokens, segment_ids=seg)
    return {"hidden": out.hidden, "composed": out.composed, "known": out.known_features,
            "unknown": out.unknown_features if out.unknown is not None else out.residual}


def pooled_embedding(model, tokens, kind: str = "composed", pooling: str = "mean",
                     segment_ids=None) -> np.ndarray:
    """Embeddings of tokens [B,T] (segment_ids [B,T]: 0 marks padding to ignore)."""
    if kind not in EMBEDDING_KINDS:
        raise ValueError(f"embedding kind {kind!r}: expected one of {EMBEDDING_KINDS}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r}: expected one of {POOLINGS}")
    tokens = jnp.asarray(np.atleast_2d(np.asarray(tokens, np.int32)))
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    h = np.asarray(_features(model, tokens, seg)[kind], np.float32)
    valid = np.ones(tokens.shape, bool) if seg is None else np.asarray(seg) > 0
    if pooling == "none":
        return h
    if pooling == "mean":
        return (h * valid[..., None]).sum(1) / np.maximum(valid.sum(1, keepdims=True), 1)
    idx = valid.argmax(1) if pooling == "first" else valid.shape[1] - 1 - valid[:, ::-1].argmax(1)
    return h[np.arange(h.shape[0]), idx]
