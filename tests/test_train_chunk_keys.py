"""Training-time provenance: the train step's chunk keys, chunk ids and concept x source mass.

Truths: the keys equal those the inference-side keying (cbm_lm/provenance/rekey.py, a
plain forward pass) computes for the same rows with the params the step read; the ids
are the batch's own 64-bit chunk ids; the mass equals a numpy loop over the model's
active sets; and 8 sharded devices give what one device gives.
"""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from cbm_lm.config import MeshConfig, ModelConfig
from cbm_lm.default_config import DEFAULT_RULES, base_config
from cbm_lm.parallel.mesh import make_mesh
from cbm_lm.parallel.sharding import logical_to_spec
from cbm_lm.provenance.build import provenance_config
from cbm_lm.provenance.rekey import make_key_fn
from cbm_lm.train.chunk_keys import ChunkKeyLogger, join_ids, split_ids
from cbm_lm.train.optimizer import make_optimizer
from cbm_lm.train.state import init_train_state
from cbm_lm.train.step import make_train_step

B, T, M, S = 8, 32, 8, 4


def _config():
    c = base_config()
    m = c.model
    m.vocab_size, m.d_model, m.n_heads, m.n_kv_heads, m.mlp_dim = 128, 32, 4, 2, 64
    m.max_seq_len = T
    m.objective, m.attention = "autoregressive", "causal"
    cc = m.concepts
    cc.n_known, cc.known_topk, cc.n_unknown, cc.unknown_rank, cc.unknown_topk = 64, 4, 32, 4, 4
    cc.block_size, cc.dense_threshold = 16, 32
    c.data.batch_size, c.data.seq_len = B, T
    c.loss.epsilon_dropout, c.loss.teacher_forcing_start = 0.0, 0.0
    p = c.provenance
    p.log_keys, p.d_p, p.max_chunks_per_row, p.max_sources = True, 16, M, S
    p.pool_weights = "uniform"   # the inference pass's logits differ from training's; h does not
    return c


