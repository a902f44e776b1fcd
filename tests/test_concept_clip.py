"""The concept-logit cap: a concept pushed past the clip still gets gradient from its
loss under the training modes, while the forward values stay Steerling's hard clip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cbm_lm.model.concept_topk import cap_logits
from cbm_lm.model.concepts import ConceptHead
from cbm_lm.objectives import chunk_concept_loss


def test_cap_values_by_hand():
    z = jnp.array([-40.0, -15.0, -3.0, 0.0, 7.5, 15.0, 22.0])
    np.testing.assert_array_equal(cap_logits(z, 15.0, "hard"), [-15, -15, -3, 0, 7.5, 15, 15])
    np.testing.assert_array_equal(cap_logits(z, 15.0, "straight_through"),
                                  [-15, -15, -3, 0, 7.5, 15, 15])
    np.testing.assert_allclose(cap_logits(z, 15.0, "soft"), 15 * np.tanh(np.asarray(z) / 15),
                               rtol=1e-6)
    g_hard = jax.grad(lambda z: cap_logits(z, 15.0, "hard").sum())(z)
    g_st = jax.grad(lambda z: cap_logits(z, 15.0, "straight_through").sum())(z)
    np.testing.assert_array_equal(g_hard, [0, 0.5, 1, 1, 1, 0.5, 0])   # jnp.clip: 1/2 at the bounds
    np.testing.assert_array_equal(g_st, np.ones(7))


def _saturated_head(mode):
    head = ConceptHead(n_concepts=8, n_padded=16, d_model=4, rank=0, topk=2, report_topk=None,
                       block_size=4, dense_threshold=100, clip=15.0, axis_name="known_concepts",
                       init_std=0.1, rngs=nnx.Rngs(0), clip_mode=mode)
    # Concept 3 reads the first hidden unit with a huge weight: logit 40 > clip at every token.
    head.predictor[...] = head.predictor[...].at[3].set(jnp.array([40.0, 0.0, 0.0, 0.0]))
    return head


@pytest.mark.parametrize("mode,moves", [("hard", False), ("straight_through", True),
                                        ("soft", True)])
def test_saturated_wrong_concept_gets_gradient(mode, moves):
    head = _saturated_head(mode)
    hidden = jnp.zeros((1, 4, 4)).at[..., 0].set(1.0)
    ids = jnp.full((1, 4, 2), -1, jnp.int32).at[..., 0].set(5)     # the chunk is about 5, not 3
    chunk = jnp.ones((1, 4), jnp.int32)

    def loss(head):
        top = head(hidden).topk_indices                              # 3 is predicted: a negative
        return chunk_concept_loss(head, hidden, ids, chunk, top, jax.random.key(0),
                                  n_negatives=1)[0]

    g = nnx.grad(loss)(head)
    g3 = float(jnp.abs(g["predictor"][...][3]).sum())
    assert (g3 > 1e-3) == moves, g3
    if moves:  # the gradient pushes the wrong concept's logit down (weight row 3, unit 0)
        assert float(g["predictor"][...][3, 0]) > 0


def test_straight_through_keeps_forward_values():
    hard, st = _saturated_head("hard"), _saturated_head("straight_through")
    h = jax.random.normal(jax.random.key(1), (2, 5, 4)) * 3
    a, b = hard(h), st(h)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_factorized_query_is_fp32_under_bf16_compute():
    """q = h D for the factorized (unknown) head: from bf16 h and D, the product is
    accumulated and kept in fp32 (docstring), not rounded to bf16 (a relative error of
    up to 2^-9 against the exact product)."""
    head = ConceptHead(n_concepts=8, n_padded=16, d_model=64, rank=8, topk=2, report_topk=None,
                       block_size=4, dense_threshold=100, clip=15.0, axis_name="unknown_concepts",
                       init_std=0.5, rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(1), (3, 5, 64)).astype(jnp.bfloat16)
    q = head.query(h)
    assert q.dtype == jnp.float32
    d_bf16 = np.asarray(head.predictor_down[...].astype(jnp.bfloat16), np.float64)
    exact = np.asarray(h, np.float64) @ d_bf16              # the product of the bf16 operands
    rel = np.abs(np.asarray(q, np.float64) - exact) / (np.abs(exact) + 1e-3)
    assert rel.max() < 1e-4, rel.max()
