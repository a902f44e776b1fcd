"""Incremental decoding with a KV cache equals the full causal forward."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model_fixtures import make_model, random_tokens, tiny_config


def test_kv_cache_decoding_matches_full_forward():
    cfg = tiny_config(attention="causal", objective="autoregressive")
    model = make_model(cfg)
    ids = random_tokens(cfg, 2, 12)
    # jitted: one compile per shape instead of eager op-by-op dispatch of 9 passes
    call = nnx.jit(lambda m, x, p, c: m(x, positions=p, kv_cache=c))
    full = nnx.jit(lambda m, x: m(x).logits)(model, ids)
    cache = model.backbone.init_kv_cache(2, 16)
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    out = call(model, ids[:, :5], pos, cache)                   # prefill 5 tokens
    got = [out.logits]
    cache = out.kv_cache
    for t in range(5, 12):                                      # then one token at a time
        out = call(model, ids[:, t:t + 1], jnp.full((2, 1), t), cache)
        cache = out.kv_cache
        got.append(out.logits)
    np.testing.assert_allclose(np.concatenate(got, 1), full, atol=1e-5, rtol=0)


def test_kv_cache_refuses_block_causal():
    cfg = tiny_config()
    model = make_model(cfg)
    with pytest.raises(ValueError, match="causal"):
        model(random_tokens(cfg, 1, 4), kv_cache=model.backbone.init_kv_cache(1, 8))
