"""The unknown head's regularizers (objectives/regularizers.py): reconstruction and
independence by hand in float64, and the independence term's rank-space form for a
factorized head against the covariance of u = m B and the full form's gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbm_lm.objectives import (independence_loss, independence_loss_factorized,
                               reconstruction_loss)


def test_reconstruction_and_independence_hand_computed():
    r = np.random.default_rng(4)
    u, h, kn = (r.normal(size=(2, 3, 4)).astype(np.float32) for _ in range(3))
    valid = np.array([[True, True, False], [True, False, True]])
    rec = jax.jit(reconstruction_loss)(u, h, kn, valid)
    sel = valid.reshape(-1)
    uu, hh, kk = (x.reshape(6, 4)[sel].astype(np.float64) for x in (u, h, kn))
    np.testing.assert_allclose(float(rec), np.mean((uu - (hh - kk)) ** 2), rtol=1e-5)

    ind = jax.jit(independence_loss)(u, kn, valid)
    cov = (uu - uu.mean(0)).T @ (kk - kk.mean(0)) / len(uu)
    np.testing.assert_allclose(float(ind), np.sum(cov ** 2) / 16, rtol=1e-5)

    # The targets are stop-gradient'ed: only the unknown features receive gradient.
    g_rec = jax.jit(jax.grad(reconstruction_loss, argnums=(0, 1, 2)))(u, h, kn, valid)
    g_ind = jax.jit(jax.grad(independence_loss, argnums=(0, 1)))(u, kn, valid)
    assert float(jnp.abs(g_rec[0]).sum()) > 0 and float(jnp.abs(g_ind[0]).sum()) > 0
    assert all(float(jnp.abs(g).sum()) == 0.0 for g in (g_rec[1], g_rec[2], g_ind[1]))
    assert float(jnp.abs(g_rec[0][0, 2]).sum()) == 0.0       # invalid token


@pytest.mark.parametrize("normalization", ["population", "report"])
def test_independence_factorized_equals_full_form(normalization):
    """u = m B: the rank-space form against a float64 numpy covariance of u itself, and
    its gradients (m and B; none to the known features) against the full form's."""
    r = np.random.default_rng(5)
    m = r.normal(size=(2, 7, 3)).astype(np.float32)          # rank 3
    basis = r.normal(size=(3, 5)).astype(np.float32)          # D 5
    kn = r.normal(size=(2, 7, 5)).astype(np.float32)
    valid = r.random((2, 7)) < 0.7
    sel = valid.reshape(-1)
    uu = (m.reshape(-1, 3).astype(np.float64) @ basis)[sel]
    kk = kn.reshape(-1, 5)[sel].astype(np.float64)
    cross = (uu - uu.mean(0)).T @ (kk - kk.mean(0))
    n = len(uu)
    ref = np.sum(cross ** 2) / 25 / (n * n if normalization == "population" else n - 1)
    got = jax.jit(independence_loss_factorized, static_argnums=4)(m, basis, kn, valid,
                                                                 normalization)
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)

    def full(m_, b_, k_):
        return independence_loss(jnp.asarray(m_) @ b_, k_, valid, normalization)

    def factored(m_, b_, k_):
        return independence_loss_factorized(m_, b_, k_, valid, normalization)

    g_full = jax.jit(jax.grad(full, argnums=(0, 1, 2)))(m, basis, kn)
    g_fact = jax.jit(jax.grad(factored, argnums=(0, 1, 2)))(m, basis, kn)
    for a, b in zip(g_full[:2], g_fact[:2]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)
    assert float(jnp.abs(g_fact[0]).sum()) > 0 and float(jnp.abs(g_fact[2]).sum()) == 0.0
    with pytest.raises(ValueError, match="normalization"):
        independence_loss_factorized(m, basis, kn, valid, "batch")
