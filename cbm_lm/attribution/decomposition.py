"""Exact logit decomposition over concepts (DESIGN.md section 2).

The LM head is linear in composed = known + unknown + residual, so for any
position (b, t) and target token y, with W_y the unembedding row of y:

  logit_y = sum_{i in S_k} w_i (E_k[i] . W_y)      known concepts
          + sum_{j in S_u} w_j (E_u[j] . W_y)      unknown concepts
          + residual . W_y                        epsilon (and, without an
                                                  unknown head, h - known)

S_k, S_u are the active sets the heads returned (top-k plus intervened ids),
w their weights. For a factorized unknown head E_u[j] = coef_j basis, so
E_u[j] . W_y = coef_j . (basis W_y) and no [C,D] table is formed.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cbm_lm.model.concepts import ConceptActivations, ConceptHead
from cbm_lm.model.lm import ConceptBottleneckLM, LMOutput


class LogitDecomposition(NamedTuple):
    """Contributions to logit[b, t, y] for N queried (b, t, y).

    known_ids / known_contrib:     [N,S_k] concept ids and w_i (E_k[i] . W_y)
    unknown_ids / unknown_contrib: [N,S_u] (S_u = 0 without an unknown head)
    epsilon_contrib:               [N]     residual . W_y
    logit:                         [N]     the model's logit, for checking
    known_weights / unknown_weights: [N,S_k] / [N,S_u] the weights w_i of the active slots
    """
    known_ids: jax.Array
    known_contrib: jax.Array
    unknown_ids: jax.Array
    unknown_contrib: jax.Array
    epsilon_contrib: jax.Array
    logit: jax.Array
    known_weights: jax.Array | None = None
    unknown_weights: jax.Array | None = None

    def total(self) -> jax.Array:
        """sum of all contributions [N]; equals ``logit`` up to float rounding."""
        return self.known_contrib.sum(-1) + self.unknown_contrib.sum(-1) + self.epsilon_contrib


def _head_contrib(head: ConceptHead, acts: ConceptActivations, b, t, w_y):
    """w_i (E[i] . W_y) for the active slots of head at (b, t) -> ids, contrib, w [N,S]."""
    ids = acts.indices[b, t]                                          # [N,S]
    weights = acts.weights[b, t].astype(jnp.float32)                  # [N,S]
    rows = jnp.take(head.values(), ids, axis=0).astype(jnp.float32)   # [N,S,V]
    if head.rank:
        target = w_y @ head.embedding_basis[...].astype(jnp.float32).T  # [N,r]: basis W_y
    else:
        target = w_y                                                   # [N,D]
    return ids, weights * jnp.einsum("nsv,nv->ns", rows, target), weights


def decompose_logits(model: ConceptBottleneckLM, out: LMOutput, batch_idx: jax.Array,
                     pos_idx: jax.Array, targets: jax.Array) -> LogitDecomposition:
    """Splits out.logits[batch_idx, pos_idx, targets] (each [N] int) into contributions."""
    w_y = jnp.take(model.unembedding(), targets, axis=0).astype(jnp.float32)  # [N,D]
    b, t = batch_idx, pos_idx
    known_ids, known_c, known_w = _head_contrib(model.rewrite.known_head, out.known, b, t, w_y)
    if out.unknown is not None:
        unknown_ids, unknown_c, unknown_w = _head_contrib(model.rewrite.unknown_head, out.unknown,
                                                          b, t, w_y)
    else:
        n = targets.shape[0]
        unknown_ids = jnp.zeros((n, 0), jnp.int32)
        unknown_c = unknown_w = jnp.zeros((n, 0), jnp.float32)
    residual = out.residual[b, t]
    eps_c = jnp.einsum("nd,nd->n", residual.astype(jnp.float32), w_y)
    return LogitDecomposition(known_ids, known_c, unknown_ids, unknown_c, eps_c,
                              out.logits[b, t, targets], known_w, unknown_w)
