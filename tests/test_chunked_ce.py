"""objectives/chunked_ce.py: token CE from hidden states, a chunk of positions at a
time, equals the dense CE (values and gradients) and never forms [B,T,V]."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbm_lm.objectives import chunked_token_ce, token_cross_entropy
from tests.jaxpr_probe import max_intermediate_with_dim

B, T, D, V = 2, 37, 16, 301   # T not a multiple of the chunk: the padded tail is dropped


def _inputs():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k1, (B, T, D))
    w = jax.random.normal(k2, (V, D)) * 0.5
    y = jax.random.randint(k3, (B, T), 0, V)
    return x, w, y


def test_values_match_numpy_reference():
    x, w, y = _inputs()
    ce, hit = chunked_token_ce(x, w, y, chunk=8)
    logits = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    ref = lse - np.take_along_axis(logits, np.asarray(y)[..., None], -1)[..., 0]
    np.testing.assert_allclose(ce, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(hit, logits.argmax(-1) == np.asarray(y))


def test_gradients_match_dense():
    x, w, y = _inputs()
    weights = jnp.linspace(0.1, 1.0, B * T).reshape(B, T)

    def dense(x, w):
        return jnp.sum(weights * token_cross_entropy(jnp.einsum("btd,vd->btv", x, w), y))

    def chunked(x, w):
        return jnp.sum(weights * chunked_token_ce(x, w, y, chunk=8)[0])

    gd, gc = jax.grad(dense, (0, 1))(x, w), jax.grad(chunked, (0, 1))(x, w)
    for a, b in zip(gd, gc):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_no_whole_logits_tensor():
    x, w, y = _inputs()
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: chunked_token_ce(x, w, y, chunk=8)[0].sum(),
                                    (0, 1)))(x, w)
    assert max_intermediate_with_dim(jaxpr, V) <= B * 8 * V      # one chunk at a time


@pytest.mark.parametrize("objective", ["autoregressive", "diffusion"])
def test_train_step_with_chunked_ce_equals_dense(objective):
    """loss.ce_chunk_tokens changes how the LM loss is computed, not its value or gradient."""
    from tests.test_train_step import _config, _run

    def cfg(chunk):
        c = _config(**({"objective": "diffusion", "attention": "block_causal",
                        "diffusion_block_size": 8} if objective == "diffusion" else {}))
        c.loss.ce_chunk_tokens = chunk
        return c

    _, dense = _run(cfg(0))
    _, chunked = _run(cfg(12))     # 32 positions: chunks of 12, a padded tail
    for a, b in zip(dense, chunked):
        for k in ("loss", "lm_loss", "grad_norm"):
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, err_msg=k)
        acc = "masked_acc" if objective == "diffusion" else "next_token_acc"
        np.testing.assert_allclose(a[acc], b[acc])
