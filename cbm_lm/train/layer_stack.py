"""Params saved with one subtree per layer, read into the stacked blocks.

Since the blocks became one scanned Block (model/backbone.py), every block
parameter is one [L, ...] array under ``backbone.blocks``; checkpoints written
before hold ``backbone.blocks.<i>.*`` of [...] each. ``restore_params`` reads
such a checkpoint through per-layer targets (the stacked target's row i, with
the stacked sharding minus its leading, never sharded, ``layers`` axis) and
stacks the rows:

  stacked[k][i] = saved["backbone"]["blocks"][i][k]     for every block param k

Only params convert this way; resuming a pre-stacking training run (its
optimizer moments are per layer too) is refused by the restore check, with a
line saying why (train/restore_check.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P


def per_layer_count(saved: dict) -> int | None:
    """L when ``saved`` (orbax metadata tree) holds ``backbone.blocks.<i>`` subtrees."""
    blocks = saved.get("backbone", {}).get("blocks") if isinstance(saved, dict) else None
    if not isinstance(blocks, dict) or not blocks:
        return None
    if not all(str(k).isdigit() for k in blocks):
        return None
    return len(blocks)


def _row(target: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    s = target.sharding
    if isinstance(s, NamedSharding):
        s = NamedSharding(s.mesh, P(*tuple(s.spec)[1:]))
    return jax.ShapeDtypeStruct(target.shape[1:], target.dtype, sharding=s)


def per_layer_targets(targets: dict, n_layers: int) -> dict:
    """``targets`` with the stacked ``backbone.blocks`` split into {i: row-i targets}."""
    blocks = targets["backbone"]["blocks"]
    rows = jax.tree.map(_row, blocks)
    backbone = dict(targets["backbone"], blocks={i: rows for i in range(n_layers)})
    return dict(targets, backbone=backbone)


def stack_restored(restored: dict, targets: dict) -> dict:
    """Per-layer restored params -> the stacked layout (and sharding) of ``targets``."""
    per_layer = restored["backbone"]["blocks"]
    layers = [per_layer[k] for k in sorted(per_layer, key=int)]
    stacked = jax.tree.map(
        lambda t, *rows: jax.device_put(jnp.stack(rows), t.sharding),
        targets["backbone"]["blocks"], *layers)
    return dict(restored, backbone=dict(restored["backbone"], blocks=stacked))
