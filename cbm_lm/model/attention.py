"""Grouped-query self-attention with causal / block-causal masks and packing.

Masks (positions restart at 0 per packed document, segment ids separate them):
  causal:          q sees kv  iff  seg_q == seg_kv  and  pos_kv <= pos_q
  block_causal(b): q sees kv  iff  seg_q == seg_kv  and  pos_kv // b <= pos_q // b
(bidirectional inside a b-token block, causal across blocks: Steerling's
masked-diffusion attention). Unpacked inputs have one segment and
positions 0..T-1, which reproduces Steerling's mask exactly.

Annealed block-causal mask (``lookahead`` w, a traced int scalar, block_causal only):
  q sees kv  iff  block_causal(b)  and  pos_kv <= pos_q + w
w = 0 is exactly the causal mask, w >= b - 1 exactly block-causal: the AR-to-diffusion
adaptation (train/losses.py) trains causally first, then widens w (DiffuLLaMA-style
attention-mask annealing, here toward block-causal instead of full attention).

Two-stream diffusion training (``stream`` given, block_causal only): the row
holds a noisy copy (stream 0) and the clean copy (stream 1) of each document
at the same positions. A noisy token sees the noisy tokens of its own block
and the clean tokens of earlier blocks, which is exactly what it sees at
generation time, when earlier blocks are committed; clean tokens see clean
tokens block-causally. One pass then trains every block against a clean
context. The row must be [noisy | clean] halves with the clean half repeating
the noisy half's positions and segment ids (train/losses.py builds it so);
``attention_mask(..., stream)`` is the dense reference of what
attention_kernels.two_stream_attention computes without the masked quarters.

Decoding with a KV cache (``cache`` given, causal only): ``cache`` = (k, v),
each [B,S,G,hd], where slot s holds the key/value of position s. The new
tokens' keys/values are written at their ``positions`` [B,T] and every query
attends to the slots at or before its own position. A slot not yet written
with a real token is never visible, because decoding writes positions in
order; the caller owns that invariant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cbm_lm.model.attention_kernels import dense_attention, two_stream_attention
from cbm_lm.model.layers import RMSNorm, apply_rope, normal, param, rope_angles, token_dot
from cbm_lm.parallel.sharding import constrain


def cache_mask(positions: jax.Array, cache_len: int) -> jax.Array:
    """Boolean mask [B,1,T,S]: query at position p sees cache slots s <= p."""
    slots = jnp.arange(cache_len, dtype=positions.dtype)
    return (slots[None, None, :] <= positions[:, :, None])[:, None, :, :]


def attention_mask(positions: jax.Array, segment_ids: jax.Array, kind: str,
                   block_size: int, stream: jax.Array | None = None,
                   lookahead: jax.Array | None = None) -> jax.Array:
    """Boolean mask [B,1,T,T] (q, kv) for ``kind`` in {causal, block_causal}.

    ``lookahead`` (block_causal only) also hides keys more than that many positions
    ahead of the query (module docstring)."""
    q_pos, kv_pos = positions[:, :, None], positions[:, None, :]
    if lookahead is not None and kind != "block_causal":
        raise ValueError("an annealed (lookahead) mask is defined for block_causal only")
    if stream is not None:
        if kind != "block_causal":
            raise ValueError("two-stream attention is defined for block_causal only")
        q_blk, kv_blk = q_pos // block_size, kv_pos // block_size
        q_clean, kv_clean = stream[:, :, None] > 0, stream[:, None, :] > 0
        visible = jnp.where(q_clean, kv_clean & (kv_blk <= q_blk),
                            (~kv_clean & (kv_blk == q_blk)) | (kv_clean & (kv_blk < q_blk)))
    elif kind == "causal":
        visible = kv_pos <= q_pos
    elif kind == "block_causal":
        visible = (kv_pos // block_size) <= (q_pos // block_size)
    else:
        raise ValueError(f"unknown attention kind {kind!r}")
    if lookahead is not None:
        visible = visible & (kv_pos <= q_pos + lookahead)
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (visible & same_doc)[:, None, :, :]


class Attention(nnx.Module):
    """x [B,T,D] -> [B,T,D]. H query heads share G = n_kv_heads key/value heads.

    q = x W_q [B,T,H,hd], k,v = x W_k, x W_v [B,T,G,hd]; optional clip of q,k,v
    to [-c, c]; optional RMSNorm over hd (QK-norm); RoPE in fp32;
    softmax(q k^T / sqrt(hd) + mask) v in fp32; out = concat_heads W_o.
    Query head h reads kv head h // (H/G).
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs, use_rope: bool = True):
        d, h, g, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        pd = jnp.dtype(cfg.param_dtype)
        std, out_std = cfg.init_std, cfg.init_std * (2 * cfg.n_layers) ** -0.5
        self.n_heads, self.n_kv_heads, self.head_dim = h, g, hd
        self.kind, self.block_size = cfg.attention, cfg.diffusion_block_size
        self.qkv_clip, self.rope_base, self.use_rope = cfg.qkv_clip, cfg.rope_base, use_rope
        self.dtype = jnp.dtype(cfg.dtype)
        self.q_proj = param(rngs, normal(std), (d, h, hd), ("embed", "heads", "head_dim"), pd)
        self.k_proj = param(rngs, normal(std), (d, g, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.v_proj = param(rngs, normal(std), (d, g, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = param(rngs, normal(out_std), (h, hd, d), ("heads", "head_dim", "embed"), pd)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, eps=cfg.norm_eps, axis_name="head_dim", rngs=rngs, param_dtype=pd)
            self.k_norm = RMSNorm(hd, eps=cfg.norm_eps, axis_name="head_dim", rngs=rngs, param_dtype=pd)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 stream: jax.Array | None = None, cache=None, lookahead=None):
        """x [B,T,D] -> [B,T,D]; with ``cache`` (k, v) -> ([B,T,D], updated cache).

        ``lookahead`` (traced int scalar, block_causal only): the annealed mask."""
        b, t, _ = x.shape
        dt = self.dtype
        x = x.astype(dt)
        q = token_dot(x, self.q_proj[...].astype(dt))          # [B,T,H,hd]
        k = token_dot(x, self.k_proj[...].astype(dt))          # [B,T,G,hd]
        v = token_dot(x, self.v_proj[...].astype(dt))
        if self.qkv_clip is not None:
            q, k, v = (jnp.clip(a, -self.qkv_clip, self.qkv_clip) for a in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            sin, cos = rope_angles(positions, self.head_dim, self.rope_base)
            q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))

        if cache is not None:
            if self.kind != "causal":
                raise ValueError("a KV cache needs causal attention (model.attention='causal'), "
                                 f"got {self.kind!r}")
            rows = jnp.arange(b)[:, None]
            k = cache[0].at[rows, positions].set(k.astype(cache[0].dtype))
            v = cache[1].at[rows, positions].set(v.astype(cache[1].dtype))
            cache = (k, v)
            mask = cache_mask(positions, k.shape[1])
        elif stream is not None:
            if self.kind != "block_causal":
                raise ValueError("two-stream attention is defined for block_causal only")
            mask = None
        else:
            mask = attention_mask(positions, segment_ids, self.kind, self.block_size,
                                  lookahead=lookahead)

        k, v = k.astype(q.dtype), v.astype(q.dtype)
        if mask is None:   # rows [noisy | clean]: the masked quarters are never computed
            out = two_stream_attention(q, k, v, positions, segment_ids, self.block_size,
                                       lookahead=lookahead)
        else:
            out = dense_attention(q, k, v, mask)
        out = token_dot(out.astype(dt), self.o_proj[...].astype(dt), n_in=2)   # [B,T,D]
        return out if cache is None else (out, cache)
