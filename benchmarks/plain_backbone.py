"""The baseline for the concept overhead: the same backbone without the rewrite layer.

  logits = Backbone(tokens) W_emb^T (tied),  loss = next-token CE,  AdamW step

Built from cbm_lm's own Backbone and optimizer so the only difference from
the concept-bottleneck train step is the concept layer and its losses.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cbm_lm import objectives as obj
from cbm_lm.model.backbone import Backbone
from cbm_lm.train.optimizer import make_optimizer


class PlainLM(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.backbone = Backbone(cfg, rngs=rngs)

    def __call__(self, tokens, positions, segment_ids):
        h = self.backbone(tokens, positions=positions, segment_ids=segment_ids)
        w = self.backbone.embedding[...].astype(h.dtype)
        return jnp.einsum("btd,vd->btv", h, w).astype(jnp.float32)


def _step(params, opt_state, batch, *, graphdef, tx):
    def loss_fn(p):
        logits = nnx.merge(graphdef, p)(batch["tokens"], batch["positions"], batch["segment_ids"])
        return obj.next_token_loss(logits, batch["tokens"], batch["segment_ids"])[0]

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
