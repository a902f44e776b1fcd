"""Chunk-level soft-OR concept loss, computed sparsely (DESIGN.md section 3).

Labels are per chunk. With token logits z_tj = head.logits_for(query(h_t), j):

  P(j present in c) = 1 - prod_{t in c} (1 - sigmoid(z_tj))
  log P(j absent in c) = -S_cj,   S_cj = sum_{t in c} softplus(z_tj)

Binary cross-entropy against the chunk label y_cj:

  y = 1:  -log P(present) = -log(1 - exp(-S_cj)) = -log(-expm1(-S_cj))   (S clamped >= 1e-10)
  y = 0:  -log P(absent)  =  S_cj = sum_{t in c} softplus(z_tj)          (decomposes per token)

Only three candidate sets are scored, never a dense [B,T,C] tensor:

  (a) positives: the chunk's labels concept_ids [B,T,K]. Labels are
      slot-aligned inside a chunk (every token of a chunk carries the same ids
      in the same slots), so S for (chunk, slot) is a segment sum over the
      chunk's tokens (``chunk_sums``: one segment_sum per row, vmapped, so it
      stays sharded over the batch; a single segment_sum over flattened
      (row, chunk) ids compiles to an all-reduce of the whole [B*T, K] buffer
      under data parallelism). Duplicate ids in one token's slots count once.
      A slot whose id is NOT the same at every token of its chunk holds a
      token-level label (the data pipeline puts lexicon labels after the
      chunk's): it is scored at its own token as -log sigmoid(z_tj), the
      soft-OR over a one-token span.
  (b) sampled negatives: M ids uniform in [0, n_concepts) (with replacement),
      shared by the batch and scored at every real token; an id that is a
      positive of the token's chunk is excluded. Per-token term softplus(z_tj).
      Their logits come from one [N,Q] x [Q,M] matmul (``shared_logits``), not
      the per-token row gather of head.logits_for ([N,M,Q] would dominate memory).
  (c) predicted negatives: the head's top-k ids per token (LMOutput.known.topk_indices)
      that are neither positives of the chunk nor among the sampled ids (those
      are already scored). Their logits are the forward's (``topk_logits``,
      LMOutput.known.topk_logits: the same cap(q K_j) with the same gradient),
      so only the K positives are scored again. APPROXIMATION: the exact chunk term S_cj sums
      softplus over every token of the chunk, but a top-k id is scored only at
      the tokens where it was predicted; the omitted tokens are those where
      z_tj was below the token's top-k, i.e. the smallest terms of the sum.

  With ``positives="token"`` every valid label slot is scored as in the token-level
  case, -log sigmoid(z_tj) at each token of the chunk: a chunk label then asks
  every token of the chunk to detect the concept (z > 0), where the soft-OR is
  satisfied by a chunk-wide S of a few nats, i.e. z_tj well below 0 at every
  token, so a chunk-level concept rarely enters a token's top-k (measured on the
  demo corpus: most chunk-level concepts never did; docs/fidelity.md "Fidelity: what
  the eval measures and what bounds it").

  loss = pos_weight * mean_{valid (chunk, positive)} -log(-expm1(-S))
       + neg_weight * mean_{scored (token, negative)} softplus(z)
       + pooled_weight * L_pooled

  With ``pooled_weight`` > 0 the chunk-level labels are also scored on the chunk's mean
  logit zbar_cj = mean_{t in c} z_tj (a linear read-out of the chunk's mean state, what a
  probe on pooled h fits), over the chunk-level positives and the sampled negatives, with
  h held fixed (stop_gradient): the term trains the head's keys, not the backbone:

    L_pooled = mean_{(c, j) positive} softplus(-zbar_cj) + mean_{(c, j) sampled} softplus(zbar_cj)

Shapes: hidden [B,T,D]; concept_ids [B,T,K] int32 (-1 pad);
chunk_segment_ids [B,T] int32 (0 pad, 1..m chunk index in the row);
topk_ids [B,T,k] int32 or None. The largest intermediates are [B*T, K, Q]
(the gathered positive key rows; [B*T, K+k, Q] without topk_logits), [B*T, M]
(sampled-negative logits) and [B, T, K+M] (chunk sums, indexed by chunk id - 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MIN_S = 1e-10


def sample_negative_ids(rng: jax.Array, n_negatives: int, n_concepts: int) -> jax.Array:
    """[M] int32 concept ids uniform in [0, n_concepts), with replacement."""
    return jax.random.randint(rng, (n_negatives,), 0, n_concepts, jnp.int32)


def first_occurrence(ids: jax.Array) -> jax.Array:
    """[...,K] bool: slot holds a valid id (>= 0) not already held by an earlier slot."""
    k = ids.shape[-1]
    earlier = jnp.tril(jnp.ones((k, k), bool), -1)                                # [s, s'<s]
    same = (ids[..., :, None] == ids[..., None, :]) & earlier & (ids[..., None, :] >= 0)
    return (ids >= 0) & ~jnp.any(same, axis=-1)


def _member(a: jax.Array, b: jax.Array, b_valid: jax.Array) -> jax.Array:
    """a [N,A], b [N,B], b_valid [N,B] -> [N,A]: a[n,i] is among the valid b[n,:]."""
    return jnp.any((a[:, :, None] == b[:, None, :]) & b_valid[:, None, :], axis=-1)


def chunk_sums(x: jax.Array, chunk_segment_ids: jax.Array) -> jax.Array:
    """Sum per-token values over each chunk: x [B*T,S], chunk ids [B,T] -> [B,T,S].

    Out[b, c-1] sums x over the tokens of row b with chunk id c (1..T);
    padding (0) is dropped. A segment sum per row (vmapped), so the result
    stays sharded over the batch like its inputs.
    """
    b, t = chunk_segment_ids.shape
    ids = chunk_segment_ids.astype(jnp.int32) - 1                       # padding -> -1, dropped
    xs = x.reshape(b, t, *x.shape[1:])
    return jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, t))(xs, ids)


def uniform_over_chunk(ids: jax.Array, chunk_segment_ids: jax.Array) -> jax.Array:
    """ids [B*T,S] -> [B*T,S] bool: the slot holds the same id at every token of the chunk."""
    b, t = chunk_segment_ids.shape
    seg = chunk_segment_ids.astype(jnp.int32) - 1
    xs = ids.reshape(b, t, -1)
    hi = jax.vmap(lambda v, i: jax.ops.segment_max(v, i, t))(xs, seg)              # [B,T,S]
    lo = jax.vmap(lambda v, i: jax.ops.segment_min(v, i, t))(xs, seg)
    idx = jnp.maximum(seg, 0)[..., None]
    same = jnp.take_along_axis(hi, idx, axis=1) == jnp.take_along_axis(lo, idx, axis=1)
    return same.reshape(ids.shape)


def shared_logits(head, q: jax.Array, ids: jax.Array) -> jax.Array:
    """Capped logits of ids [M] shared by every query q [N,Q] -> [N,M].

    Same values as head.logits_for(q, broadcast(ids, [N,M])), but gathers the
    [M,Q] key rows once and runs one matmul instead of gathering [N,M,Q].
    """
    rows = jnp.take(head.keys(), ids, axis=0).astype(jnp.float32)                  # [M,Q]
    return head.cap(q @ rows.T)


def soft_or_probability(s: jax.Array) -> jax.Array:
    """P(present) = 1 - exp(-S) for S = sum softplus(z) over a chunk."""
    return -jnp.expm1(-s)


def positive_bce(s: jax.Array) -> jax.Array:
    """-log(1 - exp(-S)), stable for small and large S (S clamped away from 0)."""
    return -jnp.log(-jnp.expm1(-jnp.maximum(s, _MIN_S)))


def concept_auroc(scores: jax.Array, labels: jax.Array, mask: jax.Array | None = None
                  ) -> jax.Array:
    """Rank-based AUROC (Mann-Whitney U, ties count 1/2) over the masked entries.

    scores [P] float (finite), labels [P] bool/int, mask [P] bool (None = all).
    Returns 0.5 when either class is empty. O(P log P): one sort, two searchsorted.
    """
    scores = scores.astype(jnp.float32).reshape(-1)
    labels = labels.reshape(-1).astype(bool)
    mask = jnp.ones_like(labels) if mask is None else mask.reshape(-1).astype(bool)
    ranked = jnp.sort(jnp.where(mask, scores, jnp.inf))          # masked entries sort last
    below = jnp.searchsorted(ranked, scores, side="left").astype(jnp.float32)
    upto = jnp.searchsorted(ranked, scores, side="right").astype(jnp.float32)
    rank = 0.5 * (below + 1.0 + upto)                    # mean 1-based rank of the tie group
    pos = mask & labels
    n_pos = jnp.sum(pos.astype(jnp.float32))
    n_neg = jnp.sum((mask & ~labels).astype(jnp.float32))
    u = jnp.sum(jnp.where(pos, rank, 0.0)) - n_pos * (n_pos + 1.0) / 2.0
    ok = (n_pos > 0) & (n_neg > 0)
    return jnp.where(ok, u / jnp.where(ok, n_pos * n_neg, 1.0), 0.5)


def chunk_concept_loss(head, hidden: jax.Array, concept_ids: jax.Array,
                       chunk_segment_ids: jax.Array, topk_ids: jax.Array | None,
                       rng: jax.Array, *, n_negatives: int, pos_weight: float = 1.0,
                       neg_weight: float = 1.0, with_auroc: bool = True,
                       positives: str = "soft_or", topk_logits: jax.Array | None = None,
                       balance: str = "none", pooled_weight: float = 0.0
                       ) -> tuple[jax.Array, dict]:
    """Soft-OR BCE of ``head`` (a ConceptHead) against chunk labels; see the module docstring.

    topk_logits [B,T,k]: the forward's capped logits of ``topk_ids`` (reused, not
    recomputed); None scores them again from ``hidden``.
    balance: "none" (the positive term is the mean over positive pairs) or
    "concept" (the mean over the concepts labelled in the batch of each concept's
    mean positive term; see ``concept_balanced_mean``).

    Returns (loss scalar, aux) with aux:
      pos_loss, neg_loss, neg_sampled_loss, neg_topk_loss   the mean terms
      n_pos_pairs     valid (chunk, positive) pairs
      n_neg_pairs     scored (token, negative) pairs (sampled + top-k)
      n_chunks        chunks in the batch
      pos_detected    fraction of positives with P(present) > 0.5
      auroc           concept_auroc over (chunk, chunk-level positive) and (chunk, sampled
                      negative) pairs scored by S_cj, for either ``positives`` (omitted
                      when with_auroc=False: it sorts B*T*(K+M) entries, all-gathered
                      across data shards)
    """
    b, t, d = hidden.shape
    n, k = b * t, concept_ids.shape[-1]
    real = chunk_segment_ids.reshape(n) > 0

    pos_ids = concept_ids.reshape(n, k).astype(jnp.int32)
    pos_valid = first_occurrence(pos_ids) & real[:, None]                          # [N,K]
    neg_ids = sample_negative_ids(rng, n_negatives, head.n_concepts)               # [M]
    neg_tok = jnp.broadcast_to(neg_ids[None, :], (n, n_negatives))
    neg_valid = real[:, None] & ~_member(neg_tok, pos_ids, pos_valid)              # [N,M]
    per_token = [jnp.where(pos_valid, pos_ids, 0)]
    if topk_ids is not None:
        top = topk_ids.reshape(n, -1).astype(jnp.int32)
        top_valid = real[:, None] & ~_member(top, pos_ids, pos_valid)
        top_valid &= ~jnp.any(top[:, :, None] == neg_ids[None, None, :], axis=-1)
        per_token.append(top)

    q = head.query(hidden.reshape(n, d))
    if topk_ids is not None and topk_logits is not None:
        z_all = jnp.concatenate([head.logits_for(q, per_token[0]),                 # [N,K+k]
                                 topk_logits.reshape(n, -1).astype(jnp.float32)], axis=-1)
    else:
        z_all = head.logits_for(q, jnp.concatenate(per_token, axis=-1))            # [N,K+k]
    sp = jax.nn.softplus(z_all)
    sp_pos = sp[:, :k]
    z_neg = shared_logits(head, q, neg_ids)                                         # [N,M]
    sp_neg = jax.nn.softplus(z_neg)

    # (a) positives. A slot holding the same id at every token of its chunk is
    # a chunk label: S per (chunk, slot) by segment sum over the chunk's tokens.
    # Any other valid slot is a token-level label (e.g. a lexicon supersense on
    # one word): a soft-OR over that single token, -log sigmoid(z).
    if positives not in ("soft_or", "token"):
        raise ValueError(f"positives must be 'soft_or' or 'token', got {positives!r}")
    chunk_labels = pos_valid & uniform_over_chunk(jnp.where(pos_valid, pos_ids, -1),
                                                  chunk_segment_ids)
    chunk_level = jnp.zeros_like(chunk_labels) if positives == "token" else chunk_labels
    token_level = pos_valid & ~chunk_level
    s_pos = chunk_sums(jnp.where(chunk_level, sp_pos, 0.0), chunk_segment_ids)    # [B,T,K]
    chunk_pos_valid = chunk_sums(chunk_level.astype(jnp.int32), chunk_segment_ids) > 0
    tok_terms = jax.nn.softplus(-z_all[:, :k])                                     # -log sigmoid
    n_pos_chunk = jnp.sum(chunk_pos_valid.astype(jnp.float32))
    n_pos_token = jnp.sum(token_level.astype(jnp.float32))
    n_pos = n_pos_chunk + n_pos_token
    pos_terms = positive_bce(jnp.where(chunk_pos_valid, s_pos, 1.0))
    if balance == "concept":
        # the id of a chunk-level (chunk, slot) pair: the slot's id, the same at every token
        chunk_ids_of = jax.vmap(lambda v, i: jax.ops.segment_max(v, i, t))(
            jnp.where(chunk_level, pos_ids, -1).reshape(b, t, k),
            chunk_segment_ids.astype(jnp.int32) - 1)                               # [B,T,K]
        pos_loss = concept_balanced_mean(
            jnp.concatenate([pos_terms.reshape(-1), tok_terms.reshape(-1)]),
            jnp.concatenate([chunk_ids_of.reshape(-1), pos_ids.reshape(-1)]),
            jnp.concatenate([chunk_pos_valid.reshape(-1), token_level.reshape(-1)]),
            head.n_concepts)
    elif balance == "none":
        pos_sum = (jnp.sum(jnp.where(chunk_pos_valid, pos_terms, 0.0))
                   + jnp.sum(jnp.where(token_level, tok_terms, 0.0)))
        pos_loss = pos_sum / jnp.maximum(n_pos, 1.0)
    else:
        raise ValueError(f"balance must be 'none' or 'concept', got {balance!r}")

    # (b) + (c) negatives: per-token softplus.
    neg_sum = jnp.sum(jnp.where(neg_valid, sp_neg, 0.0))
    n_neg_s = jnp.sum(neg_valid.astype(jnp.float32))
    top_sum = n_neg_t = jnp.zeros((), jnp.float32)
    if topk_ids is not None:
        sp_top = sp[:, k:]
        top_sum = jnp.sum(jnp.where(top_valid, sp_top, 0.0))
        n_neg_t = jnp.sum(top_valid.astype(jnp.float32))
    n_neg = n_neg_s + n_neg_t
    neg_loss = (neg_sum + top_sum) / jnp.maximum(n_neg, 1.0)

    loss = pos_weight * pos_loss + neg_weight * neg_loss
    if pooled_weight:
        # the keys fit the pooled read-out of states held fixed, as a probe does: with the
        # gradient into the backbone too it cost the demo's LM 0.17 nats by step 900
        q_fixed = head.query(jax.lax.stop_gradient(hidden.reshape(n, d)))
        pooled = pooled_chunk_loss(head.logits_for(q_fixed, per_token[0]), chunk_labels,
                                   shared_logits(head, q_fixed, neg_ids), neg_valid,
                                   chunk_segment_ids)
        loss = loss + pooled_weight * pooled
    sg = jax.lax.stop_gradient
    n_chunks = jnp.sum((chunk_sums(real[:, None].astype(jnp.int32), chunk_segment_ids) > 0)
                       .astype(jnp.float32))
    aux = {
        "pos_loss": sg(pos_loss), "neg_loss": sg(neg_loss),
        "neg_sampled_loss": sg(neg_sum / jnp.maximum(n_neg_s, 1.0)),
        "neg_topk_loss": sg(top_sum / jnp.maximum(n_neg_t, 1.0)),
        "n_pos_pairs": n_pos, "n_neg_pairs": n_neg, "n_chunks": n_chunks,
        "pooled_loss": sg(pooled) if pooled_weight else jnp.zeros((), jnp.float32),
        "pos_detected": (jnp.sum((chunk_pos_valid & (s_pos > jnp.log(2.0))).astype(jnp.float32))
                         + jnp.sum((token_level & (z_all[:, :k] > 0)).astype(jnp.float32)))
        / jnp.maximum(n_pos, 1.0),
    }
    if with_auroc:
        # Chunk detection by S_cj whatever ``positives`` trains (the eval binary's
        # definition): under "token" the loss scores no chunk sums, so form them here.
        if positives == "token":
            s_pos = chunk_sums(jnp.where(chunk_labels, sp_pos, 0.0), chunk_segment_ids)
            chunk_pos_valid = chunk_sums(chunk_labels.astype(jnp.int32), chunk_segment_ids) > 0
        s_neg = chunk_sums(jnp.where(neg_valid, sp_neg, 0.0), chunk_segment_ids)  # [B,T,M]
        chunk_neg_valid = chunk_sums(neg_valid.astype(jnp.int32), chunk_segment_ids) > 0
        scores = jnp.concatenate([s_pos.reshape(-1), s_neg.reshape(-1)])
        labels = jnp.concatenate([jnp.ones(s_pos.size, bool), jnp.zeros(s_neg.size, bool)])
        mask = jnp.concatenate([chunk_pos_valid.reshape(-1), chunk_neg_valid.reshape(-1)])
        aux["auroc"] = concept_auroc(sg(scores), labels, mask)
    return loss, aux


def pooled_chunk_loss(z_pos: jax.Array, pos_valid: jax.Array, z_neg: jax.Array,
                      neg_valid: jax.Array, chunk_segment_ids: jax.Array) -> jax.Array:
    """BCE of each chunk's mean logit against its chunk labels (module docstring, L_pooled).

    z_pos [N,K] the label slots' logits, pos_valid [N,K] the slots holding a chunk-level
    label; z_neg [N,M] the sampled ids' logits, neg_valid [N,M] those scored (not a
    positive of the token's chunk); chunk_segment_ids [B,T], N = B*T. A (chunk, slot) or
    (chunk, sampled id) pair counts once, with zbar its logit's mean over the chunk's
    tokens where it is valid.
    """
    def chunk_mean(z, valid):
        total = chunk_sums(jnp.where(valid, z, 0.0), chunk_segment_ids)             # [B,T,S]
        count = chunk_sums(valid.astype(jnp.float32), chunk_segment_ids)
        return total / jnp.maximum(count, 1.0), count > 0

    zbar_pos, has_pos = chunk_mean(z_pos, pos_valid)
    zbar_neg, has_neg = chunk_mean(z_neg, neg_valid)
    pos = jnp.sum(jnp.where(has_pos, jax.nn.softplus(-zbar_pos), 0.0))
    neg = jnp.sum(jnp.where(has_neg, jax.nn.softplus(zbar_neg), 0.0))
    return (pos / jnp.maximum(jnp.sum(has_pos.astype(jnp.float32)), 1.0)
            + neg / jnp.maximum(jnp.sum(has_neg.astype(jnp.float32)), 1.0))


def concept_balanced_mean(terms: jax.Array, ids: jax.Array, valid: jax.Array,
                          n_concepts: int) -> jax.Array:
    """Mean over the concepts with a valid pair of each concept's mean term.

    terms, ids, valid [P]. Pair p weighs 1 / (n_j * J), n_j the valid pairs of its
    concept j, J the concepts with any: a concept on thousands of tokens (a play's
    label on every token of its scenes) and one on a single gloss document weigh
    the same, where the plain mean over pairs lets the frequent labels decide the
    ranking of the head's logits (and the rare ones never reach a token's top-k).
    O(P + C): one segment sum of counts over the concept axis.
    """
    ids = jnp.where(valid, ids, 0).astype(jnp.int32)
    counts = jax.ops.segment_sum(valid.astype(jnp.float32), ids, n_concepts)        # [C]
    n_labelled = jnp.sum((counts > 0).astype(jnp.float32))
    weight = jnp.where(valid, 1.0 / jnp.maximum(counts[ids], 1.0), 0.0)
    return jnp.sum(jnp.where(valid, terms, 0.0) * weight) / jnp.maximum(n_labelled, 1.0)


def pooled_label_features(head, concept_ids: jax.Array) -> jax.Array:
    """Teacher-forcing features: sum_{valid distinct j in labels} E[j], [B,T,K] -> [B,T,D] fp32.

    Equal to summing head.concept_vectors(j) over the labels; for a factorized
    head the sum is taken in rank space and projected once (linearity).
    Tokens without labels (and padding) get zeros.
    """
    valid = first_occurrence(concept_ids)
    lead, k = concept_ids.shape[:-1], concept_ids.shape[-1]
    mixed = head.mix_values(valid.reshape(-1, k).astype(jnp.float32),
                            jnp.where(valid, concept_ids, 0).reshape(-1, k).astype(jnp.int32))
    return head.out_proj(mixed).reshape(*lead, -1)
