"""model/attention_kernels.py: two-stream attention without the masked quarters
equals dense masked softmax attention under attention_mask(..., stream), the
dense reference, on packed rows (several documents, padding, T not a multiple
of the block); one-stream attention equals a numpy softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbm_lm.model.attention import attention_mask
from cbm_lm.model.attention_kernels import dense_attention, two_stream_attention


def _packed(b, t, seed):
    """positions restart per document; segment 0 = padding at the row's end."""
    rng = np.random.default_rng(seed)
    seg, pos = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    for row in range(b):
        i, s = 0, 1
        while i < t - 3:
            n = int(rng.integers(3, t // 2))
            n = min(n, t - 3 - i)
            seg[row, i:i + n], pos[row, i:i + n] = s, np.arange(n)
            i, s = i + n, s + 1
        pos[row, i:] = np.arange(t - i)        # padding keeps counting, segment 0
    return jnp.asarray(pos), jnp.asarray(seg)


def _numpy_attention(q, k, v, mask):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    h, g = q.shape[2], k.shape[2]
    k, v = np.repeat(k, h // g, axis=2), np.repeat(v, h // g, axis=2)
    s = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(np.asarray(mask), s, -1e30)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshk->bthk", p, v)


@pytest.mark.parametrize("t,block", [(23, 4), (32, 8)])
def test_two_stream_equals_dense_reference(t, block):
    b, h, g, hd = 2, 4, 2, 8
    ks = jax.random.split(jax.random.PRNGKey(t), 3)
    q = jax.random.normal(ks[0], (b, 2 * t, h, hd))
    k = jax.random.normal(ks[1], (b, 2 * t, g, hd))
    v = jax.random.normal(ks[2], (b, 2 * t, g, hd))
    pos, seg = _packed(b, t, t)
    pos2, seg2 = jnp.concatenate([pos, pos], 1), jnp.concatenate([seg, seg], 1)
    stream = jnp.concatenate([jnp.zeros_like(seg), jnp.ones_like(seg)], 1)
    mask = attention_mask(pos2, seg2, "block_causal", block, stream)
    ref = _numpy_attention(q, k, v, mask)
    got = two_stream_attention(q, k, v, pos2, seg2, block)
    np.testing.assert_allclose(got, ref, atol=2e-5)


def test_two_stream_gradients_equal_dense():
    b, t, h, g, hd, block = 1, 16, 2, 1, 8, 4
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(ks[0], (b, 2 * t, h, hd))
    k = jax.random.normal(ks[1], (b, 2 * t, g, hd))
    v = jax.random.normal(ks[2], (b, 2 * t, g, hd))
    pos, seg = _packed(b, t, 1)
    pos2, seg2 = jnp.concatenate([pos, pos], 1), jnp.concatenate([seg, seg], 1)
    stream = jnp.concatenate([jnp.zeros_like(seg), jnp.ones_like(seg)], 1)
    mask = attention_mask(pos2, seg2, "block_causal", block, stream)
    w = jax.random.normal(jax.random.PRNGKey(3), (b, 2 * t, h, hd))
    f_two = lambda q, k, v: jnp.sum(w * two_stream_attention(q, k, v, pos2, seg2, block))
    f_dense = lambda q, k, v: jnp.sum(w * dense_attention(q, k, v, mask))
    for a, c in zip(jax.grad(f_two, (0, 1, 2))(q, k, v), jax.grad(f_dense, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, c, atol=2e-5)


def test_dense_attention_equals_numpy_softmax():
    b, t, h, g, hd = 2, 12, 4, 2, 8
    ks = jax.random.split(jax.random.PRNGKey(1), 3)
    q, k, v = (jax.random.normal(kk, (b, t, n, hd)) for kk, n in zip(ks, (h, g, g)))
    pos, seg = _packed(b, t, 2)
    mask = attention_mask(pos, seg, "causal", 1)
    np.testing.assert_allclose(dense_attention(q, k, v, mask), _numpy_attention(q, k, v, mask),
                               atol=2e-5)
