"""Prints the static plan of a config: parameter count, memory per device,
FLOPs per token, expected step time, and optionally a compile check.

  python tools/plan.py --config gin_configs/steerling_8b.py [--config.model.n_layers=4]
      [--num_devices 256] [--device_kind "TPU v5p"] [--assumed_mfu 0.4] [--hbm_gib 95]
      [--compile [--compile_devices 8] [--compile_layers 2] [--compile_batch 8]
                 [--compile_seq_len 256]]

Shapes come from nnx.eval_shape: nothing is allocated, so the 8B config
plans on a laptop.

Hardware: a config listed in INTENDED_HARDWARE is planned for its intended
device kind and count (steerling_8b.py: 64 x TPU v5p); any other config for
the devices this process sees. --num_devices / --device_kind override either.
The mesh is config.mesh resolved for that many devices (the dcn_* factors
multiply), the shardings are the trainer's own (train_state_shardings under
config.rules); see cbm_lm/train/memory_plan.py for the memory model.

--compile lowers and compiles the real sharded train step on
--compile_devices simulated CPU devices from abstract inputs
(cbm_lm/train/compile_check.py), with depth, batch and sequence length
reduced (widths kept) and the mesh scaled down to the device count. The
simulated devices must exist before jax starts, so this script sets
XLA_FLAGS / JAX_PLATFORMS itself, before importing anything that imports jax.
"""

import os
import sys


def _flag_value(argv, name):
    """Value of --name=V / --name V in argv (None when absent); bare --name gives ''."""
    for i, arg in enumerate(argv):
        if arg == f"--{name}":
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            return "" if nxt.startswith("--") else nxt
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def _setup_compile_devices(argv) -> None:
    compile_flag = _flag_value(argv, "compile")
    if compile_flag is None or compile_flag.lower() in ("false", "0", "no"):
        return
    n = int(_flag_value(argv, "compile_devices") or 8)
    flags_env = [f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags_env + [f"--xla_force_host_platform_device_count={n}"])
    os.environ["JAX_PLATFORMS"] = "cpu"


_setup_compile_devices(sys.argv)  # before jax is imported (by cbm_lm below)

import pathlib  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cbm_lm.config import ModelConfig, logical_rules_from_config  # noqa: E402
from cbm_lm.train.memory_plan import (batch_problem, fmt_bytes, fmt_flops,  # noqa: E402
                                         memory_plan, smallest_fitting_accum, step_time_plan)
from cbm_lm.parallel.devices import GiB  # noqa: E402
from cbm_lm.train.planning import count_params, params_by_component  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a gin_configs/<scale>.py file.",
                                          lock_config=True)
_NUM_DEVICES = flags.DEFINE_integer(
    "num_devices", None, "Plan for this many devices (default: the config's intended hardware, "
    "else the local device count).")
_DEVICE_KIND = flags.DEFINE_string(
    "device_kind", None, "Device kind for peak FLOP/s and HBM, e.g. 'TPU v5p', 'NVIDIA H100' "
    "(default: the config's intended hardware, else the local device).")
_ASSUMED_MFU = flags.DEFINE_float("assumed_mfu", 0.4, "Model FLOPs utilization for the step time.")
_HBM_GIB = flags.DEFINE_float("hbm_gib", 0.0, "HBM per device in GiB (default: table by device kind).")
_COMPILE = flags.DEFINE_bool("compile", False, "Compile the real sharded train step on simulated "
                             "CPU devices from abstract inputs.")
_COMPILE_DEVICES = flags.DEFINE_integer("compile_devices", 8, "Simulated CPU devices for --compile.")
_COMPILE_LAYERS = flags.DEFINE_integer("compile_layers", 2, "model.n_layers for --compile.")
_COMPILE_BATCH = flags.DEFINE_integer("compile_batch", None, "Global batch (sequences) for "
                                      "--compile (default: min(data.batch_size, 8), rounded up to "
                                      "the batch shards x grad_accum_steps).")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "Also compile the full step for this TPU topology (e.g. v5p:4x4x4) with "
    "XLA's TPU compiler and print its per-device memory beside the estimate: the compiler's "
    "answer is authoritative (tools/aot_compile.py; needs the .[tpu] extra).")
