"""The exact logit decomposition: known + unknown + epsilon contributions sum
to the logit (1e-4, fp32), with and without interventions; and the concept
heads against a brute-force numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbm_lm.attribution.decomposition import decompose_logits
from cbm_lm.model.concept_topk import streaming_topk
from model_fixtures import make_model, random_tokens, tiny_config

B, T = 2, 12


def _all_queries(cfg, n_targets=5, seed=0):
    rng = np.random.default_rng(seed)
    b, t = np.meshgrid(np.arange(B), np.arange(T), indexing="ij")
    b, t = b.reshape(-1), t.reshape(-1)
    b, t = np.repeat(b, n_targets), np.repeat(t, n_targets)
    y = rng.integers(0, cfg.vocab_size, size=b.shape)
    return jnp.asarray(b), jnp.asarray(t), jnp.asarray(y)


def _residual(out, kept):
    """The residual from its definition, not as the leftover of composed:
    epsilon = h - known - unknown where epsilon is kept (``kept`` [B] bool), else 0;
    without an unknown head, h - known (the prediction's own residual)."""
    h, k, u = (np.asarray(x, np.float64) for x in (out.hidden, out.known_features,
                                                    out.unknown_features))
    if out.unknown is None:
        return h - k
    return np.asarray(kept, np.float64)[:, None, None] * (h - k - u)


def _check_identity(model, out, cfg, kept=(True, True)):
    b, t, y = _all_queries(cfg)
    dec = decompose_logits(model, out, b, t, y)
    w_y = np.asarray(model.unembedding(), np.float64)[np.asarray(y)]            # [N,D]
    eps = np.einsum("nd,nd->n", _residual(out, kept)[np.asarray(b), np.asarray(t)], w_y)
    np.testing.assert_allclose(dec.epsilon_contrib, eps, atol=1e-4, rtol=0)
    total = np.asarray(dec.known_contrib).sum(-1) + np.asarray(dec.unknown_contrib).sum(-1) + eps
    np.testing.assert_allclose(total, dec.logit, atol=1e-4, rtol=0)
    # The identity must not be trivially carried by epsilon alone.
    assert float(jnp.abs(dec.known_contrib).sum()) > 1e-2
    return dec


@pytest.mark.parametrize("concepts", [
    dict(),                                      # factorized unknown head
    dict(unknown_rank=0),                        # dense unknown head
    dict(n_unknown=0),                           # no unknown head
    dict(unknown_topk=None),                     # unknown head weights all concepts
])
def test_identity_without_interventions(concepts):
    cfg = tiny_config(concepts=concepts)
    model = make_model(cfg)
    out = model(random_tokens(cfg, B, T))
    dec = _check_identity(model, out, cfg)
    if cfg.concepts.use_unknown:
        assert float(jnp.abs(dec.unknown_contrib).sum()) > 1e-2


def test_identity_with_interventions_and_epsilon_dropped():
    cfg = tiny_config()
    model = make_model(cfg)
    tokens = random_tokens(cfg, B, T)
    base = model(tokens)
    # Override concept 3 everywhere (on), and concept base-top-1 at t=2 (off).
    top1 = base.known.topk_indices[:, :, 0]
    ids = jnp.stack([jnp.full((B, T), 3), jnp.where(jnp.arange(T) == 2, top1, -1)], -1)
    vals = jnp.stack([jnp.full((B, T), 0.9), jnp.zeros((B, T))], -1)
    unk_ids = jnp.full((B, T, 1), 7)
    unk_vals = jnp.full((B, T, 1), 0.5)
    out = model(tokens, intervene_known=(ids, vals), intervene_unknown=(unk_ids, unk_vals))
    _check_identity(model, out, cfg, kept=(False, False))
    assert float(jnp.abs(out.epsilon).max()) == 0.0   # epsilon dropped while intervening
    assert float(jnp.abs(out.logits - base.logits).max()) > 1e-3

    # Concept 3 now carries weight exactly 0.9 at every position; the overridden
    # top-1 concept carries 0 at t=2.
    def weight_of(acts, cid):
        return jnp.where(acts.indices == cid, acts.weights, 0.0).sum(-1)
    np.testing.assert_allclose(weight_of(out.known, 3), 0.9, atol=1e-6)
    w_top1 = jnp.where(out.known.indices == top1[..., None], out.known.weights, 0.0).sum(-1)
    np.testing.assert_allclose(w_top1[:, 2], 0.0, atol=1e-7)
    np.testing.assert_allclose(weight_of(out.unknown, 7), 0.5, atol=1e-6)


def test_drop_epsilon_per_sequence():
    cfg = tiny_config()
    model = make_model(cfg)
    out = model(random_tokens(cfg, B, T), drop_epsilon=jnp.array([True, False]))
    assert float(jnp.abs(out.epsilon[0]).max()) == 0.0
    assert float(jnp.abs(out.epsilon[1]).max()) > 0.0
    _check_identity(model, out, cfg, kept=(False, True))
    # Kept epsilon: composed equals h exactly in value.
    np.testing.assert_allclose(out.composed[1], out.hidden[1], atol=1e-5)


@pytest.mark.parametrize("rank", [0, 8])
def test_head_matches_bruteforce_reference(rank):
    """Top-k sets, weights and features against numpy over the dense [N,C] logits."""
    cfg = tiny_config(concepts=dict(unknown_rank=rank, dense_threshold=10))  # forces streaming
    model = make_model(cfg)
    out = model(random_tokens(cfg, B, T))
    h = np.asarray(out.hidden, np.float64).reshape(B * T, -1)
    for head, acts, k in [(model.rewrite.known_head, out.known, cfg.concepts.known_topk),
                          (model.rewrite.unknown_head, out.unknown, cfg.concepts.unknown_topk)]:
        if head.rank:
            q = h @ np.asarray(head.predictor_down[...])
            E = np.asarray(head.embedding_coef[...]) @ np.asarray(head.embedding_basis[...])
        else:
            q, E = h, np.asarray(head.embedding[...])
        z = np.clip(q @ np.asarray(head.keys()).T, -15, 15)[:, : head.n_concepts]
        ref_ids = np.argsort(-z, axis=1)[:, :k]
        got_ids = np.asarray(acts.indices).reshape(B * T, -1)
        for r in range(B * T):
            assert set(ref_ids[r]) == set(got_ids[r]), r
        w = 1 / (1 + np.exp(-np.take_along_axis(z, ref_ids, 1)))
        ref_feat = np.einsum("nk,nkd->nd", w, E[ref_ids])
        np.testing.assert_allclose(np.asarray(acts.features).reshape(B * T, -1), ref_feat,
                                   atol=2e-5)


@pytest.mark.parametrize("n_valid,block,k", [(50, 16, 5), (48, 16, 16), (7, 16, 3), (33, 1, 4)])
def test_streaming_topk_equals_dense_topk(n_valid, block, k):
    kq, kk = jax.random.split(jax.random.key(0))
    q = jax.random.normal(kq, (9, 6))
    keys = jax.random.normal(kk, (n_valid + 3, 6))   # padded rows must never be chosen
    vals, ids = streaming_topk(q, keys, n_valid, k, block, clip=15.0)
    dense = jnp.clip(q @ keys[:n_valid].T, -15, 15)
    ref_vals, ref_ids = jax.lax.top_k(dense, k)
    np.testing.assert_allclose(vals, ref_vals, atol=1e-6)
    np.testing.assert_array_equal(jnp.sort(ids, -1), jnp.sort(ref_ids, -1))
