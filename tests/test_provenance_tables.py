"""The key head's fixed tables drawn once (``placed_tables``): the same tables and keys as
drawing them inside the keyed pass, laid out on a mesh by their logical axes."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cbm_lm.config import MeshConfig, ProvenanceConfig
from cbm_lm.default_config import DEFAULT_RULES
from cbm_lm.model.provenance import ChunkProvenanceHead, placed_tables
from cbm_lm.parallel.mesh import make_mesh
from cbm_lm.parallel.sharding import logical_to_spec
from model_fixtures import tiny_config

PROV = ProvenanceConfig(d_p=16, max_chunks_per_row=4, pq_m=4, seed=7)


def _gaussian(seed, part, rows, d_p):
    """The module docstring's R: N(0, 1/d_p) rows from fold_in(key(seed), part)."""
    key = jax.random.fold_in(jax.random.key(seed), part)
    return np.asarray(jax.random.normal(key, (rows, d_p))) / np.sqrt(d_p)


def test_placed_tables_are_the_documented_draws_sharded_by_logical_axes():
    cfg = tiny_config(vocab_size=64, concepts=dict(n_known=32, n_unknown=48))
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
        tables = placed_tables(PROV, cfg, mesh)
    c = cfg.concepts
    rows = {"known": (0, c.n_known_padded, ("known_concepts", "keys")),
            "unknown": (1, c.n_unknown_padded, ("unknown_concepts", "keys")),
            "hidden": (2, cfg.d_model, ("embed", "keys")),
            "vocab": (3, cfg.vocab_size, ("vocab", "keys"))}
    for name, (part, n, axes) in rows.items():
        table = getattr(tables, name)
        np.testing.assert_allclose(np.asarray(table), _gaussian(PROV.seed, part, n, PROV.d_p),
                                   rtol=1e-6, atol=1e-7)
        assert table.sharding.spec == logical_to_spec(axes, DEFAULT_RULES), name
    assert any(getattr(tables, n).sharding.spec != (None, None) for n in rows)  # really sharded


def test_keys_with_placed_tables_equal_keys_drawn_in_the_pass():
    cfg = tiny_config(vocab_size=64, concepts=dict(n_known=32, n_unknown=48))
    head = ChunkProvenanceHead(PROV, cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    b, t, k = 2, 16, 3
    sparse = lambda c: SimpleNamespace(                                   # noqa: E731
        indices=jnp.asarray(rng.integers(0, c, (b, t, k)), jnp.int32),
        weights=jnp.asarray(rng.random((b, t, k)), jnp.float32))
    out = SimpleNamespace(logits=None, hidden=jnp.asarray(rng.normal(size=(b, t, cfg.d_model)),
                                                          jnp.float32),
                          known=sparse(32), unknown=sparse(48))
    toks = jnp.asarray(rng.integers(1, 64, (b, t)), jnp.int32)
    seg = jnp.asarray(np.repeat([[1] * 10 + [2] * 6], b, 0), jnp.int32)
    chunk = jnp.asarray(np.repeat([[1] * 4 + [2] * 6 + [3] * 6], b, 0), jnp.int32)

    @jax.jit
    def keys(tables):
        return head(out, toks, seg, chunk, tables=tables).keys

    drawn = np.asarray(keys(None))
    placed = np.asarray(keys(placed_tables(PROV, cfg)))
    assert np.abs(drawn).sum() > 0
    np.testing.assert_allclose(placed, drawn, atol=1e-6)   # fusion may reorder float ops
