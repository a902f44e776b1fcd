"""Without an unknown head: composed is exactly h, yet steering and teacher forcing
move the logits by exactly what the overridden concept features predict.

Independent truths: the concept's embedding row and the unembedding, read from
the parameters (delta logit_y = v (E_c . W_y) for a concept c added at value v),
and bitwise equality with the backbone output h.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cbm_lm.attribution.decomposition import decompose_logits
from model_fixtures import make_model, random_tokens, tiny_config


def _model(dtype="float32"):
    cfg = tiny_config(dtype=dtype, concepts=dict(n_unknown=0))
    return make_model(cfg), random_tokens(cfg, 2, 8)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_composed_is_exactly_h(dtype):
    model, tokens = _model(dtype)
    out = model(tokens)
    assert out.composed.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(out.composed, np.float32),
                                  np.asarray(out.hidden, np.float32))


def test_steering_moves_logits_by_the_concept_direction():
    model, tokens = _model()
    base = model(tokens)
    # A concept outside position (0, 3)'s top-k, added at weight 0.99 there only.
    top = set(np.asarray(base.known.topk_indices[0, 3]).tolist())
    c = next(i for i in range(model.config.concepts.n_known) if i not in top)
    ids = jnp.full(tokens.shape + (1,), -1, jnp.int32).at[0, 3, 0].set(c)
    vals = jnp.zeros(tokens.shape + (1,), jnp.float32).at[0, 3, 0].set(0.99)
    steered = model(tokens, intervene_known=(ids, vals))

    e_c = np.asarray(model.rewrite.known_head.embedding[...])[c]          # [D]
    w = np.asarray(model.unembedding())                                   # [V,D]
    delta = np.array(steered.logits - base.logits)
    np.testing.assert_allclose(delta[0, 3], 0.99 * w @ e_c, atol=2e-5)
    assert np.abs(delta[0, 3]).max() > 1e-2                              # a real effect
    delta[0, 3] = 0.0
    np.testing.assert_allclose(delta, 0.0, atol=1e-6)                   # nowhere else

    # The exact decomposition still holds while steering.
    b, t = jnp.array([0, 0]), jnp.array([3, 3])
    y = jnp.array([5, 17])
    dec = decompose_logits(model, steered, b, t, y)
    np.testing.assert_allclose(dec.total(), dec.logit, atol=1e-4)


def test_teacher_forcing_moves_logits():
    model, tokens = _model()
    base = model(tokens)
    u = jax.random.normal(jax.random.key(3), base.hidden.shape) * 0.5
    teacher = base.known_features + u
    forced = model(tokens, teacher_features=teacher, teacher_alpha=1.0)
    want = np.asarray(base.logits) + np.einsum("btd,vd->btv", np.asarray(u),
                                               np.asarray(model.unembedding()))
    np.testing.assert_allclose(forced.logits, want, atol=1e-4)


@pytest.mark.parametrize("drop_epsilon", [False, True])
def test_lm_loss_trains_the_known_head_only_without_epsilon(drop_epsilon):
    model, tokens = _model()

    def loss_fn(model):
        logits = model(tokens, drop_epsilon=drop_epsilon).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

    g = nnx.grad(loss_fn)(model)
    known = float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(g["rewrite"]["known_head"])))
    assert (known > 1e-6) == drop_epsilon
    assert float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(g["backbone"]))) > 1e-6
