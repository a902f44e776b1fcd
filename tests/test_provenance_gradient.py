"""The projected-gradient reference (cbm_lm/provenance/gradient.py): the CountSketch keeps
inner products (against numpy), the projection is deterministic for a seed, and a chunk's
own gradient retrieves it at rank 1 among other chunks' gradients."""

import numpy as np
import pytest
from flax import nnx

from cbm_lm.config import ModelConfig, ProvenanceConfig
from cbm_lm.default_config import base_config
from cbm_lm.model import ConceptBottleneckLM
from cbm_lm.provenance.gradient import gradient_features, make_gradient_fn, sketch, sketch_tables
from cbm_lm.provenance.index import KeyIndex


def _model(objective="autoregressive"):
    c = base_config().model
    c.update(vocab_size=128, d_model=32, n_heads=2, n_kv_heads=1, mlp_dim=64, max_seq_len=32,
             objective=objective, attention="causal" if objective == "autoregressive"
             else "block_causal", diffusion_block_size=8, mask_token_id=127)
    c.concepts.update(n_known=16, known_topk=4, n_unknown=32, unknown_rank=4, unknown_topk=4,
                      block_size=16)
    return ConceptBottleneckLM(ModelConfig.from_config(c), rngs=nnx.Rngs(0))


def test_countsketch_keeps_inner_products():
    rng = np.random.default_rng(0)
    shapes = {"a": (100, 80), "b": (3000,), "c": (20, 10, 10)}      # P = 13000
    g = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    h = {k: (0.6 * g[k] + 0.8 * rng.standard_normal(s)).astype(np.float32)
         for k, s in shapes.items()}
    flat = lambda t: np.concatenate([t[k].ravel() for k in sorted(t)])  # noqa: E731
    tables = sketch_tables(g, 2048, seed=3)
    sg, sh = np.asarray(sketch(g, tables, 2048)), np.asarray(sketch(h, tables, 2048))
    cos_true = flat(g) @ flat(h) / np.linalg.norm(flat(g)) / np.linalg.norm(flat(h))
    cos_sk = sg @ sh / np.linalg.norm(sg) / np.linalg.norm(sh)
    assert abs(cos_true - 0.6) < 0.03 and abs(cos_sk - cos_true) < 0.05
    np.testing.assert_allclose(np.linalg.norm(sg), np.linalg.norm(flat(g)), rtol=0.1)


def test_projection_is_deterministic_and_a_chunk_retrieves_itself():
    model = _model()
    rng = np.random.default_rng(1)
    chunks = [rng.integers(0, 120, rng.integers(8, 24)).astype(np.int32) for _ in range(24)]
    phi = gradient_features(make_gradient_fn(model, 256, seed=0), chunks, 24, 0, 256, 8)
    again = gradient_features(make_gradient_fn(model, 256, seed=0), chunks, 24, 0, 256, 8)
    other = gradient_features(make_gradient_fn(model, 256, seed=1), chunks[:8], 24, 0, 256, 8)
    np.testing.assert_array_equal(phi, again)
    assert np.abs(other - phi[:8]).max() > 0.1            # another seed, another projection
    np.testing.assert_allclose(np.linalg.norm(phi, axis=1), 1.0, rtol=1e-5)
    idx = KeyIndex.build(np.arange(100, 124), phi, ProvenanceConfig(), center=False)
    _, ids = idx.search(phi, 3)
    np.testing.assert_array_equal(ids[:, 0], np.arange(100, 124))
    # different chunks' gradients are not all alike (the rank-1 hits are not ties)
    sims = phi @ phi.T
    assert np.max(sims[~np.eye(24, dtype=bool)]) < 0.99


@pytest.mark.slow
def test_diffusion_chunk_gradient_is_finite_and_retrieves_itself():
    model = _model("diffusion")
    rng = np.random.default_rng(2)
    chunks = [rng.integers(0, 120, 16).astype(np.int32) for _ in range(8)]
    phi = gradient_features(make_gradient_fn(model, 128, seed=0), chunks, 16, 0, 128, 8)
    assert np.isfinite(phi).all()
    _, ids = KeyIndex.build(np.arange(8), phi, ProvenanceConfig(), center=False).search(phi, 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(8))
