"""Masked softmax attention: one-stream through jax.nn.dot_product_attention, and
two-stream diffusion attention without its masked quarters.

Shapes: q [B,T,H,hd], k / v [B,S,G,hd] (H = G x R query heads share G kv heads),
boolean masks [B,1,T,S] (True = visible). Scores and softmax run in fp32,
probabilities mix v in v's dtype (jax.nn.dot_product_attention's XLA path).

Two-stream rows hold [noisy | clean] halves of T tokens each, the clean half
repeating the noisy half's positions and segment ids (losses.py builds them
so). With blocks of b positions (block = position // b inside a segment):

  clean query  -> clean keys, block-causal                        [T, T]
  noisy query  -> clean keys of strictly earlier blocks           [T, T]
               +  noisy keys of its own block                     [T, 3b] band
  (clean query -> noisy keys is never visible: not computed)

one softmax over the noisy query's two key sets. A block spans at most b
consecutive rows, so a noisy query's block-mates lie in its own b-row chunk
or the two beside it: the noisy-noisy quarter costs T x 3b, not T x T.
Against the dense [2T, 2T] form that halves score memory and FLOPs at
T >> b (Steerling-8B: T 4096, b 64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = jnp.finfo(jnp.float32).min


def dense_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(hd) | mask) v via jax.nn.dot_product_attention -> [B,T,H,hd]."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def _block_causal_mask(q_pos, q_seg, kv_pos, kv_seg, b, strict: bool, lookahead=None):
    qb, kb = (q_pos // b)[:, :, None], (kv_pos // b)[:, None, :]
    vis = (kb < qb) if strict else (kb <= qb)
    if lookahead is not None:   # the annealed mask (model/attention.py)
        vis = vis & (kv_pos[:, None, :] <= q_pos[:, :, None] + lookahead)
    return vis & (q_seg[:, :, None] == kv_seg[:, None, :])


def _chunks(x, n, c):
    """[B,n*c,...] -> [B,n,c,...]."""
    return x.reshape(x.shape[0], n, c, *x.shape[2:])


def _band(x):
    """[B,n,c,...] -> [B,n,3c,...]: each chunk with the chunks before and after it."""
    prev = jnp.roll(x, 1, axis=1)
    nxt = jnp.roll(x, -1, axis=1)
    return jnp.concatenate([prev, x, nxt], axis=2)


def two_stream_attention(q, k, v, positions, segment_ids, block_size: int, lookahead=None):
    """Two-stream attention over rows [noisy | clean] (module docstring) -> [B,2T,H,hd].

    ``lookahead`` w (traced int scalar): inside a block, keys at most w positions ahead of
    the query are visible, in both streams (the annealed mask of model/attention.py)."""
    b2, t2, h, hd = q.shape
    t, g = t2 // 2, k.shape[2]
    r = h // g
    pos, seg = positions[:, :t], segment_ids[:, :t]
    qn, qc = q[:, :t], q[:, t:]
    kn, kc, vn, vc = k[:, :t], k[:, t:], v[:, :t], v[:, t:]

    clean_mask = _block_causal_mask(pos, seg, pos, seg, block_size, strict=False,
                                    lookahead=lookahead)
    out_clean = dense_attention(qc, kc, vc, clean_mask[:, None])

    # Noisy queries: pad rows to chunks of c = block_size (padding rows: segment -1).
    c = block_size
    pad = -t % c
    n = (t + pad) // c
    padr = ((0, 0), (0, pad))
    seg_p = jnp.pad(seg, padr, constant_values=-1)
    pos_p = jnp.pad(pos, padr)
    qn_p = jnp.pad(qn, padr + ((0, 0), (0, 0)))
    kn_p, vn_p = (jnp.pad(a, padr + ((0, 0), (0, 0))) for a in (kn, vn))
    scale = hd ** -0.5
    qf = _chunks(qn_p, n, c).reshape(b2, n, c, g, r, hd)

    # Scores against clean keys of strictly earlier blocks: [B,G,R,n,c,T].
    s_clean = jnp.einsum("bncgrk,bsgk->bgrncs", qf, kc, preferred_element_type=jnp.float32)
    m_clean = _block_causal_mask(pos_p, seg_p, pos, seg, block_size, strict=True)
    s_clean = jnp.where(_chunks(m_clean, n, c)[:, None, None], s_clean * scale, NEG)

    # Scores against the noisy keys of the 3c-row band around each chunk: [B,G,R,n,c,3c].
    k_band, v_band = _band(_chunks(kn_p, n, c)), _band(_chunks(vn_p, n, c))
    s_band = jnp.einsum("bncgrk,bnsgk->bgrncs", qf, k_band, preferred_element_type=jnp.float32)
    chunk_id = jnp.arange(n)
    band_chunk = jnp.concatenate([jnp.repeat(chunk_id - 1, c).reshape(n, c),
                                  jnp.repeat(chunk_id, c).reshape(n, c),
                                  jnp.repeat(chunk_id + 1, c).reshape(n, c)], axis=1)
    in_row = (band_chunk >= 0) & (band_chunk < n)                           # [n,3c], no wrap
    seg_c, blk_c = _chunks(seg_p, n, c), _chunks(pos_p // block_size, n, c)
    seg_band, blk_band = _band(seg_c), _band(blk_c)
    m_band = ((seg_c[..., :, None] == seg_band[..., None, :])
              & (blk_c[..., :, None] == blk_band[..., None, :])
              & (seg_c[..., :, None] >= 0) & in_row[None, :, None, :])      # [B,n,c,3c]
    if lookahead is not None:
        pos_c = _chunks(pos_p, n, c)
        m_band = m_band & (_band(pos_c)[..., None, :] <= pos_c[..., :, None] + lookahead)
    s_band = jnp.where(m_band[:, None, None], s_band * scale, NEG)

    probs = jax.nn.softmax(jnp.concatenate([s_clean, s_band], axis=-1), axis=-1)
    p_clean, p_band = probs[..., :t].astype(vc.dtype), probs[..., t:].astype(vn.dtype)
    out_noisy = (jnp.einsum("bgrncs,bsgk->bncgrk", p_clean, vc)
                 + jnp.einsum("bgrncs,bnsgk->bncgrk", p_band, v_band))
    out_noisy = out_noisy.reshape(b2, n * c, h, hd)[:, :t]
    return jnp.concatenate([out_noisy, out_clean.astype(out_noisy.dtype)], axis=1)
