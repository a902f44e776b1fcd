"""The blocks as one scan over stacked parameters (model/backbone.py).

Checked against a per-layer Python loop over the same weights (the pre-scan
semantics, steering injection included), and the program size against depth.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cbm_lm.model.backbone import Backbone
from cbm_lm.train.optimizer import decay_mask
from cbm_lm.train.restore_check import tree_differences
from model_fixtures import make_model, random_tokens, tiny_config


def _per_layer_reference(backbone, tokens, injection, inject_layer, alpha):
    """h of the old per-layer loop: block i's weights are row i of every stacked param;
    inject after every block i with i+1 >= inject_layer."""
    graphdef, stacked = nnx.split(backbone.blocks)
    x = backbone.embed(tokens)
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    seg = jnp.ones((b, t), jnp.int32)
    for i in range(backbone.n_layers):
        block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked))
        x = block(x, pos, seg)
        if i + 1 >= inject_layer:
            x = x + alpha * injection
    return backbone.final_norm(x)


@pytest.mark.parametrize("remat,inject_layer", [("block", 2), ("none", 0)])
def test_scan_equals_per_layer_loop_with_injection(remat, inject_layer):
    cfg = tiny_config(n_layers=3, remat=remat)
    model = make_model(cfg)
    tokens = random_tokens(cfg, 2, 8)
    inj = jax.random.normal(jax.random.key(5), (2, 8, cfg.d_model))
    want = _per_layer_reference(model.backbone, tokens, inj, inject_layer, 0.7)
    got = nnx.jit(lambda m, x, j: m.backbone(x, injection=j, inject_layer=inject_layer,
                                             inject_alpha=0.7))(model, tokens, inj)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    unrolled = nnx.jit(lambda m, x, j: m.backbone(x, injection=j, inject_layer=inject_layer,
                                                  inject_alpha=0.7))
    model.backbone.scan_layers = False
    np.testing.assert_allclose(unrolled(model, tokens, inj), want, atol=2e-5, rtol=1e-5)


def _train_hlo_chars(n_layers: int, scan: bool) -> int:
    cfg = tiny_config(n_layers=n_layers, scan_layers=scan, remat="block")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Backbone(cfg, rngs=nnx.Rngs(0))))
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    loss = lambda s, t: nnx.merge(graphdef, s)(t).sum()
    return len(jax.jit(jax.grad(loss)).lower(state, tokens).as_text())


def test_program_size_does_not_grow_with_depth():
    two, eight = _train_hlo_chars(2, True), _train_hlo_chars(8, True)
    assert eight < 1.05 * two, (two, eight)
    # the unrolled form of the same model does grow: the measure can see depth
    assert _train_hlo_chars(8, False) > 2 * _train_hlo_chars(2, False)


def test_decay_mask_ignores_the_layer_axis():
    """Decay exactly the parameters with >= 2 axes besides the stacked 'layers' axis,
    read from each parameter's logical axis names."""
    model = make_model(tiny_config())
    state = nnx.state(model, nnx.Param)
    axes = jax.tree.map(lambda v: tuple(v.get_metadata()["out_sharding"]), state,
                        is_leaf=lambda v: isinstance(v, nnx.Variable))
    want = jax.tree.map(lambda a: len([n for n in a if n != "layers"]) >= 2,
                        nnx.to_pure_dict(axes), is_leaf=lambda a: isinstance(a, tuple))
    got = decay_mask(nnx.to_pure_dict(state))
    assert got == want
    assert got["backbone"]["blocks"]["attn_norm"]["scale"] is False      # [L, D]
    assert got["backbone"]["blocks"]["mlp"]["gate"] is True              # [L, D, F]


def test_pre_scan_checkpoint_is_named_not_restored():
    """A checkpoint with one subtree per layer is refused with a line saying why."""
    new = {"backbone": {"blocks": {"mlp": {"gate": jax.ShapeDtypeStruct((2, 4, 8), jnp.float32)}}}}
    old = {"backbone": {"blocks": {"0": {"mlp": {"gate": np.zeros((4, 8), np.float32)}},
                                   "1": {"mlp": {"gate": np.zeros((4, 8), np.float32)}}}}}
    lines = tree_differences(old, new)
    assert "stacked into one scanned Block" in lines[0]
    assert "backbone.blocks.mlp.gate: wanted (2, 4, 8), not in the checkpoint" in lines


def test_per_layer_params_checkpoint_loads_stacked(tmp_path):
    """A params checkpoint written before the blocks were stacked (one subtree per
    layer, as orbax saved nnx.List) loads into the stacked model, row i = layer i."""
    import orbax.checkpoint as ocp
    import pathlib
    from cbm_lm.default_config import load_config_file
    from cbm_lm.config import ModelConfig
    from cbm_lm.train.checkpoint import PARAMS_ITEM, load_model, params_manager, write_config

    config = load_config_file(pathlib.Path(__file__).parents[1] / "gin_configs" / "tiny.py")
    model = make_model(ModelConfig.from_config(config.model), seed=4)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    stacked = params["backbone"]["blocks"]
    n = config.model.n_layers
    old = dict(params, backbone=dict(params["backbone"], blocks={
        i: jax.tree.map(lambda a: np.asarray(a)[i], stacked) for i in range(n)}))
    with params_manager(tmp_path, enable_async_checkpointing=False) as mngr:
        mngr.save(0, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardSave(old)}))
    write_config(tmp_path, config)

    loaded, _ = load_model(tmp_path)
    got = nnx.to_pure_dict(nnx.state(loaded, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, got, params)
