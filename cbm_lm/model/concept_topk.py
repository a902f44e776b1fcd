"""The concept heads' top-k selection: capped logits, a streaming top-k over blocks of
concepts, and its sharded form (top-k per shard, then a merge of the shard winners).

For queries q [N,Q] and a key table K [C_pad,Q] of which the first ``n_valid`` rows
are concepts:

  z      = cap(q K[:n_valid]^T)                          [N,n_valid], never formed whole
  top-k  = the k largest z per row, by blocks of ``block`` rows of K, each block's
           top-k merged into the running one                  memory O(N (k + block))

Sharded (under ``jax.set_mesh`` with logical-axis rules, ``sharded_streaming_topk``):
tokens stay on their ``batch`` shards and the table on its concept shards (``tensor``
for ``known_concepts`` / ``unknown_concepts``). Inside ``jax.shard_map`` every device
ranks its own C_pad/T rows for its own N/B tokens (global ids = shard offset + row),
and the T shard winners [N/B, k T] are all-gathered over the concept axis and merged:

  top-k(z[n, :]) = top-k( union_s top-k(z[n, C_s]) )     (C_s the rows of shard s)

Why shard_map: XLA's SPMD partitioner does not split the TopK op along its batch
dimension; left to it, every block's z was all-gathered over the batch shards
(Steerling-8B on v5e:16x16: an f32[524288, 4096] buffer, 8 GiB per chip).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import AxisType, PartitionSpec as P

CLIP_MODES = ("hard", "straight_through", "soft")


def cap_logits(z: jax.Array, clip: float, mode: str = "hard") -> jax.Array:
    """Bounds concept logits to [-clip, clip] by ``mode`` (cbm_lm.model.concepts docstring)."""
    if mode == "soft":
        return clip * jnp.tanh(z / clip)
    hard = jnp.clip(z, -clip, clip)
    if mode == "straight_through":
        return z + jax.lax.stop_gradient(hard - z)
    if mode != "hard":
        raise ValueError(f"clip_mode must be one of {CLIP_MODES}, got {mode!r}")
    return hard


def merge_topk(vals_a, idx_a, vals_b, idx_b, k: int):
    """Top-k of the union of two candidate sets [N,ka], [N,kb] -> [N,k]."""
    vals = jnp.concatenate([vals_a, vals_b], axis=-1)
    idx = jnp.concatenate([idx_a, idx_b], axis=-1)
    top_vals, pos = jax.lax.top_k(vals, k)
    return top_vals, jnp.take_along_axis(idx, pos, axis=-1)


def _topk_rows(q, keys, n_rows: int, k: int, block_size: int, clip: float, clip_mode: str,
               id_offset=0, n_valid=None):
    """Top-k over rows [0, n_rows) of ``keys``, reported as ids ``id_offset + row``; rows whose
    id is >= ``n_valid`` (when given) rank as -inf. The last block is shifted back to end at
    n_rows (dynamic_slice semantics) and rows an earlier block covered are masked, so every
    row is ranked exactly once."""
    block = min(block_size, n_rows)
    n_blocks = -(-n_rows // block)
    n = q.shape[0]
    init = (jnp.full((n, k), -jnp.inf, jnp.float32), jnp.zeros((n, k), jnp.int32))

    def body(j, carry):
        start = jnp.minimum(j * block, n_rows - block)
        rows = jax.lax.dynamic_slice_in_dim(keys, start, block, axis=0)
        z = cap_logits(q @ rows.astype(jnp.float32).T, clip, clip_mode)   # [N,block]
        local = start + jnp.arange(block, dtype=jnp.int32)
        ids = id_offset + local
        keep = local >= j * block                                          # not seen in j-1
        if n_valid is not None:
            keep = keep & (ids < n_valid)
        z = jnp.where(keep[None, :], z, -jnp.inf)
        blk_vals, blk_pos = jax.lax.top_k(z, min(k, block))
        return merge_topk(*carry, blk_vals, ids[blk_pos], k)

    return jax.lax.fori_loop(0, n_blocks, body, init)


def streaming_topk(q: jax.Array, keys: jax.Array, n_valid: int, k: int, block_size: int,
                   clip: float, clip_mode: str = "hard"):
    """Top-k of cap(q keys[:n_valid]^T) per row without forming [N, n_valid].

    q [N,Q] fp32, keys [C_pad,Q]. Returns (values [N,k], indices [N,k] int32).
    """
    return _topk_rows(q, keys, n_valid, k, block_size, clip, clip_mode)


def _mesh_axes(logical: str | None):
    """Mesh axes (a tuple, possibly empty) the active rules give one logical axis."""
    spec = nn.logical_to_mesh_axes((logical,))
    axes = None if spec is None else spec[0]
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def map_row_shards(fn, q: jax.Array, *tables: jax.Array):
    """fn(q_s, *tables) on each batch shard q_s of q's rows [N,...] under ``jax.shard_map``,
    tables replicated; outputs keep the rows' sharding. For row-wise kernels that XLA
    cannot partition by itself (model/factorized_topk_cpu.py). Outside a mesh, on one
    batch shard, where N does not divide over the batch shards, or where a batch axis is
    not Auto (an Explicit axis would need q resharded first), it is fn(q, *tables)."""
    mesh = jax.sharding.get_abstract_mesh()
    batch = () if mesh.empty else _mesh_axes("batch")
    n_batch = math.prod(mesh.shape[a] for a in batch) if batch else 1
    auto = all(mesh.axis_types[mesh.axis_names.index(a)] == AxisType.Auto for a in batch)
    if n_batch == 1 or q.shape[0] % n_batch or not auto:
        return fn(q, *tables)
    # a spec is a prefix of every output's: rows on the batch shards, the rest whole
    return jax.shard_map(fn, in_specs=(P(batch), *(P() for _ in tables)), out_specs=P(batch),
                         check_vma=False)(q, *tables)


def sharded_streaming_topk(q: jax.Array, keys: jax.Array, n_valid: int, k: int,
                           block_size: int, clip: float, clip_mode: str = "hard",
                           concept_axis: str = "known_concepts"):
    """``streaming_topk`` with the top-k taken per (batch shard, concept shard) under
    ``jax.shard_map`` and merged over the concept shards (module docstring). Outside a
    mesh, or where the shapes do not divide the mesh, it is ``streaming_topk``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return streaming_topk(q, keys, n_valid, k, block_size, clip, clip_mode)
    batch, concept = _mesh_axes("batch"), _mesh_axes(concept_axis)
    # A mesh axis cannot split both: its devices would hold other tokens AND other concept
    # rows, and the merge over it would mix winners of different tokens. Batch keeps it;
    # the concept rows are replicated over it.
    concept = tuple(a for a in concept if a not in batch)
    n_batch = math.prod(mesh.shape[a] for a in batch)
    n_concept = math.prod(mesh.shape[a] for a in concept)
    if q.shape[0] % n_batch:
        batch, n_batch = (), 1
    if keys.shape[0] % n_concept or keys.shape[0] // n_concept < k:
        concept, n_concept = (), 1
    if n_batch == 1 and n_concept == 1:
        return streaming_topk(q, keys, n_valid, k, block_size, clip, clip_mode)
    rows = keys.shape[0] // n_concept
    b_spec = batch if batch else None
    c_spec = concept if concept else None

    def local(q_s, keys_s):
        offset = jax.lax.axis_index(concept) * rows if concept else 0
        vals, ids = _topk_rows(q_s, keys_s, rows, k, block_size, clip, clip_mode,
                               id_offset=offset, n_valid=n_valid)
        if concept:   # the shard winners [N_s, k T] -> their top-k
            vals = jax.lax.all_gather(vals, concept, axis=1, tiled=True)
            ids = jax.lax.all_gather(ids, concept, axis=1, tiled=True)
            vals, pos = jax.lax.top_k(vals, k)
            ids = jnp.take_along_axis(ids, pos, axis=-1)
        return vals, ids

    f = jax.shard_map(local, in_specs=(P(b_spec, None), P(c_spec, None)),
                      out_specs=(P(b_spec, None), P(b_spec, None)), check_vma=False)
    return f(q.astype(jnp.float32), keys)
