"""The known head's key rows under their own rate and decay (train/optimizer.py), checked
against AdamW's first step written out by hand in numpy."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cbm_lm.config_validation import ConfigError, validate_config
from cbm_lm.default_config import base_config
from cbm_lm.train.optimizer import decay_mask, known_head_keys, make_optimizer

LR, WD, EPS = 1e-2, 0.1, 1e-8


def _opt_cfg(**over):
    c = ml_collections.ConfigDict(dict(learning_rate=LR, warmup_steps=0, min_lr_ratio=0.1,
                                       weight_decay=WD, b1=0.9, b2=0.95, eps=EPS,
                                       grad_clip=1e6, known_keys_lr_scale=1.0,
                                       known_keys_weight_decay=WD))
    c.update(over)
    return c


def _params(rng):
    return {"rewrite": {"known_head": {"predictor": rng.normal(size=(5, 3)),
                                       "embedding": rng.normal(size=(5, 3))},
                        "unknown_head": {"predictor_up": rng.normal(size=(4, 2))}},
            "norm": {"scale": rng.normal(size=(3,))}}


def _first_adamw_step(p, g, lr, wd, decays):
    """AdamW's first update: m_hat = g, v_hat = g^2, so -lr (g / (|g| + eps) + wd p)."""
    return -lr * (g / (np.abs(g) + EPS) + (wd * p if decays else 0.0))


def test_labels_pick_the_known_key_rows_only():
    labels = known_head_keys(_params(np.random.default_rng(0)))
    assert labels["rewrite"]["known_head"]["predictor"] == "known_keys"
    assert labels["rewrite"]["known_head"]["embedding"] == "rest"
    assert labels["rewrite"]["unknown_head"]["predictor_up"] == "rest"   # another head's keys
    assert labels["norm"]["scale"] == "rest"


def test_key_rows_take_the_scaled_rate_and_their_own_decay():
    rng = np.random.default_rng(1)
    params = jax.tree.map(jnp.asarray, _params(rng))
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
    tx, _ = make_optimizer(_opt_cfg(known_keys_lr_scale=10.0, known_keys_weight_decay=0.0), 100)
    updates, _ = tx.update(grads, tx.init(params), params)
    np_p, np_g = jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, grads)
    keys = ("rewrite", "known_head", "predictor")
    want_keys = _first_adamw_step(np_p[keys[0]][keys[1]][keys[2]], np_g[keys[0]][keys[1]][keys[2]],
                                  10 * LR, 0.0, True)
    np.testing.assert_allclose(updates["rewrite"]["known_head"]["predictor"], want_keys, rtol=1e-5)
    for path, decays in ((("rewrite", "known_head", "embedding"), True),
                         (("rewrite", "unknown_head", "predictor_up"), True),
                         (("norm", "scale"), False)):        # 1-D: exempt from decay
        p, g, u = np_p, np_g, updates
        for k in path:
            p, g, u = p[k], g[k], u[k]
        np.testing.assert_allclose(u, _first_adamw_step(p, g, LR, WD, decays), rtol=1e-5)


def test_defaults_keep_the_single_adamw_state():
    """Scale 1 and the shared decay build the optimizer older checkpoints saved."""
    params = jax.tree.map(jnp.asarray, _params(np.random.default_rng(2)))
    tx, _ = make_optimizer(_opt_cfg(), 100)
    plain = optax.apply_if_finite(optax.chain(
        optax.clip_by_global_norm(1e6),
        optax.adamw(lambda step: LR, weight_decay=WD, mask=decay_mask)), 1)
    assert jax.tree.structure(tx.init(params)) == jax.tree.structure(plain.init(params))
    tx_keys, _ = make_optimizer(_opt_cfg(known_keys_lr_scale=3.0), 100)
    assert jax.tree.structure(tx_keys.init(params)) != jax.tree.structure(plain.init(params))


def test_key_decay_follows_weight_decay_until_set():
    c = base_config()
    c.optimizer.weight_decay = 0.3
    assert c.optimizer.known_keys_weight_decay == pytest.approx(0.3)
    c.optimizer.known_keys_weight_decay = 0.0
    assert c.optimizer.known_keys_weight_decay == 0.0 and c.optimizer.weight_decay == 0.3


@pytest.mark.parametrize("field,value", [("known_keys_lr_scale", 0.0),
                                         ("known_keys_weight_decay", -0.1)])
def test_bad_key_settings_are_refused(field, value):
    c = base_config()
    c.optimizer[field] = value
    with pytest.raises(ConfigError, match=f"optimizer.{field}"):
        validate_config(c)
