"""Per-device shard sizes of arrays on a (possibly abstract) mesh.

A dimension sharded over mesh axes (a0, a1, ...) is split into
prod(size(a_i)) pieces; a shard holds ceil(dim / pieces) of it (XLA pads
uneven splits, jax.jit refuses them for in/out shardings, so
``indivisible_dims`` reports them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from cbm_lm.config import ConfigError, MeshConfig
from cbm_lm.parallel.mesh import MESH_AXES, resolve_axis_sizes

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ----------------------------------------------------------------------------- mesh
@dataclasses.dataclass(frozen=True)
class MeshPlan:
    """Mesh axis sizes for ``n_devices`` (ICI x DCN, as make_mesh builds them)."""
    ici: tuple[int, int, int]
    dcn: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(i * d for i, d in zip(self.ici, self.dcn))

    @property
    def sizes(self) -> dict[str, int]:
        return dict(zip(MESH_AXES, self.shape))

    @property
    def n_devices(self) -> int:
        return math.prod(self.shape)

    def abstract_mesh(self) -> AbstractMesh:
        return AbstractMesh(self.shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))

    def describe(self) -> str:
        s = " x ".join(f"{a}={n}" for a, n in self.sizes.items())
        if any(d > 1 for d in self.dcn):
            s += f"  (ICI {'x'.join(map(str, self.ici))}, DCN {'x'.join(map(str, self.dcn))})"
        return s


def plan_mesh(mesh_cfg: MeshConfig, n_devices: int) -> MeshPlan:
    dcn = (mesh_cfg.dcn_data, mesh_cfg.dcn_fsdp, mesh_cfg.dcn_tensor)
    n_slices = math.prod(dcn)
    if n_devices % n_slices:
        raise ConfigError(f"mesh.dcn_*: {n_devices} devices do not split into {n_slices} slices")
    ici = resolve_axis_sizes((mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor),
                             n_devices // n_slices, "mesh")
    return MeshPlan(ici=ici, dcn=dcn)


# ----------------------------------------------------------------------------- shards
def spec_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def shard_shape(shape: Sequence[int], spec: P, sizes: dict[str, int]) -> tuple[int, ...]:
    """Per-device shard shape of a global ``shape`` under ``spec``: ceil(dim / shards)."""
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    return tuple(-(-dim // math.prod(sizes[a] for a in spec_axes(e)))
                 for dim, e in zip(shape, entries))


def shard_bytes(shape: Sequence[int], dtype, spec: P, sizes: dict[str, int]) -> int:
    return math.prod(shard_shape(shape, spec, sizes)) * jnp.dtype(dtype).itemsize


def indivisible_dims(shape: Sequence[int], spec: P, sizes: dict[str, int]) -> list[str]:
    """'dim i (n) over axes=s' for each dim of ``shape`` that ``spec`` does not split evenly."""
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    out = []
    for i, (dim, e) in enumerate(zip(shape, entries)):
        axes = spec_axes(e)
        s = math.prod(sizes[a] for a in axes)
        if dim % s:
            out.append(f"dim {i} ({dim}) over {'x'.join(axes)}={s}")
    return out


def tree_shard_bytes(abstract_tree, sharding_tree, sizes: dict[str, int]) -> int:
    """Sum of per-device shard bytes of ShapeDtypeStructs under NamedShardings."""
    leaves = jax.tree.leaves(abstract_tree)
    shardings = jax.tree.leaves(sharding_tree, is_leaf=lambda x: hasattr(x, "spec"))
    assert len(leaves) == len(shardings), (len(leaves), len(shardings))
    return sum(shard_bytes(x.shape, x.dtype, s.spec, sizes) for x, s in zip(leaves, shardings))
