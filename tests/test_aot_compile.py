"""cbm_lm/train/aot.py and tools/aot_compile.py: the real train step compiled by
XLA's TPU compiler for a named topology on this CPU host (libtpu from PyPI,
the '.[tpu]' extra), and the CPU guard that keeps libtpu out of CPU runs."""

import math
import os
import pathlib
import subprocess
import sys

import pytest

from cbm_lm.config import ConfigError, MeshConfig
from cbm_lm.default_config import load_config_file
from cbm_lm.train.aot import fit_mesh

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _libtpu() -> bool:
    import importlib.util
    return importlib.util.find_spec("libtpu") is not None


needs_libtpu = pytest.mark.skipif(not _libtpu(), reason="libtpu not installed (pip install '.[tpu]')")


def test_fit_mesh_fills_and_scales_by_hand():
    # -1 fills: 64 devices, tensor 4 -> fsdp 16.
    assert fit_mesh(MeshConfig(data=1, fsdp=-1, tensor=4), 64) == (
        MeshConfig(data=1, fsdp=16, tensor=4), [])
    # A 256-device plan (fsdp 64 x tensor 4) on 64 devices keeps tensor 4 and gives fsdp 16.
    mesh, notes = fit_mesh(MeshConfig(data=1, fsdp=64, tensor=4), 64)
    assert mesh == MeshConfig(data=1, fsdp=16, tensor=4) and "256 devices" in notes[0]
    with pytest.raises(ConfigError):
        fit_mesh(MeshConfig(data=-1, fsdp=3, tensor=1), 64)   # 64 does not divide by 3


@pytest.mark.slow
@needs_libtpu
def test_tiny_step_compiles_for_a_tpu_topology():
    from cbm_lm.config import ModelConfig
    from cbm_lm.parallel.devices import GiB
    from cbm_lm.train.planning import count_params, forward_flops_per_token
    from cbm_lm.train.aot import aot_compile

    c = load_config_file(ROOT / "gin_configs" / "tiny.py")
    c.model.n_layers, c.data.seq_len, c.data.batch_size = 1, 64, 4
    c.mesh.data, c.mesh.fsdp = 1, -1
    r = aot_compile(c, "v5e:2x2")
    assert r.n_devices == 4 and r.device_kind.startswith("TPU v5")
    assert r.mesh == MeshConfig(data=1, fsdp=4, tensor=1)
    # Arguments hold this device's shard of params + AdamW mu, nu (fp32) + the batch:
    # 3 x 4 bytes x params / 4 devices when every param shards over fsdp (norm
    # scales replicate, so a little more).
    n_params = count_params(ModelConfig.from_config(c.model))
    state = 3 * 4 * n_params / 4
    assert state <= r.memory["argument"] <= 1.2 * state + 2 ** 20
    assert r.memory["alias"] > 0.9 * state              # the state is donated
    assert r.fits and r.total_bytes < 16 * GiB
    # The compiled FLOPs cover at least the model FLOPs (3 x forward; the concept
    # heads' top-k scoring and the loss add a little).
    fwd = forward_flops_per_token(ModelConfig.from_config(c.model), 64) * 4 * 64 / 4
    assert 0.9 * 3 * fwd < r.flops_per_device < 3 * 3 * fwd
    assert math.isclose(r.mfu_bound, r.model_flops_per_device / r.flops_per_device)


def test_cbm_lm_keeps_jax_on_cpu_without_accelerator():
    """With libtpu installed and JAX_PLATFORMS unset, importing cbm_lm pins jax to CPU
    (no TPU runtime start, no libtpu host-discovery errors)."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", "import cbm_lm, jax; print(jax.default_backend())"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("cpu", "gpu", "tpu")
    from cbm_lm.backend import _gpu_attached, _tpu_attached
    if _libtpu() and not (_tpu_attached() or _gpu_attached()):
        assert out.stdout.strip() == "cpu"
        assert "TPU_WORKER_HOSTNAMES" not in out.stderr


@needs_libtpu
def test_mesh_follows_the_physical_torus():
    """make_mesh lays one slice's devices on the chips' torus: steerling_8b's fsdp 16 x
    tensor 4 on v5p:4x4x4 puts every tensor neighbour one ICI link away (physical coords,
    the independent truth) and fsdp neighbours closer than jax.devices() order does."""
    import numpy as np

    from cbm_lm.config import MeshConfig
    from cbm_lm.parallel.mesh import make_mesh
    from cbm_lm.train.aot import topology_devices

    devices = topology_devices("v5p:4x4x4")
    mesh = make_mesh(MeshConfig(data=1, fsdp=16, tensor=4), devices)

    def hops(grid):   # mean links between consecutive devices along the last axis
        return np.mean([sum(abs(a - b) for a, b in zip(r[i].coords, r[i + 1].coords))
                        for r in grid.reshape(-1, grid.shape[-1]) for i in range(len(r) - 1)])

    assert hops(mesh.devices) == 1.0                                   # tensor axis
    plain = np.asarray(devices).reshape(1, 16, 4)
    assert hops(np.moveaxis(mesh.devices, 1, -1)) < hops(np.moveaxis(plain, 1, -1))   # fsdp
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
