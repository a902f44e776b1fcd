"""ChunkProvenanceHead: one unit key per chunk, from what the model holds about it.

For one packed row with chunk segments c(t) in {0 (padding), 1..m} and the
tokens T_j of chunk j (DESIGN.md section 7):

  a_j^known   = 1/|T_j| sum_{t in T_j} sum_s w^k_{t,s} R_k[i^k_{t,s}]    pooled sparse known
  a_j^unknown = 1/|T_j| sum_{t in T_j} sum_s w^u_{t,s} R_u[i^u_{t,s}]    pooled sparse unknown
  a_j^hidden  = (1/|T_j| sum_{t in T_j} h_t) R_h                          pooled hidden state
  u_j = lambda_k n(a^k) + lambda_u n(a^u) + lambda_h n(a^h)               [d_p]
  (a) fixed:   key_j = n(u_j)
  (b) learned: key_j = n(u_j + [n(a^k), n(a^u), n(a^h)] W)                W [3 d_p, d_p], init 0

n(x) = x / max(|x|, 1e-6). R_k [C_k, d_p], R_u [C_u, d_p], R_h [D, d_p] are
Gaussian, drawn from ``provenance.seed`` (the same for every checkpoint and
every sharding: threefry is partitionable), so the fixed key is a
Johnson-Lindenstrauss sketch of the concatenated normalized parts and its
inner products approximate the weighted sum of the parts' cosines. The
learned map starts at the fixed key (W = 0) and is trained with the in-batch
contrastive loss of ``contrastive_loss``.

Shapes: w, i [B,T,S] (the heads' active sets, never [B,T,C]); h [B,T,D];
chunk slots M = ``max_chunks_per_row``: chunk j of a row fills slot j-1,
chunks past M get no key (``valid`` False). Pooling is a one-hot [B,T,M]
contraction, which shards over the batch like the rest of the model.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cbm_lm.config import ModelConfig, ProvenanceConfig
from cbm_lm.model.layers import param
from cbm_lm.parallel.sharding import constrain

_EPS = 1e-6


class ChunkKeys(NamedTuple):
    keys: jax.Array     # [B,M,d_p] unit keys (zeros where not valid)
    valid: jax.Array    # [B,M] bool: the row has a chunk in this slot
    tokens: jax.Array   # [B,M] int32 tokens pooled into the slot


def normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / max(|x|, eps) along ``axis``."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), _EPS)


def chunk_onehot(chunk_segment_ids: jax.Array, max_chunks: int) -> jax.Array:
    """[B,T] chunk segment ids (0 = padding) -> [B,T,M] float32 one-hot of slot id - 1."""
    slots = jnp.arange(1, max_chunks + 1, dtype=jnp.int32)
    return (chunk_segment_ids[..., None].astype(jnp.int32) == slots).astype(jnp.float32)


def pool_mean(onehot: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean of x [B,T,F] over each chunk slot -> ([B,M,F], token counts [B,M])."""
    counts = onehot.sum(axis=1)
    total = jnp.einsum("btm,btf->bmf", onehot, x.astype(jnp.float32))
    return total / jnp.maximum(counts, 1.0)[..., None], counts


def projection(seed: int, part: int, rows: int, d_p: int, axes) -> jax.Array:
    """The fixed Gaussian table R [rows, d_p] of one part (0 known, 1 unknown, 2 hidden)."""
    key = jax.random.fold_in(jax.random.key(seed), part)
    r = jax.random.normal(key, (rows, d_p), jnp.float32) / jnp.sqrt(jnp.float32(d_p))
    return constrain(r, axes)


def sparse_project(indices: jax.Array, weights: jax.Array, table: jax.Array) -> jax.Array:
    """sum_s w_{t,s} R[i_{t,s}]: [B,T,S] x [C,d_p] -> [B,T,d_p] (no [B,T,C] tensor)."""
    rows = jnp.take(table, indices, axis=0)                                   # [B,T,S,d_p]
    return jnp.einsum("bts,btsd->btd", weights.astype(jnp.float32), rows)