def _batch(seed=0):
    """Two documents per row, 2-3 chunks each; rows alternate sources 0 and 2
    (source 1 never appears, 3 is padding-free); chunk ids above 2^32."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 120, (B, T)).astype(np.int32)
    seg = np.zeros((B, T), np.int32)
    chunk_seg = np.zeros((B, T), np.int32)
    ids = np.full((B, T), -1, np.int64)
    src = np.full((B, T), -1, np.int32)
    pos = np.zeros((B, T), np.int32)
    next_id = (5 << 40) + 7
    for b in range(B):
        bounds = [0, 7, 12, 20, 26, 30] if b % 2 else [0, 5, 14, 22, 27, 28]
        docs = [(0, 3), (3, 5)]                 # chunks 0-2 in doc 1, 3-4 in doc 2
        for d, (c0, c1) in enumerate(docs):
            lo, hi = bounds[c0], bounds[c1]
            seg[b, lo:hi] = d + 1
            pos[b, lo:hi] = np.arange(hi - lo)
        for j in range(5):
            chunk_seg[b, bounds[j]:bounds[j + 1]] = j + 1
            ids[b, bounds[j]:bounds[j + 1]] = next_id
            next_id += 1 + (j << 33)
        src[b, :bounds[5]] = 0 if b % 2 == 0 else 2
    return {"tokens": tokens, "segment_ids": seg, "positions": pos,
            "concept_ids": np.full((B, T, 4), -1, np.int32), "chunk_segment_ids": chunk_seg,
            "source_ids": src, "chunk_ids": ids}


def _device_batch(batch):
    out = {k: v for k, v in batch.items() if k != "chunk_ids"}
    out.update(split_ids(batch["chunk_ids"]))
    return out


def _steps(c, mesh_cfg, devices, batches):
    model_cfg = ModelConfig.from_config(c.model)
    mesh = make_mesh(mesh_cfg, devices)
    tx, schedule = make_optimizer(c.optimizer, 10)
    graphdef, state, shardings = init_train_state(model_cfg, tx, 0, mesh, DEFAULT_RULES, S)
    bs = NamedSharding(mesh, logical_to_spec(("batch",), DEFAULT_RULES))
    step = make_train_step(graphdef, tx, schedule, c, model_cfg, shardings, bs)
    params0 = jax.device_get(state.params)
    keys, masses = [], []
    with jax.set_mesh(mesh):
        for batch in batches:
            state, _, k = step(state, jax.device_put(_device_batch(batch), bs))
            keys.append(jax.device_get(k))
            masses.append(np.asarray(jax.device_get(state.source_mass)))
    return graphdef, params0, keys, masses


def test_ids_split_and_join_round_trip():
    ids = np.array([[-1, 0, 1, 2**31, 2**32 + 5], [(5 << 40) + 7, 2**63 - 1, -1, 3, 2**40]],
                   np.int64)
    halves = split_ids(ids)
    assert halves["chunk_id_hi"].dtype == np.int32 and halves["chunk_id_lo"].dtype == np.int32
    np.testing.assert_array_equal(join_ids(halves["chunk_id_hi"], halves["chunk_id_lo"]), ids)


def test_logger_counts_and_warns_of_chunks_past_the_slots(tmp_path):
    """Rows of 3, 6 and 2 chunks with M = 4 slots: the 2 chunks of the second row past slot 4
    have no key; the logger writes the 3 + 4 + 2 valid slots, counts 2 unkeyed and warns
    once, at the flush that first sees them."""
    import jax.numpy as jnp

    chunks = np.array([3, 6, 2], np.int32)
    valid = np.arange(4)[None, :] < np.minimum(chunks, 4)[:, None]
    ids = np.arange(12, dtype=np.int64).reshape(3, 4) + (1 << 35)
    halves = split_ids(ids)
    step_keys = {"keys": jnp.ones((3, 4, 2)), "valid": jnp.asarray(valid),
                 "id_hi": jnp.asarray(halves["chunk_id_hi"]),
                 "id_lo": jnp.asarray(halves["chunk_id_lo"]), "chunks": jnp.asarray(chunks)}
    said = []
    logger = ChunkKeyLogger(tmp_path, log=said.append)
    logger.record(1, step_keys)
    logger.flush()
    assert logger.rows() == valid.sum() == 9
    assert logger.unkeyed == 2 and logger.max_row_chunks == 6
    assert len(said) == 1 and "2 chunks" in said[0] and "max_chunks_per_row=4" in said[0]
    logger.flush()                       # nothing new: no second warning
    assert len(said) == 1


def _numpy_mass(indices, weights, source_ids, n_rows):
    m = np.zeros((n_rows, S))
    for b, t, k in np.ndindex(indices.shape):
        if source_ids[b, t] >= 0:
            m[indices[b, t, k], source_ids[b, t]] += weights[b, t, k]
    return m


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_step_keys_ids_and_mass_match_a_forward_pass_and_shard():
    """One test, so the single-device step compiles once for both truths."""
    c = _config()
    batches = [_batch(0), _batch(1)]
    graphdef, params0, ref_keys, ref_mass = _steps(c, MeshConfig(data=1), jax.devices()[:1],
                                                   batches)
    # 1. the first step's keys, ids and mass against a plain forward pass of its params
    keys, batch = ref_keys[0], batches[0]
    model = nnx.merge(graphdef, params0)
    ref = make_key_fn(model, provenance_config(c))(batch)
    valid = keys["valid"]
    assert valid.sum() == 5 * B and (valid == ref["valid"]).all()
    np.testing.assert_allclose(keys["keys"][valid], ref["keys"][valid], atol=2e-5)
    # slot j of row b holds the id of the tokens of chunk segment j+1
    ids = join_ids(keys["id_hi"], keys["id_lo"])
    for b, j in zip(*np.nonzero(valid)):
        assert ids[b, j] == batch["chunk_ids"][b][batch["chunk_segment_ids"][b] == j + 1][0]
    assert len(np.unique(ids[valid])) == 5 * B and ids[valid].min() > 2**32
    np.testing.assert_array_equal(keys["chunks"], np.full(B, 5))   # every row: 5 chunks
    out = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    want = _numpy_mass(np.asarray(out.known.indices), np.asarray(out.known.weights),
                       batch["source_ids"], ref_mass[0].shape[0])
    np.testing.assert_allclose(ref_mass[0], want, rtol=1e-5, atol=1e-5)
    assert want[:, 0].sum() > 0 and want[:, 2].sum() > 0
    # the state accumulates: after step 2 it holds both batches' mass; 1 and 3 never appear
    assert ref_mass[1][:, 0].sum() > want[:, 0].sum() * 1.5
    assert (ref_mass[1][:, 1] == 0).all() and (ref_mass[1][:, 3] == 0).all()

    # 2. data x fsdp x tensor = 2 x 2 x 2 gives the same keys, ids and summed mass
    _, _, keys8, mass8 = _steps(c, MeshConfig(data=2, fsdp=2, tensor=2), jax.devices(), batches)
    for r, g in zip(ref_mass, mass8):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    for r, g in zip(ref_keys, keys8):
        np.testing.assert_array_equal(g["valid"], r["valid"])
        np.testing.assert_array_equal(join_ids(g["id_hi"], g["id_lo"]),
                                      join_ids(r["id_hi"], r["id_lo"]))
        np.testing.assert_allclose(g["keys"], r["keys"], atol=2e-5)
