"""Ahead-of-time compile of the real train step for a TPU topology, on any host.

``aot_compile(config, "v5p:4x4x4")`` asks libtpu (``pip install '.[tpu]'``)
for the topology's devices (``jax.experimental.topologies``; no TPU needed,
works under JAX_PLATFORMS=cpu), builds the trainer's mesh on them, describes
the TrainState and batch as ``jax.ShapeDtypeStruct`` with their
``NamedSharding`` (nothing is allocated), and lowers + compiles
``make_train_step`` (the function launch/train.py runs: same in/out
shardings, same donation) with XLA's TPU compiler. From the executable:

  per-device bytes  argument + output - alias + temp  (``memory_analysis``)
  fits              total <= HBM of the chip          (parallel/devices.py HBM_BYTES)
  FLOPs             per device per step               (``cost_analysis`` x grad_accum_steps:
                    XLA counts a loop body once, and the micro-batch scan is the
                    step's loop; the concept heads' block loop stays counted once,
                    which at 8B leaves out about 1.5% of the forward FLOPs; with
                    model.scan_layers the layer scan is counted once too, so the
                    other L-1 layers are added as planning's per-layer train FLOPs)
  MFU bound         model FLOPs / compiled FLOPs, i.e. the MFU of a step that
                    ran the compiled FLOPs at the chip's peak (recompute,
                    masked attention work and padding lower it)

The mesh is the config's, fitted to the topology's device count: one -1 axis
fills; a mesh planned for another count is scaled (compile_check.scale_mesh).
This is how MaxText's train_compile.py checks pod configs before a pod runs them.
"""

from __future__ import annotations

import dataclasses
import math
import os

from cbm_lm.config import ConfigError, MeshConfig, ModelConfig, logical_rules_from_config
from cbm_lm.parallel.mesh import make_mesh
from cbm_lm.parallel.mesh_plan import MeshPlan
from cbm_lm.parallel.devices import hbm_bytes_per_device, peak_flops_per_device
from cbm_lm.train.compile_check import lower_and_compile, scale_mesh
from cbm_lm.train.memory_plan import batch_problem, fmt_bytes, model_length, plan_mesh
from cbm_lm.train.planning import model_train_flops_per_token, train_flops_per_token


def topology_devices(topology: str, num_slices: int = 1) -> list:
    """The devices of a named TPU topology, e.g. 'v5p:4x4x4' (64 chips), 'v5e:16x16'."""
    from jax.experimental import topologies
    # Only describing devices: several compiles may share a host (libtpu otherwise
    # takes /tmp/libtpu_lockfile for the whole process lifetime).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                            num_slices=num_slices)
    except Exception as e:  # noqa: BLE001 - libtpu missing or an unknown name
        raise ValueError(f"--topology {topology!r}: libtpu could not describe it ({e}). "
                         f"Install the TPU compiler with pip install '.[tpu]' and name a "
                         f"topology as <chip>:<shape>, e.g. v5p:4x4x4 or v5e:16x16") from e
    return list(desc.devices)


def fit_mesh(mesh_cfg: MeshConfig, n_devices: int) -> tuple[MeshConfig, list[str]]:
    """``mesh_cfg`` resolved for ``n_devices`` (-1 fills), else scaled to it; (mesh, notes)."""
    try:
        plan = plan_mesh(mesh_cfg, n_devices)
        d, f, t = plan.shape
        if math.prod(plan.dcn) == 1:
            return MeshConfig(data=d, fsdp=f, tensor=t), []
    except ConfigError:
        sizes = (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)
        if -1 in sizes:
            raise
        plan = MeshPlan(ici=sizes, dcn=(mesh_cfg.dcn_data, mesh_cfg.dcn_fsdp,
                                        mesh_cfg.dcn_tensor))
    fitted = scale_mesh(plan, n_devices)
    note = (f"mesh fitted from {plan.describe()} ({plan.n_devices} devices) to data={fitted.data}"
            f" x fsdp={fitted.fsdp} x tensor={fitted.tensor} ({n_devices} devices)")
    return fitted, [note]


