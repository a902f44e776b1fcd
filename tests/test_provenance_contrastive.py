"""Training the learned chunk-provenance key head (objectives/key_contrastive.py).

Truths: the in-batch InfoNCE equals a numpy reference and is lower when the two views'
keys match than when they are shuffled; the token-dropout views are different subsets of
the same chunks' tokens; in the train step the contrastive term's gradient reaches the
head's W and nothing else (both view kinds: token dropout, noisy vs clean stream), W leaves
0 and the term falls over a few steps; a run that trains no head carries no W (its keys
are the fixed key, W = 0).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from cbm_lm.config import MeshConfig, ModelConfig
from cbm_lm.default_config import DEFAULT_RULES, base_config
from cbm_lm.model.provenance import contrastive_loss, normalize
from cbm_lm.objectives.key_contrastive import token_dropout_views
from cbm_lm.parallel.mesh import make_mesh
from cbm_lm.parallel.sharding import logical_to_spec
from cbm_lm.provenance.build import provenance_config
from cbm_lm.train.losses import compute_losses
from cbm_lm.train.optimizer import make_optimizer
from cbm_lm.train.state import abstract_train_state, init_train_state
from cbm_lm.train.step import make_train_step

B, T, M, D_P = 4, 32, 8, 16
TERM = "provenance_contrastive_loss"


def _numpy_infonce(a, b, valid, tau):
    """1/2 (CE(A B^T / tau, diag) + CE(B A^T / tau, diag)) over the valid chunks."""
    v = valid.reshape(-1)
    a, b = a.reshape(-1, a.shape[-1])[v], b.reshape(-1, b.shape[-1])[v]
    z = a.astype(np.float64) @ b.T.astype(np.float64) / tau

    def lse(x, axis):
        mx = x.max(axis=axis, keepdims=True)
        return (mx + np.log(np.exp(x - mx).sum(axis=axis, keepdims=True))).squeeze(axis)

    return 0.5 * np.mean(lse(z, 1) - np.diag(z) + lse(z, 0) - np.diag(z))


def test_infonce_matches_numpy_and_is_lower_for_matching_keys_than_shuffled():
    rng = np.random.default_rng(0)
    a = np.asarray(normalize(jnp.asarray(rng.normal(size=(3, 5, D_P)), jnp.float32)))
    b = np.asarray(normalize(jnp.asarray(a + 0.4 * rng.normal(size=a.shape), jnp.float32)))
    valid = np.ones((3, 5), bool)
    valid[1, 4] = valid[2, 0] = False
    shuffled = b.reshape(15, D_P)[rng.permutation(15)].reshape(b.shape)
    got = {}
    for name, other in (("matched", b), ("shuffled", shuffled)):
        got[name] = float(contrastive_loss(jnp.asarray(a), jnp.asarray(other),
                                           jnp.asarray(valid), 0.1))
        np.testing.assert_allclose(got[name], _numpy_infonce(a, other, valid, 0.1), rtol=1e-5)
    assert got["matched"] < got["shuffled"] - 1.0


def test_token_dropout_views_are_different_subsets_of_each_chunk():
    chunk_seg = np.zeros((16, 128), np.int32)
    for r in range(16):                           # chunks of 10 tokens, then padding
        chunk_seg[r, :120] = np.repeat(np.arange(1, 13), 10)
    a, b = (np.asarray(x) for x in token_dropout_views(jax.random.key(3),
                                                      jnp.asarray(chunk_seg), 0.3))
    for view in (a, b):
        kept = view > 0
        np.testing.assert_array_equal(view[kept], chunk_seg[kept])   # a token keeps its chunk
        assert not kept[chunk_seg == 0].any()                         # padding stays out
        assert abs(1 - kept.sum() / (chunk_seg > 0).sum() - 0.3) < 0.03
    both = (a > 0) & (b > 0)
    assert ((a > 0) != (b > 0)).sum() > 0.3 * (chunk_seg > 0).sum()  # independent masks
    assert both.sum() > 0.4 * (chunk_seg > 0).sum()


def _config(objective="autoregressive", weight=1.0):
    c = base_config()
    m = c.model
    m.vocab_size, m.d_model, m.n_heads, m.n_kv_heads, m.mlp_dim = 128, 32, 4, 2, 64
    m.max_seq_len = T
    if objective == "autoregressive":
        m.objective, m.attention = "autoregressive", "causal"
    else:   # two-stream diffusion: the views are the noisy and the clean stream
        m.objective, m.attention, m.diffusion_block_size = "diffusion", "block_causal", 8
        c.loss.diffusion_clean_context = True
    cc = m.concepts
    cc.n_known, cc.known_topk, cc.n_unknown, cc.unknown_rank, cc.unknown_topk = 64, 4, 32, 4, 4
    cc.block_size, cc.dense_threshold = 16, 32
    c.data.batch_size, c.data.seq_len = B, T
    c.optimizer.warmup_steps = 0
    p = c.provenance
    p.head, p.contrastive_weight, p.token_dropout = "learned", weight, 0.3
    p.d_p, p.max_chunks_per_row, p.max_sources = D_P, M, 4
    return c


def _batch(seed=0):
    """Rows of 5-6 chunks of 4-7 random tokens in two documents."""
    rng = np.random.default_rng(seed)
    seg, chunk_seg, pos = (np.zeros((B, T), np.int32) for _ in range(3))
    for r in range(B):
        t, j = 0, 0
        while True:
            n = int(rng.integers(4, 8))
            if t + n > T - 2:
                break
            j += 1
            chunk_seg[r, t:t + n] = j
            seg[r, t:t + n] = 1 if j <= 3 else 2
            t += n
        for d in (1, 2):
            pos[r, seg[r] == d] = np.arange((seg[r] == d).sum())
    return {"tokens": rng.integers(0, 120, (B, T)).astype(np.int32), "segment_ids": seg,
            "positions": pos, "concept_ids": np.full((B, T, 4), -1, np.int32),
            "chunk_segment_ids": chunk_seg}


def _init(c):
    model_cfg = ModelConfig.from_config(c.model)
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    tx, schedule = make_optimizer(c.optimizer, 50)
    graphdef, state, shardings = init_train_state(model_cfg, tx, 0, mesh, DEFAULT_RULES, 4,
                                                  provenance_config(c))
    return model_cfg, mesh, tx, schedule, graphdef, state, shardings


def _mix(params):
    return np.asarray(params["provenance_head"]["mix"])


@pytest.mark.parametrize("objective", ["autoregressive", "diffusion"])
def test_contrastive_gradient_reaches_the_key_head_alone(objective):
    c = _config(objective)
    model_cfg, mesh, _, _, graphdef, state, _ = _init(c)
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}

    def term(params):
        model = nnx.merge(graphdef, params)
        _, metrics = compute_losses(model, batch, jax.random.key(0), jnp.zeros((), jnp.int32),
                                    loss_cfg=c.loss, model_cfg=model_cfg)
        return metrics[TERM]

    with jax.set_mesh(mesh):
        grads = jax.device_get(jax.jit(jax.grad(term))(state.params))
    assert np.abs(grads.pop("provenance_head")["mix"]).max() > 0
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert not np.asarray(g).any(), jax.tree_util.keystr(path)


def test_train_step_moves_the_mix_and_lowers_the_contrastive_term():
    c = _config()
    # Hard views at a soft temperature: the fixed key alone leaves a loss W can lower
    # (at tau 0.05 and light dropout random chunks are told apart at once, loss ~0).
    c.provenance.token_dropout, c.provenance.contrastive_temperature = 0.6, 0.5
    c.optimizer.learning_rate = 1e-2
    model_cfg, mesh, tx, schedule, graphdef, state, shardings = _init(c)
    assert not _mix(jax.device_get(state.params)).any()            # starts at the fixed key
    bs = NamedSharding(mesh, logical_to_spec(("batch",), DEFAULT_RULES))
    step = make_train_step(graphdef, tx, schedule, c, model_cfg, shardings, bs)
    batch = jax.device_put({k: jnp.asarray(v) for k, v in _batch().items()}, bs)
    with jax.set_mesh(mesh):
        for _ in range(10):
            state, metrics = step(state, batch)
        assert float(metrics["provenance_contrastive_weight"]) == 1.0
        host = jax.device_get(state)
        mix = _mix(host.params)
        assert np.abs(mix).max() > 1e-3

        def term_with(w):   # the same step (same dropout draws, same backbone), W = w
            params = dict(host.params, provenance_head={"mix": w})
            return float(step(jax.device_put(host.replace(params=params), shardings),
                              batch)[1][TERM])

        # The step's own draws vary per step, so the trained W is compared with W = 0 at
        # one step: what it learned lowers the term.
        learned, fixed = term_with(mix), term_with(np.zeros_like(mix))
    assert learned < 0.97 * fixed, (learned, fixed)


def test_without_a_contrastive_weight_the_model_carries_no_mix():
    """head='learned' at weight 0: nothing trains W, so no W is kept (the key is the fixed
    key, W = 0) and the loss has no contrastive term to log."""
    c = _config(weight=0.0)
    tx, _ = make_optimizer(c.optimizer, 50)
    _, abs_state, _ = abstract_train_state(ModelConfig.from_config(c.model), tx, 4,
                                           provenance_config(c))
    assert "provenance_head" not in abs_state.params
    assert "provenance_head" in abstract_train_state(
        ModelConfig.from_config(c.model), tx, 4, provenance_config(_config()))[1].params
