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
def test_losses_with_chunked_ce_equal_dense(objective):
    """loss.ce_chunk_tokens changes how the train step's LM loss is computed, not its value
    or any gradient: compute_losses (train/losses.py, the field's only reader, what the
    train step differentiates) with every loss term on, dense against chunked, on the
    same params, batch and rng; every gradient leaf compared."""
    from flax import nnx

    from cbm_lm.data.synthetic import synthetic_batch
    from cbm_lm.default_config import base_config
    from cbm_lm.train.losses import compute_losses
    from tests.model_fixtures import make_model, tiny_config

    diffusion = objective == "diffusion"
    cfg = tiny_config(objective=objective, attention="block_causal" if diffusion else "causal",
                      n_layers=1, diffusion_block_size=8)
    graphdef, params, rest = nnx.split(make_model(cfg), nnx.Param, ...)
    batch = synthetic_batch(cfg, 2, 32, 2)

    def loss_and_grads(chunk):
        c = base_config()
        c.train.num_steps = 10
        c.loss.ce_chunk_tokens = chunk

        def loss(p):
            return compute_losses(nnx.merge(graphdef, p, rest), batch, jax.random.key(3),
                                  jnp.asarray(1), loss_cfg=c.loss, model_cfg=cfg)

        return jax.value_and_grad(loss, has_aux=True)

    dense_fn, chunked_fn = loss_and_grads(0), loss_and_grads(12)  # 32 positions: chunks of 12
    # The largest intermediate with a vocabulary axis: the field takes effect.
    vocab = cfg.vocab_size
    assert max_intermediate_with_dim(jax.make_jaxpr(dense_fn)(params), vocab) >= 2 * 32 * vocab
    assert max_intermediate_with_dim(jax.make_jaxpr(chunked_fn)(params), vocab) < 2 * 32 * vocab
    # One program computing both (XLA shares their common forward: a third less compile time).
    (((total_d, dense), grad_d), ((total_c, chunked), grad_c)) = jax.device_get(
        jax.jit(lambda p: (dense_fn(p), chunked_fn(p)))(params))
    np.testing.assert_allclose(total_c, total_d, rtol=2e-5)
    for k in ["lm_loss"] + (["masked_ce"] if diffusion else []):
        np.testing.assert_allclose(chunked[k], dense[k], rtol=2e-5, err_msg=k)
    acc = "masked_acc" if diffusion else "next_token_acc"
    np.testing.assert_allclose(chunked[acc], dense[acc])
    flat_d, flat_c = (jax.tree_util.tree_leaves_with_path(g) for g in (grad_d, grad_c))
    assert len(flat_d) == len(flat_c) > 10
    for (path, a), (_, b) in zip(flat_d, flat_c):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert np.abs(grad_d["backbone"]["embedding"][...]).max() > 0   # the LM loss flows back


def test_bf16_logits_are_accumulated_in_fp32():
    """With a bf16 compute dtype the LM head's products are summed and returned in fp32:
    against a float64 reference of the same bf16 inputs the logits err far below bf16's
    spacing (0.125 near 16), in the model's head and in the chunked training CE."""
    import jax
    import jax.numpy as jnp
    from cbm_lm.model.layers import token_dot
    from cbm_lm.objectives.chunked_ce import chunked_token_ce
    x = (4.0 * jax.random.normal(jax.random.key(0), (2, 8, 64))).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (64, 96)).astype(jnp.bfloat16)
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    assert np.abs(ref).max() > 16
    got = token_dot(x, w, out_dtype=jnp.float32)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-3)
    y = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 8)), jnp.int32)
    ce, _ = chunked_token_ce(x, w.T, y, chunk=4)
    lse = np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1)) + ref.max(-1)
    want = lse - np.take_along_axis(ref, np.asarray(y)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(ce), want, atol=1e-3)