_COMPILE_SEQ_LEN = flags.DEFINE_integer("compile_seq_len", None, "data.seq_len for --compile "
                                        "(default: min(data.seq_len, 256)).")

# Config file name -> (device kind, device count) it is meant to train on (its docstring).
INTENDED_HARDWARE = {
    "steerling_8b.py": ("TPU v5p", 64),    # v5p-128 (v5p:4x4x4): 64 chips, fsdp=16 x tensor=4
    "steerling_8b_v5e.py": ("TPU v5 lite", 256),   # v5e:16x16: 256 chips, fsdp=64 x tensor=4
    "1b.py": ("NVIDIA H100", 8),           # one 8 x H100 host
    "small.py": ("NVIDIA H100", 1),        # one GPU
}

W = 60  # label column width


def row(label: str, value: str, note: str = "") -> None:
    print(f"  {label:<{W}} {value:>14}" + (f"  {note}" if note else ""))


def _rules_text(rules) -> str:
    parts = []
    for name, axes in rules:
        if axes is None:
            continue
        parts.append(f"{name}->{axes if isinstance(axes, str) else '(' + ','.join(axes) + ')'}")
    return "  ".join(parts) + "  (others replicated)"


def _hardware(config_path: str):
    intended = INTENDED_HARDWARE.get(pathlib.Path(config_path).name)
    kind = _DEVICE_KIND.value or (intended[0] if intended else jax.devices()[0].device_kind)
    n = _NUM_DEVICES.value or (intended[1] if intended else jax.device_count())
    if _DEVICE_KIND.value or _NUM_DEVICES.value:
        source = "from --num_devices/--device_kind"
    elif intended:
        source = f"intended hardware of {pathlib.Path(config_path).name}"
    else:
        source = "the local devices"
    return kind, n, source


