"""Logical axis names -> mesh PartitionSpecs, and activation constraints.

Every parameter carries logical axis names (``out_sharding`` metadata on its
``nnx.Param``); ``rules`` map them to mesh axes. A mesh axis may appear only
once in a PartitionSpec, so a later logical axis that maps to an axis already
used is left replicated.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, Any]]


def logical_to_spec(axes: Sequence[str | None], rules: Rules) -> P:
    """Maps logical axis names to a PartitionSpec under ``rules``."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in axes:
        mesh_axes = table.get(name) if name is not None else None
        if mesh_axes is None:
            out.append(None)
            continue
        group = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        group = tuple(a for a in group if a not in used)
        used.update(group)
        out.append(None if not group else group[0] if len(group) == 1 else group)
    return P(*out)


def logical_sharding(mesh: Mesh, axes: Sequence[str | None], rules: Rules) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, rules))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op outside a mesh.

    Uses the mesh set by ``jax.set_mesh`` and the rules set by
    ``nnx.logical_axis_rules``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    rules = flax_spmd.get_logical_axis_rules()
    if mesh.empty or not rules:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, rules))


def state_shardings(state: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for an ``nnx.State`` (or abstract state) from its logical axes.

    Leaves without ``out_sharding`` metadata (step counters, rng keys) are
    replicated.
    """
    def leaf_sharding(var):
        axes = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
        if not axes:
            return NamedSharding(mesh, P())
        return logical_sharding(mesh, axes, rules)

    return jax.tree.map(leaf_sharding, state, is_leaf=lambda v: isinstance(v, nnx.Variable))
