"""model/sparse_rows.py: blockwise pick / mix equal the row-gather forms (values and
gradients, repeated ids included), and never form the [N,S,Q] gathered rows."""

import jax
import jax.numpy as jnp
import numpy as np

from cbm_lm.model.sparse_rows import mix, pick
from jax.extend.core import jaxprs_in_params

N, S, C, Q, BLOCK = 12, 5, 37, 7, 8      # C not a multiple of the block


def _inputs():
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (N, Q))
    table = jax.random.normal(ks[1], (C, Q))
    ids = jax.random.randint(ks[2], (N, S), 0, C).at[0, 1].set(0).at[0, 2].set(0)  # a repeat
    w = jax.random.normal(ks[3], (N, S))
    return q, table, ids, w


def test_values_equal_gathers():
    q, table, ids, w = _inputs()
    rows = np.asarray(table)[np.asarray(ids)]                                 # [N,S,Q]
    np.testing.assert_allclose(pick(q, table, ids, BLOCK),
                               np.einsum("nq,nsq->ns", q, rows), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mix(w, ids, table, BLOCK),
                               np.einsum("ns,nsq->nq", w, rows), rtol=1e-5, atol=1e-5)


def test_gradients_equal_gathers():
    q, table, ids, w = _inputs()
    gp = jax.random.normal(jax.random.PRNGKey(5), (N, S))
    gm = jax.random.normal(jax.random.PRNGKey(6), (N, Q))

    def f_block(q, table, w):
        return jnp.sum(gp * pick(q, table, ids, BLOCK)) + jnp.sum(gm * mix(w, ids, table, BLOCK))

    def f_gather(q, table, w):
        rows = jnp.take(table, ids, axis=0)
        return (jnp.sum(gp * jnp.einsum("nq,nsq->ns", q, rows))
                + jnp.sum(gm * jnp.einsum("ns,nsq->nq", w, rows)))

    for a, b in zip(jax.grad(f_block, (0, 1, 2))(q, table, w),
                    jax.grad(f_gather, (0, 1, 2))(q, table, w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_no_gathered_rows_tensor():
    q, table, ids, w = _inputs()
    f = jax.grad(lambda q, t, w: pick(q, t, ids, BLOCK).sum() + mix(w, ids, t, BLOCK).sum(),
                 (0, 1, 2))
    shapes = []

    def walk(j):
        for e in j.eqns:
            shapes.extend(tuple(getattr(v.aval, "shape", ())) for v in e.outvars)
            for sub in jaxprs_in_params(e.params):
                walk(sub)

    walk(jax.make_jaxpr(f)(q, table, w).jaxpr)
    assert (N, BLOCK) in shapes                       # the per-block products are there
    assert not any(len(s) == 3 and s[:2] == (N, S) and s[2] == Q for s in shapes)


def test_blockwise_scoring_model_equals_gather_model():
    """model.concepts.scoring changes how the heads read rows, not what they compute."""
    from flax import nnx

    from tests.model_fixtures import make_model, random_tokens, tiny_config

    outs, grads = [], []
    for scoring in ("gather", "blockwise"):
        cfg = tiny_config(concepts={"scoring": scoring, "dense_threshold": 8})
        model = make_model(cfg)
        tokens = random_tokens(cfg, 2, 12)
        iv = (jnp.full((2, 12, 1), 3, jnp.int32), jnp.full((2, 12, 1), 0.7))

        def loss(m):
            o = m(tokens, intervene_known=iv)
            return jnp.sum(o.logits ** 2) * 1e-3 + jnp.sum(o.unknown_features ** 2), o

        (_, o), g = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)   # one compile
        outs.append(o)
        grads.append(nnx.to_pure_dict(g))
    np.testing.assert_allclose(outs[0].logits, outs[1].logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(outs[0].known.indices, outs[1].known.indices)
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
