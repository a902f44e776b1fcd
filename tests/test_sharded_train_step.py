"""The full jitted train step on 8 simulated devices (data x fsdp x tensor = 2 x 2 x 2)
equals the single-device step: the same loss, metrics and updated parameters, with
every loss term on (two-stream diffusion, concept loss with sampled negatives,
epsilon dropout, teacher forcing)."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from cbm_lm.config import MeshConfig, ModelConfig
from cbm_lm.data.synthetic import synthetic_batch
from cbm_lm.default_config import DEFAULT_RULES, base_config
from cbm_lm.parallel.mesh import make_mesh
from cbm_lm.parallel.sharding import logical_to_spec
from cbm_lm.train.optimizer import make_optimizer
from cbm_lm.train.state import init_train_state
from cbm_lm.train.step import make_train_step

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def _config():
    c = base_config()
    m = c.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.mlp_dim = 128, 32, 2, 4, 2, 64
    m.max_seq_len, m.diffusion_block_size = 32, 8
    cc = m.concepts
    cc.n_known, cc.known_topk, cc.n_unknown, cc.unknown_rank, cc.unknown_topk = 64, 4, 96, 8, 4
    cc.block_size, cc.dense_threshold = 16, 32      # the streaming top-k over sharded concepts
    c.data.batch_size, c.data.seq_len = 8, 32
    c.loss.concept_negatives, c.loss.teacher_forcing_steps = 8, 4
    return c


def _run(c, mesh_cfg, devices, steps=2):
    model_cfg = ModelConfig.from_config(c.model)
    mesh = make_mesh(mesh_cfg, devices)
    tx, schedule = make_optimizer(c.optimizer, 10)
    graphdef, state, shardings = init_train_state(model_cfg, tx, 0, mesh, DEFAULT_RULES)
    batch_sharding = NamedSharding(mesh, logical_to_spec(("batch",), DEFAULT_RULES))
    step = make_train_step(graphdef, tx, schedule, c, model_cfg, shardings, batch_sharding)
    batch = jax.device_put(synthetic_batch(model_cfg, 8, 32, 4), batch_sharding)
    metrics = []
    with jax.set_mesh(mesh):
        for _ in range(steps):
            state, m = step(state, batch)
            metrics.append(jax.device_get(m))
    return jax.device_get(state.params), metrics, state


@pytest.mark.slow
def test_sharded_train_step_equals_single_device():
    c = _config()
    ref_params, ref, _ = _run(c, MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    params, got, state = _run(c, MeshConfig(data=2, fsdp=2, tensor=2), jax.devices())
    # Really sharded: the embedding table [vocab, embed] is split over tensor and fsdp.
    emb = state.params["backbone"]["embedding"]
    assert emb.addressable_shards[0].data.shape == (64, 16)
    for r, g in zip(ref, got):
        for name in ("loss", "lm_loss", "concept_loss", "reconstruction_loss",
                     "independence_loss", "grad_norm"):
            np.testing.assert_allclose(g[name], r[name], rtol=2e-5, atol=1e-6, err_msg=name)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_params),
                            jax.tree.leaves(params)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
    # The step moved the parameters (the comparison is not of two untouched inits).
    assert float(ref[-1]["concept_loss"]) > 0 and float(ref[-1]["teacher_alpha"]) > 0
