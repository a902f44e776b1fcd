"""Optional steering training: off by default, on a period, and it makes injection steer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cbm_lm.data.synthetic import synthetic_batch
from cbm_lm.default_config import base_config
from cbm_lm.objectives.steering_loss import elsewhere_positions, pick_concepts, steering_loss
from cbm_lm.train.losses import compute_losses
from model_fixtures import make_model, tiny_config


def _setup(objective="autoregressive"):
    attention = "causal" if objective == "autoregressive" else "block_causal"
    cfg = tiny_config(attention=attention, objective=objective)
    return cfg, make_model(cfg, seed=2), synthetic_batch(cfg, 4, 24, 3, seed=1)


def test_pick_concepts_takes_a_labelled_concept_per_row():
    ids = -np.ones((3, 5, 2), np.int32)
    ids[0, 1] = [4, 9]
    ids[1, 3:, 0] = 7
    c, has = pick_concepts(jax.random.key(0), jnp.asarray(ids), jnp.ones((3, 5), jnp.int32))
    assert int(c[0]) in (4, 9) and int(c[1]) == 7 and has.tolist() == [True, True, False]


def _jit_losses(cfg, loss_cfg):
    """compute_losses(step) jitted as the train step runs it (the step is traced, so
    steps 3 and 4 share one compile; op-by-op it dispatched hundreds of tiny programs)."""
    return nnx.jit(lambda model, batch, step: compute_losses(
        model, batch, jax.random.key(0), step, loss_cfg=loss_cfg, model_cfg=cfg))


@pytest.mark.parametrize("objective", ["autoregressive", "diffusion"])
def test_off_by_default_and_on_a_period(objective):
    cfg, model, batch = _setup(objective)
    loss_cfg = base_config().loss
    assert loss_cfg.steering_weight == 0.0
    _, m = _jit_losses(cfg, loss_cfg)(model, batch, jnp.int32(3))
    assert "steering_loss" not in m
    loss_cfg = base_config().loss
    loss_cfg.update(steering_weight=0.5, steering_period=2)
    losses = _jit_losses(cfg, loss_cfg)
    off_total, off = losses(model, batch, jnp.int32(3))
    on_total, on = losses(model, batch, jnp.int32(4))
    assert float(off["steering_loss"]) == 0.0 and float(on["steering_loss"]) > 0
    assert float(on["steering_positions"]) > 0
    np.testing.assert_allclose(float(on["steering_loss"]),
                               float(on["steering_head_loss"] + on["steering_out_loss"]), rtol=1e-6)


def test_training_on_the_steering_loss_makes_injection_steer():
    """A few steps on L_steer alone raise the head's read-back and the lifted tokens' odds."""
    cfg, model, batch = _setup()
    args = (batch["tokens"], batch["segment_ids"], batch["positions"], batch["concept_ids"])
    kw = dict(diffusion=False, mask_id=cfg.resolved_mask_token_id, target=4.0, layer=1)
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, opt):
        def f(m):
            return steering_loss(m, *args, jax.random.key(0), **kw)
        (loss, metrics), grads = nnx.value_and_grad(f, has_aux=True)(model)
        opt.update(model, grads)
        return metrics

    first = train_step(model, opt)
    assert float(jnp.abs(jax.tree.leaves(nnx.state(model.rewrite.known_head))[0]).sum()) > 0
    for _ in range(30):
        last = train_step(model, opt)
    assert float(last["steering_head_prob"]) > float(first["steering_head_prob"]) + 0.1
    # ... without learning to fire for the concept where it is neither injected nor labelled
    assert float(last["steering_head_prob_elsewhere"]) < float(last["steering_head_prob"]) - 0.1
    assert float(last["steering_out_loss"]) < float(first["steering_out_loss"])


@pytest.mark.parametrize("shift", [False, True])
def test_diffusion_steering_loss_injects_where_generation_does(shift, monkeypatch):
    """Hand-written row: concept 5 labels tokens 3..5 (masked and scored). Generation
    injects at the masked positions, and under diffusion_shift (token i read from position
    i-1) at position 2 too; the training loss must inject at the same rows."""
    cfg = tiny_config(attention="block_causal", objective="diffusion", diffusion_shift=shift)
    model = make_model(cfg, seed=2)
    t = 8
    tokens = jnp.arange(1, t + 1, dtype=jnp.int32)[None]
    seg = jnp.ones((1, t), jnp.int32)
    ids = -np.ones((1, t, 2), np.int32)
    ids[0, 3:6, 0] = 5
    seen = {}
    real_call = type(model).__call__

    def spy(self, *a, injection=None, **kw):
        seen["rows"] = np.flatnonzero(np.abs(np.asarray(injection[0])).sum(-1) > 0).tolist()
        return real_call(self, *a, injection=injection, **kw)
    monkeypatch.setattr(type(model), "__call__", spy)
    steering_loss(model, tokens, seg, jnp.arange(t)[None], jnp.asarray(ids), jax.random.key(0),
                  diffusion=True, mask_id=cfg.resolved_mask_token_id, target=4.0, layer=1)
    assert seen["rows"] == ([2, 3, 4, 5] if shift else [3, 4, 5])


def test_the_head_negatives_exclude_every_injected_position():
    """Row 0: tokens 3..5 lifted and scored, position 2 injected too (diffusion_shift), 7
    padding -> negatives 0, 1, 6. Row 1 has no concept -> no negatives."""
    seg = jnp.array([[1] * 7 + [0], [1] * 8])
    lifted = jnp.zeros((2, 8), bool).at[0, 3:6].set(True)
    inject = lifted.at[0, 2].set(True)
    neg = elsewhere_positions(seg, lifted, lifted, inject, jnp.array([True, False]))
    assert np.flatnonzero(neg[0]).tolist() == [0, 1, 6] and not bool(neg[1].any())
