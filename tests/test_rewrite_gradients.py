"""The design's cancellation: with epsilon kept, the LM loss sends no gradient
into the known head (known cancels inside composed); with epsilon dropped it
does. The unknown head never gets LM gradient (it reads stop_grad(h) and its
features are stop_grad'ed); the backbone always does."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from model_fixtures import make_model, random_tokens, tiny_config


def _grads(drop_epsilon):
    cfg = tiny_config()
    model = make_model(cfg)
    tokens = random_tokens(cfg, 2, 8)

    def loss_fn(model):
        logits = model(tokens, drop_epsilon=drop_epsilon).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

    return nnx.grad(loss_fn)(model)


def _norm(tree):
    return float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(tree)))


def test_epsilon_kept_blocks_lm_gradient_to_known_head():
    g = _grads(drop_epsilon=False)
    assert _norm(g["rewrite"]["known_head"]) == 0.0
    assert _norm(g["rewrite"]["unknown_head"]) == 0.0
    assert _norm(g["backbone"]["blocks"]) > 0.0


def test_epsilon_dropped_trains_known_head():
    g = _grads(drop_epsilon=True)
    assert _norm(g["rewrite"]["known_head"]["predictor"]) > 1e-6
    assert _norm(g["rewrite"]["known_head"]["embedding"]) > 1e-6
    assert _norm(g["rewrite"]["unknown_head"]) == 0.0