def print_memory(config, n_devices: int, kind: str, hbm: int | None) -> None:
    plan = memory_plan(config, n_devices, kind, hbm_bytes=hbm)
    st, acts = plan.state, plan.activations
    model = config.model
    n = plan.mesh.n_devices
    print(f"mesh: {plan.mesh.describe()}  ({n} device{'s' if n > 1 else ''})")
    print(f"rules: {_rules_text(logical_rules_from_config(config.rules))}")
    if st.problems:
        print("SHARDING ERROR: these params do not divide evenly over their mesh axes; jax.jit "
              "needs evenly divided in/out shardings, so the train step will not compile:")
        for p in st.problems:
            print(f"    {p}")
        print("  (sizes below round shards up)")
    bad_batch = batch_problem(config, plan.mesh, logical_rules_from_config(config.rules))
    if bad_batch:
        print(f"BATCH ERROR: {bad_batch}; the train step will not run (sizes below round up)")
    print()
    print("memory per device (bytes per device; train state from the trainer's shardings):")
    row(f"params ({model.param_dtype} master)", fmt_bytes(st.params),
        f"global {fmt_bytes(st.params_global)}")
    row("optimizer AdamW mu+nu (fp32)", fmt_bytes(st.optimizer),
        f"global {fmt_bytes(st.optimizer_global)}; {st.optimizer / max(st.params, 1):.2f} x params")
    row("gradients (fp32, sharded like params)", fmt_bytes(plan.gradients))
    row("optimizer update temporaries (~1 x params)", fmt_bytes(plan.update_temporaries))
    row(f"gradient accumulator (grad_accum_steps={config.train.grad_accum_steps})",
        fmt_bytes(plan.grad_accumulator))
    row("FSDP-gathered weights: 1 block + LM head, x2 w/ grads", fmt_bytes(plan.gathered_weights))
    two = " two-stream" if acts.model_len != config.data.seq_len else ""
    print(f"  activations, remat={acts.remat}, {model.dtype}: micro-batch {acts.micro_batch} seq x "
          f"{acts.model_len} tokens per device (seq_len {config.data.seq_len}{two}, "
          f"grad_accum_steps {config.train.grad_accum_steps}):")
    for label, b in acts.terms:
        row("  " + label, fmt_bytes(b))
    row("activations total (estimate)", fmt_bytes(acts.total))
    row("TOTAL per device (estimate)", fmt_bytes(plan.total))
    if plan.hbm is None:
        print(f"  analytic estimate: n/a (no HBM size known for device kind {kind!r}; "
              f"pass --device_kind or --hbm_gib)")
    else:
        row(f"HBM per device ({kind})", fmt_bytes(plan.hbm))
        pct = 100 * plan.total / plan.hbm
        if plan.fits:
            print(f"  analytic estimate (not a verdict): FITS  ({fmt_bytes(plan.total)} "
                  f"estimated per device = {pct:.0f}% of {fmt_bytes(plan.hbm)} HBM per {kind})")
        else:
            print(f"  analytic estimate (not a verdict): DOES NOT FIT  ({fmt_bytes(plan.total)} "
                  f"estimated per device = {pct:.0f}% of {fmt_bytes(plan.hbm)} HBM per {kind})")
            accum = smallest_fitting_accum(config, n_devices, kind, hbm_bytes=hbm, state=st)
            if accum:
                c = config.copy_and_resolve_references()
                with c.unlocked():
                    c.train.grad_accum_steps = accum
                fit = memory_plan(c, n_devices, kind, hbm_bytes=hbm, state=st)
                print(f"  smallest fitting train.grad_accum_steps: {accum}  "
                      f"(--config.train.grad_accum_steps={accum}: {fmt_bytes(fit.total)} per device)")
            else:
                print("  no train.grad_accum_steps dividing the per-shard batch fits")
    print("  memory verdict: XLA's compiled bytes decide (--topology, or tools/aot_compile.py); "
          "this estimate missed XLA by up to 52% at 8B")
    by_policy = []
    for policy in ("none", "block", "full"):
        p = memory_plan(config, n_devices, kind, hbm_bytes=hbm, remat=policy, state=st)
        by_policy.append(f"{policy} {fmt_bytes(p.activations.total)}")
    print(f"  activations per device by model.remat: {', '.join(by_policy)}")


def print_compute(config, n_devices: int, kind: str) -> None:
    t = step_time_plan(config, n_devices, kind, _ASSUMED_MFU.value)
    print()
    print("compute:")
    two = t.model_len != config.data.seq_len
    row(f"forward FLOPs per model token (T={t.model_len})", fmt_flops(t.forward_flops_per_token))
    row("model FLOPs per data token", fmt_flops(t.model_flops_per_data_token),
        "3 x forward (planning.model_train_flops_per_token)")
    row(f"hardware FLOPs per data token (remat={config.model.remat})",
        fmt_flops(t.hardware_flops_per_data_token), "fwd x4 with remat, x3 without")
    row("model tokens per step (global)", f"{t.tokens_per_step:,d}",
        f"{config.data.batch_size} seq x {t.model_len}" + (" (two-stream: 2 x seq_len)" if two else ""))
    row("data tokens per step (global)", f"{t.data_tokens_per_step:,d}")
    row("model FLOPs per step (global)", fmt_flops(t.flops_per_step))
    peak_src = "config.hardware" if config.hardware.peak_flops_per_device else kind
    row(f"peak FLOP/s per device ({peak_src})", fmt_flops(t.peak_flops_per_device, "/s"))
    row("assumed MFU", f"{t.assumed_mfu:.2f}")
    row(f"expected step time (MFU-limited, {n_devices} x {kind})", f"{t.step_seconds:,.3f} s")
    row("expected data tokens per second (global)", f"{t.data_tokens_per_step / t.step_seconds:,.0f}")


