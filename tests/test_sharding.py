"""On 8 simulated devices, the sharded forward equals the single-device one,
for meshes (data=2 x tensor=4) and (fsdp=8); parameters really are sharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from cbm_lm.config import MeshConfig
from cbm_lm.default_config import DEFAULT_RULES
from cbm_lm.parallel.mesh import make_mesh
from cbm_lm.parallel.sharding import logical_to_spec, state_shardings
from model_fixtures import make_model, random_tokens, tiny_config

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def _config():
    # Dimensions divisible by 8 where sharded; dense_threshold low so the
    # streaming top-k runs over the tensor-sharded concept axis.
    return tiny_config(vocab_size=128, d_model=32, n_heads=8, n_kv_heads=4, mlp_dim=64,
                       concepts=dict(n_known=64, known_topk=5, n_unknown=96, unknown_rank=8,
                                     unknown_topk=6, block_size=16, dense_threshold=32))


def _forward(model, tokens):
    out = model(tokens)
    return out.logits, out.known.topk_indices, out.unknown.topk_indices, out.epsilon


def test_logical_to_spec_never_reuses_a_mesh_axis():
    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"))
    assert logical_to_spec(("batch", "embed"), rules) == P(("data", "fsdp"), None)
    assert logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
    assert logical_to_spec(("mlp", None, "missing"), rules) == P("tensor", None, None)


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=2, fsdp=1, tensor=4),
                                      MeshConfig(data=1, fsdp=8, tensor=1)],
                         ids=["data2_tensor4", "fsdp8"])
def test_sharded_forward_equals_single_device(mesh_cfg):
    cfg = _config()
    model = make_model(cfg, seed=3)
    tokens = random_tokens(cfg, 8, 16)
    ref = jax.jit(lambda s, t: _forward(nnx.merge(nnx.graphdef(model), s), t))(
        nnx.state(model), tokens)

    mesh = make_mesh(mesh_cfg)
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, DEFAULT_RULES)
    sharded_state = jax.device_put(state, shardings)
    batch_sharding = NamedSharding(mesh, logical_to_spec(("batch", None), DEFAULT_RULES))
    sharded_tokens = jax.device_put(tokens, batch_sharding)

    # The parameters are really distributed.
    emb = sharded_state["backbone"]["embedding"][...]
    shard_shape = (128 // mesh_cfg.tensor, 32 // mesh_cfg.fsdp)   # [vocab/tensor, embed/fsdp]
    assert emb.addressable_shards[0].data.shape == shard_shape
    assert len(emb.addressable_shards) == 8

    with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
        fwd = jax.jit(lambda s, t: _forward(nnx.merge(graphdef, s), t),
                      in_shardings=(shardings, batch_sharding))
        got = fwd(sharded_state, sharded_tokens)
    np.testing.assert_allclose(got[0], ref[0], atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(jnp.sort(got[1], -1), jnp.sort(ref[1], -1))
    np.testing.assert_array_equal(jnp.sort(got[2], -1), jnp.sort(ref[2], -1))
    np.testing.assert_allclose(got[3], ref[3], atol=2e-5, rtol=1e-5)


def test_model_built_inside_mesh_is_sharded_at_creation():
    cfg = _config()
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
        model = make_model(cfg, seed=3)
    up = model.rewrite.unknown_head.predictor_up[...]          # [96, 8]: concepts over tensor
    assert up.addressable_shards[0].data.shape == (24, 8)
    gate = model.backbone.blocks.mlp.gate[...]     # [L=2, 32, 64]: layers unsharded, mlp over tensor
    assert gate.addressable_shards[0].data.shape == (2, 32, 16)
