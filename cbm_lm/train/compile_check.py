"""Compile the real sharded train step from abstract inputs only.

``compile_train_step`` builds the trainer's TrainState shardings
(``train_state_shardings`` under the config's rules) on a mesh of the
devices this process has (simulated CPU devices:
``--xla_force_host_platform_device_count`` set before jax is imported),
describes the state and batch as ``jax.ShapeDtypeStruct`` with their
``NamedSharding`` (nothing is allocated, so 8B-wide layers are fine), and
runs ``make_train_step(...).lower(state, batch).compile()``. Success means
the parameter, optimizer and batch shardings are consistent with the step
(in/out shardings, donation, the activation constraints inside the model).

To fit a small host the check may reduce depth (``layers``), the global
batch and the sequence length; widths (d_model, heads, mlp, vocab, concept
tables) stay as configured. When the config's mesh is planned for more
devices than are present, it is scaled down axis by axis (``scale_mesh``):
tensor keeps gcd(tensor, n), then fsdp, then data, and any devices left go
to fsdp (or data when fsdp is 1); DCN multipliers are folded away.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
from flax import nnx
from jax.sharding import NamedSharding

from cbm_lm.config import MeshConfig, ModelConfig, logical_rules_from_config
from cbm_lm.train.memory_plan import (MemoryPlan, MeshPlan, batch_shards, memory_plan,
                                         plan_mesh)
from cbm_lm.parallel.mesh import make_mesh
from cbm_lm.parallel.sharding import logical_to_spec
from cbm_lm.train.device_batch import abstract_batch, device_fields  # noqa: F401 (re-exported)

# The trainer's device batch (train/device_batch.py): AOT and planning compile its program.
BATCH_FIELDS = device_fields()


def scale_mesh(mesh: MeshPlan, n_devices: int) -> MeshConfig:
    """A single-slice (data, fsdp, tensor) mesh for ``n_devices`` shaped like ``mesh``."""
    data, fsdp, tensor = mesh.shape
    t = math.gcd(tensor, n_devices)
    rest = n_devices // t
    f = math.gcd(fsdp, rest)
    rest //= f
    d = math.gcd(data, rest)
    rest //= d
    if fsdp > 1 or data == 1:
        f *= rest
    else:
        d *= rest
    return MeshConfig(data=d, fsdp=f, tensor=t)


@dataclasses.dataclass
class CompileReport:
    mesh: MeshConfig
    n_devices: int
    n_layers: int
    batch_size: int          # global sequences per step
    seq_len: int             # data tokens per sequence
    grad_accum_steps: int
    lower_seconds: float
    compile_seconds: float
    memory: dict | None      # CompiledMemoryStats fields, bytes per device
    estimate: MemoryPlan     # the analytic plan of the same reduced setup
    notes: list


def reduced_config(config, *, n_devices: int, mesh: MeshConfig, layers: int | None,
                   batch_size: int | None, seq_len: int | None):
    """A copy of ``config`` with the compile-check reductions applied; returns (config, notes)."""
    c = config.copy_and_resolve_references()
    notes = []
    with c.unlocked():
        if layers and layers < c.model.n_layers:
            notes.append(f"depth reduced: model.n_layers {c.model.n_layers} -> {layers}")
            c.model.n_layers = layers
        for k in ("data", "fsdp", "tensor"):
            c.mesh[k] = getattr(mesh, k)
        for k in ("dcn_data", "dcn_fsdp", "dcn_tensor"):
            c.mesh[k] = 1
        rules = logical_rules_from_config(c.rules)
        shards = batch_shards(plan_mesh(mesh, n_devices), rules)
        accum = c.train.grad_accum_steps
        unit = shards * accum
        want = batch_size or min(c.data.batch_size, 8)
        new_batch = max(unit, -(-want // unit) * unit)
        if new_batch != c.data.batch_size:
            notes.append(f"global batch reduced: data.batch_size {c.data.batch_size} -> {new_batch}"
                         f" ({new_batch // unit} sequence(s) per batch shard per micro-step, "
                         f"{accum} micro-step(s))")
            c.data.batch_size = new_batch
        want_len = seq_len or min(c.data.seq_len, 256)
        if want_len != c.data.seq_len:
            notes.append(f"sequence reduced: data.seq_len {c.data.seq_len} -> {want_len}")
            c.data.seq_len = want_len
    return c, notes


def lower_and_compile(cfg, model_cfg: ModelConfig, mesh, rules):
    """Lowers and compiles the real train step (the one launch/train.py runs, with its
    in/out shardings and donated state) against abstract inputs: nothing is allocated.

    -> (compiled, lower_seconds, compile_seconds).
    """
    from cbm_lm.train.optimizer import make_optimizer
    from cbm_lm.train.state import abstract_train_state, train_state_shardings
    from cbm_lm.train.step import make_train_step
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.num_steps)
    from cbm_lm.provenance.build import provenance_config
    # the params hold the learned key head's W when the config trains it (model/lm.py)
    graphdef, abs_state, abs_params = abstract_train_state(model_cfg, tx,
                                                           provenance=provenance_config(cfg))
    shardings = train_state_shardings(abs_state, abs_params, mesh, rules)
    batch_sharding = NamedSharding(mesh, logical_to_spec(("batch",), rules))
    state_in = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abs_state, shardings)
    batch_in = abstract_batch(cfg, batch_sharding)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        step = make_train_step(graphdef, tx, schedule, cfg, model_cfg, shardings, batch_sharding)
        t0 = time.perf_counter()
        lowered = step.lower(state_in, batch_in)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    return compiled, t1 - t0, t2 - t1

def compile_train_step(config, *, n_devices: int | None = None, planned_devices: int | None = None,
                       layers: int | None = 2, batch_size: int | None = None,
                       seq_len: int | None = None) -> CompileReport:
    """Lowers and compiles the real sharded train step for ``config`` on local devices.

    ``planned_devices``: the device count the config's mesh is planned for
    (its mesh is resolved there, then scaled to ``n_devices``); default
    ``n_devices``.
    """
    devices = jax.devices()
    n = n_devices or len(devices)
    if n > len(devices):
        raise ValueError(f"compile check wants {n} devices but jax has {len(devices)}; set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax starts")
    planned = plan_mesh(MeshConfig.from_config(config.mesh), planned_devices or n)
    mesh_cfg = scale_mesh(planned, n)
    notes = []
    if planned.n_devices != n or any(x > 1 for x in planned.dcn):
        notes.append(f"mesh scaled from {planned.describe()} ({planned.n_devices} devices) to "
                     f"data={mesh_cfg.data} x fsdp={mesh_cfg.fsdp} x tensor={mesh_cfg.tensor} "
                     f"({n} devices)")
    cfg, more = reduced_config(config, n_devices=n, mesh=mesh_cfg, layers=layers,
                               batch_size=batch_size, seq_len=seq_len)
    notes += more

    model_cfg = ModelConfig.from_config(cfg.model)
    mesh = make_mesh(MeshConfig.from_config(cfg.mesh), devices[:n])
    compiled, lower_seconds, compile_seconds = lower_and_compile(
        cfg, model_cfg, mesh, logical_rules_from_config(cfg.rules))

    memory = None
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        stats = None
    if stats is not None:
        memory = {k: int(getattr(stats, f"{k}_size_in_bytes")) for k in
                  ("argument", "output", "alias", "temp", "generated_code")
                  if hasattr(stats, f"{k}_size_in_bytes")}
    estimate = memory_plan(cfg, n, devices[0].device_kind)
    return CompileReport(mesh=mesh_cfg, n_devices=n, n_layers=model_cfg.n_layers,
                         batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len,
                         grad_accum_steps=cfg.train.grad_accum_steps,
                         lower_seconds=lower_seconds, compile_seconds=compile_seconds, memory=memory,
                         estimate=estimate, notes=notes)