def print_compile(config, planned_devices: int) -> None:
    from cbm_lm.train.compile_check import compile_train_step
    n = _COMPILE_DEVICES.value
    print()
    print(f"compile check: real sharded train step on {n} simulated CPU devices, abstract inputs "
          f"only (ShapeDtypeStruct + NamedSharding; nothing allocated):")
    r = compile_train_step(config, n_devices=n, planned_devices=planned_devices,
                           layers=_COMPILE_LAYERS.value, batch_size=_COMPILE_BATCH.value,
                           seq_len=_COMPILE_SEQ_LEN.value)
    m = r.mesh
    print(f"  mesh: data={m.data} x fsdp={m.fsdp} x tensor={m.tensor}; n_layers {r.n_layers}; "
          f"batch {r.batch_size} x seq_len {r.seq_len}; grad_accum_steps {r.grad_accum_steps}; "
          f"widths as configured")
    for note in r.notes:
        print(f"  REDUCED: {note}")
    row("lower time", f"{r.lower_seconds:.1f} s")
    row("compile time", f"{r.compile_seconds:.1f} s")
    if r.memory:
        for k in ("argument", "output", "alias", "temp"):
            if k in r.memory:
                row(f"compiled {k} bytes per device", fmt_bytes(r.memory[k]))
        row("compiled argument + temp per device", fmt_bytes(r.memory["argument"] + r.memory["temp"]))
    else:
        print("  compiled memory_analysis(): not available on this backend")
    e = r.estimate
    row(f"analytic estimate of this setup per device (remat={e.activations.remat})",
        fmt_bytes(e.total))
    print("  (XLA:CPU does not schedule rematerialization to save memory, so on CPU the "
          "compiled temp bytes track remat=none)")
    print("  compile: OK (state, optimizer and batch shardings are consistent with the step)")


def print_topology(config, topology: str, hbm: int | None = None) -> None:
    from cbm_lm.train.aot import aot_compile, with_mesh
    try:
        r = aot_compile(config, topology)
    except ValueError as e:     # a bad --topology, or a ConfigError for it (ValueError's kin)
        sys.exit(f"plan: error: {e}")
    est = memory_plan(with_mesh(config, r.mesh), r.n_devices, r.device_kind).total
    print()
    print(f"XLA's TPU compiler, {topology} ({r.n_devices} x {r.device_kind}):")
    row("compiled total per device (argument+output-alias+temp)", fmt_bytes(r.total_bytes))
    row("analytic estimate above, same mesh", fmt_bytes(est),
        f"{100 * (est / r.total_bytes - 1):+.0f}% vs XLA")
    print(f"  memory verdict (XLA's TPU compiler): {r.verdict(hbm)}")


def main(argv):
    if len(argv) > 1:   # a stray word, e.g. the value of "--config.x False" (write x=False)
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags take --name=value")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config gin_configs/tiny.py")
    config = _CONFIG.value
    path = flags.FLAGS["config"].config_filename
    cfg = ModelConfig.from_config(config.model)
    total = count_params(cfg)
    print(f"config: {path}")
    print(f"params: {total}")
    for group, n in sorted(params_by_component(cfg).items()):
        print(f"  {group:<13} {n:>15,d}  ({100 * n / total:5.1f}%)")
    print()
    kind, n_devices, source = _hardware(path)
    hbm = int(_HBM_GIB.value * GiB) if _HBM_GIB.value else None
    print(f"hardware: {n_devices} x {kind}  ({source})")
    print_memory(config, n_devices, kind, hbm)
    print_compute(config, n_devices, kind)
    if _TOPOLOGY.value:
        print_topology(config, _TOPOLOGY.value, hbm)
    if _COMPILE.value:
        print_compile(config, n_devices)


if __name__ == "__main__":
    app.run(main)
