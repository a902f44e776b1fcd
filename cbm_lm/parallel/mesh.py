"""Device mesh construction from config.

Mesh axes are (data, fsdp, tensor). A config gives their sizes within a slice
(ICI) and across slices (DCN); the mesh axis size is the product. One axis may
be -1 and is filled with the devices left over.

We build meshes with ``AxisType.Auto``: the jitted train step declares its
in/out shardings explicitly and XLA's SPMD partitioner propagates the rest,
with ``constrain`` (sharding.py) pinning key activations.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from cbm_lm.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_axis_sizes(sizes: Sequence[int], n: int, what: str) -> tuple[int, ...]:
    """Fills the single -1 entry of ``sizes`` so that their product is ``n``."""
    sizes = list(sizes)
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ConfigError(f"{what}: at most one axis may be -1, got {sizes}")
    for s in sizes:
        if s != -1 and s < 1:
            raise ConfigError(f"{what}: axis sizes must be >= 1 or -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if n % known:
            raise ConfigError(f"{what}: {n} devices do not divide by the fixed axes {sizes}")
        sizes[fill[0]] = n // known
    if math.prod(sizes) != n:
        raise ConfigError(
            f"{what}: axis sizes {dict(zip(MESH_AXES, sizes))} use {math.prod(sizes)} devices, "
            f"but {n} are available")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh described by ``cfg``.

    With several slices (DCN sizes > 1) devices are grouped by slice_index so
    that only the dcn_* factors of each axis cross slices.
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn = (cfg.dcn_data, cfg.dcn_fsdp, cfg.dcn_tensor)
    n_slices = math.prod(dcn)
    if len(devices) % n_slices:
        raise ConfigError(f"mesh.dcn_*: {len(devices)} devices do not split into {n_slices} slices")
    ici = resolve_axis_sizes((cfg.data, cfg.fsdp, cfg.tensor), len(devices) // n_slices, "mesh")
    shape = tuple(i * d for i, d in zip(ici, dcn))
    if n_slices == 1:
        mesh_devices = _ici_layout(shape, devices)
    else:
        from jax.experimental import mesh_utils  # only needed across slices
        mesh_devices = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
    return Mesh(mesh_devices, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _ici_layout(shape: tuple[int, ...], devices: list) -> np.ndarray:
    """Devices of one slice arranged on ``shape`` along the chips' physical torus
    (``mesh_utils.create_device_mesh``), so neighbours on the inner mesh axes (tensor, then
    fsdp) are neighbours on the ICI links: steerling_8b's fsdp 16 x tensor 4 on v5p:4x4x4
    puts tensor neighbours 1.0 link apart and fsdp neighbours 1.6 (1.33 and 3.1 in
    ``jax.devices()`` order). A shape the torus cannot hold whole may split physical axes;
    devices without a physical layout (CPU, a subset) keep their order."""
    from jax.experimental import mesh_utils
    for split in (False, True):
        try:
            return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=split)
        except (ValueError, NotImplementedError, AssertionError, KeyError):
            continue
    return np.asarray(devices).reshape(shape)


def single_device_mesh() -> Mesh:
    """A 1x1x1 mesh on the first device: the reference for sharded-vs-single tests."""
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
