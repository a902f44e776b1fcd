"""The baseline for the concept overhead: the same step without the rewrite layer.

  h = Backbone(tokens)  [B,T_model,D]   (two-stream diffusion: T_model = 2T, [noisy | clean])
  logits = h[:, :T] W_emb^T (tied)      only the LM stream is unembedded, as in train/losses.py
  loss = mean next-token CE             (chunked like the concept step when loss.ce_chunk_tokens;
                                         the same token_dot / ce_and_hit code as the concept step)
  AdamW step

Built from cbm_lm's own Backbone, cross-entropy and optimizer so the only
difference from the concept-bottleneck train step is the concept layer and
its losses (the diffusion loss weighting is elementwise work on [B,T]).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cbm_lm import objectives as obj
from cbm_lm.model.backbone import Backbone
from cbm_lm.model.layers import token_dot
from cbm_lm.train.optimizer import make_optimizer


class PlainLM(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.backbone = Backbone(cfg, rngs=rngs)

    def __call__(self, tokens, positions, segment_ids, stream=None):
        """-> final hidden h [B,T_model,D]."""
        return self.backbone(tokens, positions=positions, segment_ids=segment_ids, stream=stream)


def _step(params, opt_state, batch, *, graphdef, tx, lm_len=None, ce_chunk=0):
    """batch: tokens / positions / segment_ids [B,T_model] (+ stream for two-stream);
    lm_len: the LM stream's length T (None: all of T_model)."""
    def loss_fn(p):
        model = nnx.merge(graphdef, p)
        h = model(batch["tokens"], batch["positions"], batch["segment_ids"], batch.get("stream"))
        t = lm_len or h.shape[1]
        h, targets = h[:, :t], jnp.roll(batch["tokens"][:, :t], -1, axis=1)
        w = model.backbone.embedding[...]
        if ce_chunk:
            ce, _ = obj.chunked_token_ce(h, w, targets, ce_chunk)
        else:
            ce, _ = obj.ce_and_hit(token_dot(h, w.astype(h.dtype).T), targets)
        return jnp.mean(ce[:, :-1])

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def make_plain_step(model_cfg, opt_cfg, num_steps: int, seed: int = 0):
    """(jitted step(params, opt_state, batch) -> (params, opt_state, loss), params, opt_state)."""
    graphdef, params = nnx.split(PlainLM(model_cfg, rngs=nnx.Rngs(seed)), nnx.Param)
    params = params.to_pure_dict()
    tx, _ = make_optimizer(opt_cfg, num_steps)
    step = jax.jit(functools.partial(_step, graphdef=graphdef, tx=tx), donate_argnums=(0, 1))
    return step, params, tx.init(params)
