"""Token embedding + transformer stack + final norm (Steerling-compatible).

Block, pre-norm:  x += attn(norm1(x));  x += mlp(norm2(x))
Block, post-norm: x += norm1(attn(x));  x += norm2(mlp(x))   (Steerling's default)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cbm_lm.model.attention import Attention
from cbm_lm.model.layers import RMSNorm, SwiGLU, normal, param
from cbm_lm.parallel.sharding import constrain

ACT_AXES = ("batch", "length", "activation_embed")

# model.remat: "block" keeps the matmul outputs of each block and recomputes
# the cheap elementwise work in the backward pass; "full" keeps only each
# block's input and recomputes the whole block.
REMAT_POLICIES = {
    "block": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class Block(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.norm_order = cfg.norm_order
        self.attn = Attention(cfg, rngs=rngs, use_rope=cfg.use_rope)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_dim, init_std=cfg.init_std,
                          out_std=cfg.init_std * (2 * cfg.n_layers) ** -0.5, rngs=rngs,
                          param_dtype=pd, dtype=jnp.dtype(cfg.dtype))
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs, param_dtype=pd)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs, param_dtype=pd)

    def __call__(self, x, positions, segment_ids, stream=None, cache=None, lookahead=None):
        """x [B,T,D] -> [B,T,D]; with a KV ``cache`` -> ([B,T,D], updated cache)."""
        def attn(y):
            nonlocal cache
            if cache is None:
                return self.attn(y, positions, segment_ids, stream, lookahead=lookahead)
            y, cache = self.attn(y, positions, segment_ids, stream, cache=cache)
            return y

        if self.norm_order == "pre":
            x = x + attn(self.attn_norm(x))
            x = x + self.mlp(self.mlp_norm(x))
        else:
            x = x + self.attn_norm(attn(x))
            x = x + self.mlp_norm(self.mlp(x))
        x = constrain(x, ACT_AXES)
        return x if cache is None else (x, cache)


class Backbone(nnx.Module):
    """tokens [B,T] (or embeddings [B,T,D]) -> final-norm hidden h [B,T,D].

    ``injection`` [B,T,D] with ``inject_layer`` L adds ``inject_alpha *
    injection`` to the residual stream after every block i with i+1 >= L
    (Steerling-style concept steering).

    ``lookahead`` (traced int scalar, block-causal models): the annealed attention mask
    (model/attention.py); 0 is causal attention. Training only.

    ``kv_cache`` (one (k, v) per layer, see model/attention.py) switches to
    incremental decoding: returns (h, updated kv_cache).
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.dtype)
        self.embedding = param(rngs, normal(cfg.init_std), (cfg.vocab_size, cfg.d_model),
                               ("vocab", "embed"), pd)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs, param_dtype=pd)
        self.remat = cfg.remat

    def embed(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def __call__(self, tokens=None, *, positions=None, segment_ids=None, stream=None,
                 input_embeds=None, injection=None, inject_layer: int | None = None,
                 inject_alpha: float = 1.0, kv_cache=None, lookahead=None):
        x = self.embed(tokens) if input_embeds is None else input_embeds.astype(self.dtype)
        b, t, _ = x.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        x = constrain(x, ACT_AXES)
        new_cache = []
        for i, block in enumerate(self.blocks):
            if kv_cache is not None:
                x, layer_cache = block(x, positions, segment_ids, stream, cache=kv_cache[i])
                new_cache.append(layer_cache)
            elif self.remat != "none":
                x = nnx.remat(lambda blk, y: blk(y, positions, segment_ids, stream,
                                                 lookahead=lookahead),
                              policy=REMAT_POLICIES[self.remat])(block, x)
            else:
                x = block(x, positions, segment_ids, stream, lookahead=lookahead)
            if injection is not None and inject_layer is not None and i + 1 >= inject_layer:
                x = x + inject_alpha * injection.astype(x.dtype)
        h = self.final_norm(x)
        return h if kv_cache is None else (h, tuple(new_cache))

    def init_kv_cache(self, batch: int, length: int, dtype=None):
        """Zeroed KV cache: one (k, v) of [B,S,G,hd] per layer."""
        attn = self.blocks[0].attn
        shape = (batch, length, attn.n_kv_heads, attn.head_dim)
        dtype = dtype or self.dtype
        return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in self.blocks)