class ChunkProvenanceHead(nnx.Module):
    """LM outputs + chunk segment ids -> ChunkKeys (see the module docstring)."""

    def __init__(self, cfg: ProvenanceConfig, model_cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg, self.model_cfg = cfg, model_cfg
        if cfg.head == "learned":
            self.mix = param(rngs, nnx.initializers.zeros, (3 * cfg.d_p, cfg.d_p),
                             (None, "keys"), jnp.dtype(model_cfg.param_dtype))

    def parts(self, out, chunk_segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Normalized pooled parts [B,M,3,d_p] (known, unknown, hidden) and counts [B,M]."""
        c, mc = self.cfg, self.model_cfg.concepts
        onehot = chunk_onehot(chunk_segment_ids, c.max_chunks_per_row)
        r_k = projection(c.seed, 0, mc.n_known_padded, c.d_p, ("known_concepts", "keys"))
        per_token = [sparse_project(out.known.indices, out.known.weights, r_k)]
        if out.unknown is not None:
            r_u = projection(c.seed, 1, mc.n_unknown_padded, c.d_p, ("unknown_concepts", "keys"))
            per_token.append(sparse_project(out.unknown.indices, out.unknown.weights, r_u))
        else:
            per_token.append(jnp.zeros_like(per_token[0]))
        r_h = projection(c.seed, 2, self.model_cfg.d_model, c.d_p, ("embed", "keys"))
        per_token.append(jnp.einsum("btd,dk->btk", out.hidden.astype(jnp.float32), r_h))
        x = jnp.stack(per_token, axis=2)                                          # [B,T,3,d_p]
        b, t = x.shape[:2]
        pooled, counts = pool_mean(onehot, x.reshape(b, t, -1))
        pooled = normalize(pooled.reshape(b, -1, 3, c.d_p))
        return constrain(pooled, ("batch", None, None, "keys")), counts

    def __call__(self, out, chunk_segment_ids: jax.Array) -> ChunkKeys:
        c = self.cfg
        parts, counts = self.parts(out, chunk_segment_ids)
        lam = jnp.asarray([c.known_weight, c.unknown_weight, c.hidden_weight], jnp.float32)
        u = jnp.einsum("bmpd,p->bmd", parts, lam)
        if c.head == "learned":
            b, m = parts.shape[:2]
            u = u + parts.reshape(b, m, -1) @ self.mix[...].astype(jnp.float32)
        valid = counts > 0
        keys = jnp.where(valid[..., None], normalize(u), 0.0)
        return ChunkKeys(constrain(keys, ("batch", None, "keys")), valid,
                         counts.astype(jnp.int32))


def contrastive_loss(keys_a: jax.Array, keys_b: jax.Array, valid: jax.Array,
                     temperature: float) -> jax.Array:
    """Symmetric in-batch InfoNCE between two views' keys of the same chunks.

    keys_* [B,M,d_p] unit keys, valid [B,M]. With the N valid slots flattened,
    logits = K_a K_b^T / tau [N,N] and
      L = 1/2 (CE(logits, diag) + CE(logits^T, diag)),
    averaged over valid chunks; every other chunk of the batch is a negative.
    """
    a = keys_a.reshape(-1, keys_a.shape[-1])
    b = keys_b.reshape(-1, keys_b.shape[-1])
    v = valid.reshape(-1)
    logits = (a @ b.T) / temperature
    mask = v[None, :] & v[:, None]
    logits = jnp.where(mask, logits, -1e9)
    diag = jnp.diagonal(logits)
    row = jax.nn.logsumexp(logits, axis=1) - diag
    col = jax.nn.logsumexp(logits, axis=0) - diag
    vf = v.astype(jnp.float32)
    return 0.5 * jnp.sum((row + col) * vf) / jnp.maximum(vf.sum(), 1.0)
