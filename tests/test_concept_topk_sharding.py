"""The concept top-k on a mesh: per-shard top-k merged over the concept shards equals the
single-device streaming top-k, and the compiled program never all-gathers the tokens.

The second check is the regression test for what the TPU compile of Steerling-8B showed:
XLA's partitioner does not split TopK along the batch, so each block's logits [N, block]
were all-gathered over the batch shards (8 GiB per chip on v5e:16x16)."""

import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from cbm_lm.default_config import DEFAULT_RULES
from cbm_lm.model.concept_topk import sharded_streaming_topk, streaming_topk

N, Q = 256, 64


def _mesh():
    return jax.make_mesh((1, 4, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def _inputs(c_pad, n_valid):
    q = np.array(jax.random.normal(jax.random.key(0), (N, Q)))
    keys = 0.1 * np.array(jax.random.normal(jax.random.key(1), (c_pad, Q)))   # |z| < 15: no ties
    # Padding rows past n_valid would win every row if they were ranked: they must not be.
    keys[n_valid:] = 10.0 * np.sign(q.sum(axis=0))[None, :]
    return q, keys


def _sharded(q, keys, n_valid, k, block, rules=DEFAULT_RULES):
    mesh = _mesh()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        qs = jax.device_put(q, NamedSharding(mesh, P(("data", "fsdp"), None)))
        ks = jax.device_put(keys, NamedSharding(mesh, P("tensor", "fsdp")))
        f = jax.jit(lambda a, b: sharded_streaming_topk(a, b, n_valid, k, block, 15.0,
                                                        concept_axis="known_concepts"))
        text = f.lower(qs, ks).compile().as_text()
        vals, ids = f(qs, ks)
    return np.asarray(vals), np.asarray(ids), text


@pytest.mark.parametrize("c_pad,n_valid,k,block", [(96, 96, 4, 32), (96, 70, 8, 16),
                                                   (128, 41, 5, 64)])
def test_sharded_topk_equals_single_device(c_pad, n_valid, k, block):
    q, keys = _inputs(c_pad, n_valid)
    vals, ids, _ = _sharded(q, keys, n_valid, k, block)
    # numpy reference: the k largest of cap(q K[:n_valid]^T), sorted
    z = np.clip(q @ keys[:n_valid].T, -15.0, 15.0)
    want_ids = np.argsort(-z, axis=1)[:, :k]
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(vals, np.take_along_axis(z, want_ids, axis=1), rtol=1e-5, atol=1e-5)
    ref_vals, ref_ids = streaming_topk(q, keys, n_valid, k, block, 15.0)
    np.testing.assert_array_equal(ids, np.asarray(ref_ids))
    assert ids.max() < n_valid


def test_compiled_topk_gathers_no_token_rows():
    q, keys = _inputs(96, 96)
    _, _, text = _sharded(q, keys, 96, 4, 32)
    gathered = [m.group(1) for m in re.finditer(r"= \w+\[([0-9,]+)\]\S* all-gather\(", text)]
    assert gathered, "expected the key block and shard-winner gathers"
    assert all(int(shape.split(",")[0]) < N for shape in gathered), gathered


@pytest.mark.parametrize("concept_axes", ["fsdp", ("fsdp", "tensor")])
def test_concept_axes_shared_with_the_batch_still_rank_each_token(concept_axes):
    """Rules that shard the concepts over a batch axis too (fsdp): the merge must not mix
    the winners of other tokens (it did: every row wrong); numpy reference as above."""
    rules = [(name, concept_axes if name == "known_concepts" else axes)
             for name, axes in DEFAULT_RULES]
    q, keys = _inputs(128, 128)
    vals, ids, _ = _sharded(q, keys, 128, 4, 32, rules=rules)
    z = np.clip(q @ keys.T, -15.0, 15.0)
    np.testing.assert_array_equal(ids, np.argsort(-z, axis=1)[:, :4])
