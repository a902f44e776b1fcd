"""The concept x source mass and a chunk's distribution over training sources.

Mass (accumulated over every training token, summed over data-parallel replicas):

  M[c, s] = sum_{t : source(t) = s} sum_{k : i_{t,k} = c} w_{t,k}        [C_pad, S]

with (i, w) the known head's active set [B,T,K]. A chunk's source distribution
is naive Bayes over its concept shares (a product of experts):

  share_c  = sum_{t in chunk} sum_{k : i_{t,k} = c} w_{t,k} / (sum of all its weights)
  P(c | s) = M[c, s] / sum_c' M[c', s]                 (sources with no mass are excluded)
  p(s)     = softmax_s( sum_c share_c log(P(c | s) + 1e-6) )
             (the training source prior for a chunk with no active weight)

With a word x source mass W [WORD_BUCKETS, S] (hashed whole words of the
re-keying pass, model/lexical_keys.py ``word_hashes``), a second expert adds the
mean over the chunk's words of log P(w | s), Laplace-smoothed.

Measured on the make-demo run (1000 held-out chunks, argmax accuracy): 0.733
with the train step's mass (the earlier "0.86 on 400 chunks" no longer holds on
the current corpus); 0.812 with the re-keying pass's mass (the clean pass that
also keys queries; build.py now prefers it); 0.849 with unknown-concept mass
instead, 0.835 with both; concepts + words 0.934 (0.938 on the eval's 500;
0.937 with the train mass; words alone 0.907 offline). Per source
(concepts only, re-keyed mass): shakespeare 0.98, pydoc 0.83, wordnet 0.84,
fortunes 0.67, planted_facts (the held-out questions) 0.54; the word expert
lifts fortunes, planted_facts and pydoc most. Earlier: 0.37 for
sum_c share_c P(s | c) and 0.38 for sum_c share_c P(c | s): the top-k active set
is mostly weak, generic concepts, and only the log makes a concept that one
source never shows count against that source.
Computed from the [B,T,K] active sets by gathers; no [B,T,C] tensor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cbm_lm.model.provenance import chunk_onehot


def mass_update(indices: jax.Array, weights: jax.Array, source_ids: jax.Array,
                n_rows: int, n_sources: int) -> jax.Array:
    """M for one batch [n_rows, n_sources]; tokens with source id < 0 are skipped.

    indices, weights [B,T,K]; source_ids [B,T] int32.
    """
    src = jnp.broadcast_to(source_ids[..., None], indices.shape)
    ok = (src >= 0) & (src < n_sources)
    flat = jnp.where(ok, indices * n_sources + src, n_rows * n_sources)   # dropped slot
    w = jnp.where(ok, weights.astype(jnp.float32), 0.0)
    m = jnp.zeros((n_rows * n_sources + 1,), jnp.float32).at[flat.reshape(-1)].add(w.reshape(-1))
    return m[:-1].reshape(n_rows, n_sources)


_FLOOR = 1e-6


def concept_given_source(mass: jax.Array) -> jax.Array:
    """P(c | s) [C,S]: columns normalized to 1; columns without mass are 0."""
    total = mass.sum(axis=0, keepdims=True)
    return jnp.where(total > 0, mass / jnp.maximum(total, 1e-30), 0.0)


WORD_BUCKETS = 1 << 14    # rows of the word x source mass (words hashed into buckets)


def word_bucket(word_hash: jax.Array) -> jax.Array:
    """The word x source mass row [B,T] int32 of each token's word hash [B,T] uint32."""
    return (word_hash % jnp.uint32(WORD_BUCKETS)).astype(jnp.int32)


def word_mass_update(word_hash: jax.Array, counted: jax.Array, source_ids: jax.Array,
                     n_sources: int) -> jax.Array:
    """W for one batch [WORD_BUCKETS, n_sources]: each counted token (model/provenance.py
    ``word_hashes``: its word's hash [B,T], counted [B,T]) adds 1 to its word's bucket."""
    bucket = word_bucket(word_hash)[..., None]
    return mass_update(bucket, counted.astype(jnp.float32)[..., None], source_ids,
                       WORD_BUCKETS, n_sources)


def chunk_source_distribution(indices: jax.Array, weights: jax.Array,
                              chunk_segment_ids: jax.Array, mass: jax.Array,
                              max_chunks: int, words: tuple | None = None) -> jax.Array:
    """p(s) per chunk slot [B,M,S] (rows sum to 1; see the module docstring).

    words: (word hash [B,T], counted [B,T], word mass [WORD_BUCKETS,S]) adds the word
    expert: the mean over the chunk's words of log P(w | s), Laplace-smoothed
    ((W[w,s] + 1) / (sum_w' W[w',s] + WORD_BUCKETS))."""
    log_p = jnp.log(concept_given_source(mass) + _FLOOR)                     # [C,S]
    w = weights.astype(jnp.float32)
    per_token = jnp.einsum("btk,btks->bts", w, jnp.take(log_p, indices, axis=0))
    onehot = chunk_onehot(chunk_segment_ids, max_chunks)
    total = jnp.einsum("btm,btk->bm", onehot, w)[..., None]                  # [B,M,1]
    score = jnp.einsum("btm,bts->bms", onehot, per_token) / jnp.maximum(total, 1e-30)
    if words is not None:
        word_hash, counted, wmass = words
        wmass = wmass.astype(jnp.float32)
        log_w = jnp.log((wmass + 1.0) / (wmass.sum(axis=0, keepdims=True) + WORD_BUCKETS))
        bucket = word_bucket(word_hash)
        c = counted.astype(jnp.float32)
        per_word = jnp.take(log_w, bucket, axis=0) * c[..., None]            # [B,T,S]
        n_words = jnp.einsum("btm,bt->bm", onehot, c)[..., None]
        score = score + jnp.where(n_words > 0, jnp.einsum("btm,bts->bms", onehot, per_word)
                                  / jnp.maximum(n_words, 1.0), 0.0)
    has_mass = mass.sum(axis=0) > 0
    p = jax.nn.softmax(jnp.where(has_mass, score, -jnp.inf), axis=-1)
    prior = mass.sum(axis=0) / jnp.maximum(mass.sum(), 1e-30)
    return jnp.where(total > 0, p, prior)
