"""load_model(dtype="float32") runs a bfloat16-trained checkpoint in float32: the params
are the saved bf16 values exactly, and every activation is computed in float32."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cbm_lm.default_config import base_config
from cbm_lm.config import ModelConfig
from cbm_lm.model import ConceptBottleneckLM
from cbm_lm.train.checkpoint import load_model, save_params


def test_bf16_checkpoint_loads_and_runs_in_float32(tmp_path):
    c = base_config()
    c.model.update(dict(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                        mlp_dim=32, dtype="bfloat16", param_dtype="bfloat16"))
    c.model.concepts.update(dict(n_known=16, known_topk=2, n_unknown=16, unknown_rank=4,
                                 unknown_topk=2))
    cfg = ModelConfig.from_config(c.model)
    saved = ConceptBottleneckLM(cfg, rngs=nnx.Rngs(0))
    save_params(tmp_path / "ckpt", c, saved)

    model, _ = load_model(tmp_path / "ckpt", dtype="float32")
    assert model.config.dtype == model.config.param_dtype == "float32"
    want = jax.tree.leaves(nnx.state(saved, nnx.Param))
    got = jax.tree.leaves(nnx.state(model, nnx.Param))
    for a, b in zip(want, got):
        assert a.dtype == jnp.bfloat16 and b.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a, np.float32), b)
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    out = model(tokens)
    assert out.hidden.dtype == out.composed.dtype == jnp.float32
    bf16 = saved(tokens)
    assert bf16.hidden.dtype == jnp.bfloat16
    # Same weights, float32 arithmetic: close to the bf16 run, but not equal to it.
    np.testing.assert_allclose(out.logits, bf16.logits, atol=0.1)
    assert float(jnp.abs(out.logits - bf16.logits).max()) > 0