@dataclasses.dataclass
class AotReport:
    topology: str
    device_kind: str
    n_devices: int
    mesh: MeshConfig
    notes: list
    lower_seconds: float
    compile_seconds: float
    memory: dict              # bytes per device: argument, output, alias, temp, generated_code
    hbm_bytes: int | None
    flops_per_device: float | None      # compiled, per step (cost_analysis)
    model_flops_per_device: float       # planning.model_train_flops_per_token, per step
    peak_flops: float

    @property
    def total_bytes(self) -> int:
        m = self.memory
        return m["argument"] + m["output"] - m["alias"] + m["temp"] + m.get("generated_code", 0)

    @property
    def fits(self) -> bool | None:
        return None if self.hbm_bytes is None else self.total_bytes <= self.hbm_bytes

    @property
    def step_seconds_at_peak(self) -> float | None:
        return self.flops_per_device / self.peak_flops if self.flops_per_device else None

    @property
    def mfu_bound(self) -> float | None:
        return self.model_flops_per_device / self.flops_per_device if self.flops_per_device else None

    def verdict(self, hbm_bytes: int | None = None) -> str:
        """The memory verdict line against ``hbm_bytes`` (default: the chip's table HBM);
        says so, with no verdict, when neither is known."""
        hbm = hbm_bytes if hbm_bytes is not None else self.hbm_bytes
        if hbm is None:
            return (f"HBM of {self.device_kind!r} unknown: no verdict (pass the HBM per device, "
                    f"e.g. --hbm_gib, where the tool has it)")
        pct = 100 * self.total_bytes / hbm
        word = "FITS" if self.total_bytes <= hbm else "DOES NOT FIT"
        src = "" if hbm_bytes is None else " (given)"
        return (f"{word}: {fmt_bytes(self.total_bytes)} per device = {pct:.0f}% of "
                f"{fmt_bytes(hbm)} HBM{src} per {self.device_kind} chip")

    def to_json(self) -> dict:
        return {"topology": self.topology, "device_kind": self.device_kind,
                "n_devices": self.n_devices, "mesh": dataclasses.asdict(self.mesh),
                "bytes_per_device": dict(self.memory, total=self.total_bytes),
                "hbm_bytes": self.hbm_bytes, "fits": self.fits,
                "compile_seconds": round(self.lower_seconds + self.compile_seconds, 1),
                "flops_per_device": self.flops_per_device,
                "model_flops_per_device": self.model_flops_per_device,
                "mfu_at_peak": self.mfu_bound, "notes": self.notes}


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def with_mesh(config, mesh_cfg: MeshConfig):
    """A resolved copy of ``config`` whose mesh section is ``mesh_cfg`` (every axis, the
    DCN ones included): the config aot_compile compiles for the fitted mesh."""
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
        for k, v in dataclasses.asdict(mesh_cfg).items():
            cfg.mesh[k] = v
    return cfg


def aot_compile(config, topology: str, *, num_slices: int = 1,
                devices: list | None = None) -> AotReport:
    """Compiles ``config``'s train step for ``topology``; see the module docstring."""
    devices = devices if devices is not None else topology_devices(topology, num_slices)
    n = len(devices)
    mesh_cfg, notes = fit_mesh(MeshConfig.from_config(config.mesh), n)
    cfg = with_mesh(config, mesh_cfg)
    rules = logical_rules_from_config(cfg.rules)
    bad = batch_problem(cfg, plan_mesh(mesh_cfg, n), rules)
    if bad:
        raise ConfigError(f"{bad} on {topology} ({n} devices); change data.batch_size, "
                          f"train.grad_accum_steps or the mesh")
    model_cfg = ModelConfig.from_config(cfg.model)
    mesh = make_mesh(mesh_cfg, devices)
    compiled, lower_seconds, compile_seconds = lower_and_compile(cfg, model_cfg, mesh, rules)

    stats = compiled.memory_analysis()
    memory = {k: int(getattr(stats, f"{k}_size_in_bytes", 0))
              for k in ("argument", "output", "alias", "temp", "generated_code")}
    kind = devices[0].device_kind
    flops = _flops(compiled)
    t_model = model_length(cfg)
    streams = t_model // cfg.data.seq_len
    tokens = cfg.data.batch_size * cfg.data.seq_len
    if flops:
        flops *= cfg.train.grad_accum_steps
        if model_cfg.scan_layers and model_cfg.n_layers > 1:   # the scan body counted once
            per_layer = train_flops_per_token(model_cfg, t_model, layer_only=True)
            flops += (model_cfg.n_layers - 1) * per_layer * streams * tokens / n
            notes = notes + [f"FLOPs: XLA counted the scanned block once; the other "
                             f"{model_cfg.n_layers - 1} layers added analytically"]
    # Model FLOPs: 3 x forward (forward + backward), no recompute counted; two-stream rows
    # unembed one stream and attend a band, not [2T,2T] (planning.step_forward_flops_per_token)
    model_flops = (model_train_flops_per_token(model_cfg, cfg.data.seq_len,
                                               two_stream=streams == 2) * tokens / n)
    return AotReport(topology=topology, device_kind=kind, n_devices=n, mesh=mesh_cfg,
                     notes=notes, lower_seconds=lower_seconds, compile_seconds=compile_seconds, memory=memory,
                     hbm_bytes=hbm_bytes_per_device(kind), flops_per_device=flops,
                     model_flops_per_device=model_flops,
                     peak_flops=peak_flops_per_device(kind, cfg.hardware.peak_flops_per_device))
