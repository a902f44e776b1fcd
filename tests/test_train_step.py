"""The jitted train step: gradient accumulation over micro-batches equals the
full-batch step (also with unequal padding: micro-batches weighted by their LM token
counts, count metrics summed), remat policies do not change the numbers, and bf16 compute
keeps fp32 master weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from cbm_lm.config import MeshConfig, ModelConfig
from cbm_lm.data.synthetic import synthetic_batch
from cbm_lm.default_config import DEFAULT_RULES, base_config
from cbm_lm.parallel.mesh import make_mesh
from cbm_lm.train.optimizer import make_optimizer
from cbm_lm.train.state import init_train_state
from cbm_lm.train.step import make_train_step


def _config(**model):
    c = base_config()
    c.model.d_model, c.model.n_heads, c.model.n_kv_heads, c.model.mlp_dim = 32, 2, 1, 64
    c.model.concepts.n_known, c.model.concepts.n_unknown = 32, 32
    c.model.concepts.unknown_rank, c.model.concepts.unknown_topk = 4, 4
    c.model.objective, c.model.attention = "autoregressive", "causal"
    for k, v in model.items():
        c.model[k] = v
    c.data.batch_size, c.data.seq_len = 4, 32
    # Deterministic terms only, so micro-batching cannot change what is sampled.
    c.loss.epsilon_dropout, c.loss.concept_weight, c.loss.teacher_forcing_start = 0.0, 0.0, 0.0
    return c


def _run(c, steps=2):
    model_cfg = ModelConfig.from_config(c.model)
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    tx, schedule = make_optimizer(c.optimizer, 10)
    graphdef, state, shardings = init_train_state(model_cfg, tx, 0, mesh, DEFAULT_RULES)
    step = make_train_step(graphdef, tx, schedule, c, model_cfg, shardings,
                           NamedSharding(mesh, P()))
    batch = synthetic_batch(model_cfg, c.data.batch_size, c.data.seq_len, 4)
    out = []
    with jax.set_mesh(mesh):
        for _ in range(steps):
            state, m = step(state, batch)
            out.append(jax.device_get(m))
    return state, out


@functools.cache
def _reference():
    """The plain fp32 step every test compares against, run once for the module."""
    return _run(_config())


def test_gradient_accumulation_equals_full_batch():
    full_state, full = _reference()
    c = _config()
    c.train.grad_accum_steps = 2
    acc_state, acc = _run(c)
    for a, b in zip(full, acc):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
    # Adam divides by sqrt(v): on a coordinate whose gradient is near zero, the
    # float summation order of the micro-batches moves the normalized step by a
    # visible fraction of lr (1.4e-6 seen on one of 2048 coordinates, lr 3e-3), so
    # params must agree to 0.1% of one learning-rate step, not to an absolute 1e-6.
    tol = 1e-3 * _config().optimizer.learning_rate
    for a, b in zip(jax.tree.leaves(full_state.params), jax.tree.leaves(acc_state.params)):
        np.testing.assert_allclose(a, b, atol=tol)


@pytest.mark.parametrize("remat", ["block", "full"])
def test_remat_policies_do_not_change_the_step(remat):
    _, ref = _reference()
    _, got = _run(_config(remat=remat))
    for a, b in zip(ref, got):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)


def test_bf16_compute_keeps_fp32_master_weights():
    _, ref = _reference()
    state, got = _run(_config(dtype="bfloat16"))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
    assert np.isfinite(got[-1]["loss"])
    np.testing.assert_allclose(got[0]["loss"], ref[0]["loss"], rtol=2e-2)   # bf16 rounding only


def _sgd_step(c, batch):
    """One step with plain SGD at lr 1, so params_before - params_after is the gradient."""
    import optax
    model_cfg = ModelConfig.from_config(c.model)
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    tx = optax.apply_if_finite(optax.sgd(1.0), max_consecutive_errors=1000)
    graphdef, state, shardings = init_train_state(model_cfg, tx, 0, mesh, DEFAULT_RULES)
    before = jax.device_get(state.params)
    step = make_train_step(graphdef, tx, lambda s: 1.0, c, model_cfg, shardings,
                           NamedSharding(mesh, P()))
    with jax.set_mesh(mesh):
        state, m = step(state, batch)
    grads = jax.tree.map(lambda a, b: a - b, before, jax.device_get(state.params))
    return grads, jax.device_get(m)


def _unequally_padded_batch(c):
    """Rows 0-1 (micro-batch 0 at A=2) fully packed; rows 2-3 mostly padding, row 3 two
    short documents: the micro-batches score 62 and 10 next-token pairs."""
    model_cfg = ModelConfig.from_config(c.model)
    batch = dict(synthetic_batch(model_cfg, c.data.batch_size, c.data.seq_len, 4))
    seg = np.ones((4, 32), np.int32)
    seg[2, 6:] = 0                       # one document of 6 tokens, then padding
    seg[3, :3], seg[3, 3:7], seg[3, 7:] = 1, 2, 0   # documents of 3 and 4 tokens
    pos = np.broadcast_to(np.arange(32, dtype=np.int32), (4, 32)).copy()
    pos[3, 3:7] = np.arange(4)
    pos[seg == 0] = 0
    tokens = np.where(seg > 0, np.asarray(batch["tokens"]), 0)
    concept = np.where((seg > 0)[..., None], np.asarray(batch["concept_ids"]), -1)
    chunk = np.where(seg > 0, np.asarray(batch["chunk_segment_ids"]), 0)
    chunk[3, 3:7] = 2
    return dict(batch, tokens=jnp.asarray(tokens), segment_ids=jnp.asarray(seg),
                positions=jnp.asarray(pos), concept_ids=jnp.asarray(concept, jnp.int32),
                chunk_segment_ids=jnp.asarray(chunk))


def test_gradient_accumulation_weights_micro_batches_by_their_tokens():
    """Unequal padding across micro-batches: A=2 still gives the full batch's token-mean LM
    loss and gradient (not the mean of the two micro-batch means), and the count metrics
    count the whole batch."""
    c = _config()
    c.loss.reconstruction_weight, c.loss.independence_weight = 0.0, 0.0   # L_lm alone
    batch = _unequally_padded_batch(c)
    g_full, m_full = _sgd_step(c, batch)
    c.train.grad_accum_steps = 2
    g_acc, m_acc = _sgd_step(c, batch)
    assert float(m_full["lm_tokens"]) == 62 + 10 and float(m_full["real_tokens"]) == 64 + 13
    for k in ("lm_tokens", "real_tokens"):
        assert float(m_acc[k]) == float(m_full[k]), k
    for k in ("loss", "lm_loss", "next_token_acc", "share_known"):
        np.testing.assert_allclose(m_acc[k], m_full[k], rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(m_acc["grad_norm"], m_full["grad_norm"], rtol=1e-4)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(g_full))
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_acc)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * scale)


def test_diffusion_accumulation_weights_by_real_tokens():
    """Diffusion (ELBO weighting): L_lm divides by the real tokens, so those weight the
    micro-batches and, summed, count the whole batch at A=2 as at A=1."""
    c = _config(objective="diffusion", attention="block_causal")
    batch = _unequally_padded_batch(c)
    for accum in (1, 2):
        c.train.grad_accum_steps = accum
        _, m = _sgd_step(c, batch)
        assert float(m["lm_tokens"]) == float(m["real_tokens"]) == 64 + 13, accum
        assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])
