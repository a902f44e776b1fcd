"""Which token's concept labels a position carries: the token it predicts.

A position's concept features enter the logit of the token predicted there, so the
concepts a position is trained to detect (concept loss), is teacher-forced with, and
is explained by (logit decomposition) are those of the chunk of that predicted token:

  diffusion:       position t predicts token t     -> labels of token t (as stored)
  autoregressive:  position t predicts token t+1   -> labels of token t+1

so for AR the batch's per-token labels shift left by one inside each document:

  concept_ids'[b,t]       = concept_ids[b,t+1]        if segment_ids[b,t] == segment_ids[b,t+1] > 0
                          = -1 (no labels)            otherwise (a document's last token, padding)
  chunk_segment_ids'[b,t] = chunk_segment_ids[b,t+1]  same condition, else 0 (not scored)

A chunk's soft-OR then runs over the positions that predict its tokens: the position
before the chunk's first token up to the one before its last. Steering follows the same
rule: overriding a concept at position t changes token t+1 (AR) or token t (diffusion).
Shapes: concept_ids [B,T,K], chunk_segment_ids / segment_ids [B,T].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def align_labels_to_predictions(concept_ids: jax.Array, chunk_segment_ids: jax.Array,
                                segment_ids: jax.Array, objective: str
                                ) -> tuple[jax.Array, jax.Array]:
    """(concept_ids, chunk_segment_ids) as seen by the positions that predict each token."""
    if objective == "diffusion":
        return concept_ids, chunk_segment_ids
    if objective != "autoregressive":
        raise ValueError(f"objective must be 'diffusion' or 'autoregressive', got {objective!r}")
    same = (segment_ids[:, :-1] == segment_ids[:, 1:]) & (segment_ids[:, :-1] > 0)  # [B,T-1]
    same = jnp.concatenate([same, jnp.zeros_like(same[:, :1])], axis=1)             # [B,T]
    ids = jnp.where(same[..., None], jnp.roll(concept_ids, -1, axis=1), -1)
    chunks = jnp.where(same, jnp.roll(chunk_segment_ids, -1, axis=1), 0)
    return ids.astype(concept_ids.dtype), chunks.astype(chunk_segment_ids.dtype)
