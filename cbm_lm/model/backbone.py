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

    The L blocks are one ``Block`` whose parameters carry a leading [L] axis
    (logical name ``layers``, never sharded), created by ``nnx.vmap`` and run
    by one ``jax.lax.scan``: the compiled step holds one block's program
    whatever the depth (MaxText's scanned layers). ``model.remat`` picks the
    ``jax.checkpoint`` policy of the scanned body; ``model.scan_layers=False``
    unrolls the same body over the same stacked parameters (XLA's cost
    analysis counts a loop body once, so FLOP counts need the unrolled form).

    ``injection`` [B,T,D] with ``inject_layer`` L adds ``inject_alpha *
    injection`` to the residual stream after every block i with i+1 >= L
    (Steerling-style concept steering); inside the scan that is a per-layer
    gate (i+1 >= L) on the addition.

    ``lookahead`` (traced int scalar, block-causal models): the annealed attention mask
    (model/attention.py); 0 is causal attention. Training only.

    ``kv_cache`` (k, v), each [L,B,S,G,hd] (see ``init_kv_cache``), switches to
    incremental decoding: returns (h, updated kv_cache).
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.dtype)
        self.n_layers = cfg.n_layers
        self.embedding = param(rngs, normal(cfg.init_std), (cfg.vocab_size, cfg.d_model),
                               ("vocab", "embed"), pd)
        self.blocks = _stacked_blocks(cfg, rngs)
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs, param_dtype=pd)
        self.remat = cfg.remat
        self.scan_layers = cfg.scan_layers

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
        graphdef, stacked = nnx.split(self.blocks)
        inject = injection is not None and inject_layer is not None
        if inject:
            injection = inject_alpha * injection.astype(x.dtype)

        def body(x, xs):
            params, i, cache = xs
            block = nnx.merge(graphdef, params)
            if cache is None:
                x = block(x, positions, segment_ids, stream, lookahead=lookahead)
            else:
                x, cache = block(x, positions, segment_ids, stream, cache=cache)
            if inject:
                x = jnp.where(i + 1 >= inject_layer, x + injection, x)
            return x, cache

        if self.remat != "none" and kv_cache is None:
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        layer_ids = jnp.arange(self.n_layers, dtype=jnp.int32)
        if self.scan_layers:
            x, new_cache = jax.lax.scan(body, x, (stacked, layer_ids, kv_cache))
        else:   # the same body, unrolled: XLA's cost analysis counts a loop body once
            caches = []
            for i in range(self.n_layers):
                x, c = body(x, jax.tree.map(lambda a: a[i], (stacked, layer_ids, kv_cache)))
                caches.append(c)
            new_cache = None if kv_cache is None else jax.tree.map(
                lambda *a: jnp.stack(a), *caches)
        h = self.final_norm(x)
        return h if kv_cache is None else (h, new_cache)

    def init_kv_cache(self, batch: int, length: int, dtype=None):
        """Zeroed KV cache (k, v), each [L,B,S,G,hd]."""
        attn = self.blocks.attn
        shape = (self.n_layers, batch, length, attn.n_kv_heads, attn.head_dim)
        dtype = dtype or self.dtype
        return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def _stacked_blocks(cfg, rngs: nnx.Rngs) -> Block:
    """One Block with every parameter stacked to [L, ...] (axis name ``layers``)."""
    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return Block(cfg, rngs=rngs)
    return make(rngs)
