"""Steering training: make a concept's direction, injected, light up its head and its text.

Off by default (loss.steering_weight = 0). When on, every
``loss.steering_period`` steps, for each sequence b of the batch:

  c_b     a concept labelled somewhere in the sequence (uniform over its
          labelled (token, slot) entries; rows without labels are skipped)
  lifted  the tokens labelled c_b: the ones the concept should make likely
  d_b     = E_k[c_b] / ||E_k[c_b]||,  alpha_b = target / max_v (W_v . d_b)
          (stop-gradient: Steerling's calibration, target in logit units)
  inject  alpha_b d_b into the residual stream from layer L on (as
          cbm_lm.inference.steering does at generation time), at the
          positions that PREDICT the lifted tokens: t with token t+1 lifted
          (autoregressive), or the lifted tokens themselves, masked (diffusion)

and two terms over the injected positions P:

  head response   L_head = mean_{t in P} softplus(-z_{t,c_b})      (-log sigmoid: the
                  known head reads the injected concept back)
                  + mean_{t in Q} softplus(z_{t,c_b})             (and only there: Q are
                  the row's real positions neither injected nor labelled c_b)
  expression      L_out  = mean_{t in P} CE(logits_t, lifted token)   (the injected
                  direction makes the concept's text likely)

  L_steer = L_head + L_out, added with weight loss.steering_weight.

The direction's gradient flows into E_k, so training shapes the concept
embeddings into directions that steer; the calibration alpha does not.
Status: not yet a recipe that works. Measured on the demo model (41 extra
steps, weight 1, every step, vs 41 plain steps as control; steering_eval
with target 8): without the Q term every concept became "present" in ~99%
of generations (control 63%); with it, still 99%, and the base perplexity
of generated text rose from 47 to 70. Smaller weights / longer periods are
untested; keep it off (the default) unless you measure.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cbm_lm.model.lm import predicting_positions
from cbm_lm.objectives.diffusion import token_cross_entropy


def pick_concepts(rng, concept_ids: jax.Array, segment_ids: jax.Array):
    """One labelled concept per row: (c [B] int32, has_label [B] bool)."""
    b = concept_ids.shape[0]
    valid = (concept_ids >= 0) & (segment_ids[..., None] > 0)
    flat_valid = valid.reshape(b, -1)
    g = jax.random.gumbel(rng, flat_valid.shape)
    pick = jnp.argmax(jnp.where(flat_valid, g, -jnp.inf), axis=-1)
    c = jnp.take_along_axis(concept_ids.reshape(b, -1), pick[:, None], axis=-1)[:, 0]
    return jnp.maximum(c, 0).astype(jnp.int32), jnp.any(flat_valid, -1)


def elsewhere_positions(segment_ids: jax.Array, at: jax.Array, lifted: jax.Array,
                        inject_at: jax.Array, has: jax.Array) -> jax.Array:
    """[B,T] bool: the real positions the head loss scores as the concept's negatives.

    Neither a scored position (``at``), a labelled one (``lifted``) nor one the injection
    reaches (``inject_at``: under diffusion_shift also the position before each lifted run,
    which carries the full injection and must not be trained to read the concept as absent),
    in rows that have a concept (``has`` [B]).
    """
    return (segment_ids > 0) & ~at & ~lifted & ~inject_at & has[:, None]


def steering_loss(model, tokens, segment_ids, positions, concept_ids, rng, *, diffusion: bool,
                  mask_id: int, target: float, layer: int):
    """Returns (L_steer scalar, metrics). Shapes: tokens etc. [B,T], concept_ids [B,T,K]."""
    c, has = pick_concepts(rng, concept_ids, segment_ids)
    lifted = jnp.any(concept_ids == c[:, None, None], -1) & (segment_ids > 0) & has[:, None]
    head = model.rewrite.known_head
    e = head.concept_vectors(c)                                                   # [B,D]
    d = e / (jnp.linalg.norm(e, axis=-1, keepdims=True) + 1e-12)
    peak = jnp.max(jax.lax.stop_gradient(d) @ jax.lax.stop_gradient(
        model.unembedding()).astype(jnp.float32).T, axis=-1)
    alpha = jax.lax.stop_gradient(target / jnp.maximum(peak, 1e-6))              # [B]

    if diffusion:
        at = lifted
        inputs = jnp.where(at, mask_id, tokens)
        targets = tokens
    else:
        same_doc = segment_ids[:, :-1] == segment_ids[:, 1:]
        at = jnp.pad(lifted[:, 1:] & same_doc, ((0, 0), (0, 1)))
        inputs, targets = tokens, jnp.roll(tokens, -1, axis=1)
    # where generation injects (inference/steered_call.py): under diffusion_shift token i is
    # read from position i-1, so that position is steered too
    inject_at = predicting_positions(at, segment_ids, diffusion and model.config.diffusion_shift)
    injection = (alpha[:, None, None] * inject_at[..., None]) * d[:, None, :]
    out = model(inputs, positions=positions, segment_ids=segment_ids, injection=injection,
                inject_layer=layer, inject_alpha=1.0)

    b, t, dm = out.hidden.shape
    z = head.logits_for(head.query(out.hidden.reshape(b * t, dm)),
                        jnp.repeat(c, t)[:, None]).reshape(b, t)
    w = at.astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)
    q = elsewhere_positions(segment_ids, at, lifted, inject_at, has).astype(jnp.float32)
    head_loss = (jnp.sum(w * jax.nn.softplus(-z)) / n
                 + jnp.sum(q * jax.nn.softplus(z)) / jnp.maximum(q.sum(), 1.0))
    out_loss = jnp.sum(w * token_cross_entropy(out.logits, targets)) / n
    metrics = {"steering_head_loss": head_loss, "steering_out_loss": out_loss,
               "steering_positions": w.sum(),
               "steering_head_prob": jnp.sum(w * jax.nn.sigmoid(z)) / n,
               "steering_head_prob_elsewhere":
                   jnp.sum(q * jax.nn.sigmoid(z)) / jnp.maximum(q.sum(), 1.0)}
    return head_loss + out_loss, metrics
