"""Logical axis names -> mesh shardings, through flax's logical-sharding helpers.

Every parameter carries logical axis names (``out_sharding`` metadata on its
``nnx.Param``); ``rules`` map them to mesh axes. Flax resolves them:
``flax.linen.logical_to_mesh_axes`` for a spec (rules in priority order; a
rule whose mesh axes are already taken in that spec is skipped, so a mesh axis
appears once), ``nnx.get_named_sharding`` for a State (the same lookup flax
uses when it shards a parameter at creation), and
``flax.linen.with_logical_constraint`` for activations.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from flax import linen as nn
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, Any]]


def logical_to_spec(axes: Sequence[str | None], rules: Rules) -> P:
    """Maps logical axis names to a PartitionSpec under ``rules``."""
    return nn.logical_to_mesh_axes(tuple(axes), tuple(rules))


def logical_sharding(mesh: Mesh, axes: Sequence[str | None], rules: Rules) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, rules))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op outside a mesh.

    Uses the mesh set by ``jax.set_mesh`` and the rules set by
    ``nnx.logical_axis_rules``.
    """
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return nn.with_logical_constraint(x, P(*axes))


def state_shardings(state: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for an ``nnx.State`` (or abstract state) from its logical axes.

    Leaves without ``out_sharding`` metadata (step counters, rng keys) are
    replicated.
    """
    with nnx.logical_axis_rules(tuple(rules)):
        return nnx.get_named_sharding(state, mesh)
