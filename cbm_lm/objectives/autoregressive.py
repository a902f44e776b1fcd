"""Next-token cross-entropy for causal LMs over packed rows.

  L = mean_{(b,t) in P} CE(logits[b,t], tokens[b,t+1])
  P = {(b,t) : segment_ids[b,t] == segment_ids[b,t+1] > 0}

so a prediction never crosses a document boundary and padding is never
scored. Shapes: logits [B,T,V] fp32, tokens / segment_ids [B,T] int32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cbm_lm.objectives.diffusion import token_cross_entropy


def next_token_pairs(segment_ids: jax.Array) -> jax.Array:
    """[B,T-1] bool: position t predicts t+1 inside one real document."""
    return (segment_ids[:, :-1] == segment_ids[:, 1:]) & (segment_ids[:, :-1] > 0)


def next_token_loss(logits: jax.Array, tokens: jax.Array, segment_ids: jax.Array
                    ) -> tuple[jax.Array, dict]:
    """Mean next-token CE over same-document pairs.

    Returns (loss scalar, aux) with aux:
      n_pairs   number of scored (t, t+1) pairs
      accuracy  argmax accuracy over the scored pairs
    """
    pred, target = logits[:, :-1], tokens[:, 1:]
    return next_token_loss_from_ce(token_cross_entropy(pred, target),
                                   jnp.argmax(pred, axis=-1) == target, segment_ids)


def next_token_loss_from_ce(ce: jax.Array, correct: jax.Array, segment_ids: jax.Array
                            ) -> tuple[jax.Array, dict]:
    """``next_token_loss`` from CE [B,T-1] and argmax hits [B,T-1] of position t
    predicting token t+1 (chunked_ce.py)."""
    valid = next_token_pairs(segment_ids)
    vf = valid.astype(jnp.float32)
    n = jnp.sum(vf)
    loss = jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(n, 1.0)
    correct = correct.astype(jnp.float32)
    return loss, {"n_pairs": n, "accuracy": jnp.sum(correct * vf) / jnp.maximum(n, 1.0)}
