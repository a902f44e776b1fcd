"""Compiles the real sharded train step for a TPU topology on this (CPU) host.

  python tools/aot_compile.py --config gin_configs/steerling_8b.py --topology v5p:4x4x4
      [--config.x=y] [--json out.json]

Needs the TPU compiler: pip install '.[tpu]' (libtpu from PyPI). Nothing is
allocated; prints XLA's per-device memory, whether it fits the chip's HBM,
the compiled FLOPs and the MFU they allow. See cbm_lm/train/aot.py.
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the topology is described, never attached

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cbm_lm.atomic_io import write_text_atomic  # noqa: E402
from cbm_lm.train.aot import aot_compile  # noqa: E402
from cbm_lm.train.memory_plan import fmt_bytes, fmt_flops  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "gin_configs/<scale>.py",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5p:4x4x4, v5e:16x16.",
                                required=True)
_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of the topology (multi-slice, DCN).")
_JSON = flags.DEFINE_string("json", None, "Also write the report as JSON here.")


def main(argv):
    if len(argv) > 1:   # a stray word, e.g. the value of "--config.x False" (write x=False)
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags take --name=value")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config gin_configs/steerling_8b.py")
    try:
        r = aot_compile(_CONFIG.value, _TOPOLOGY.value, num_slices=_SLICES.value)
    except ValueError as e:     # a bad --topology, or a ConfigError for it (ValueError's kin)
        sys.exit(f"aot_compile: error: {e}")
    m = r.mesh
    print(f"topology {r.topology}: {r.n_devices} x {r.device_kind}; mesh data={m.data} x "
          f"fsdp={m.fsdp} x tensor={m.tensor}")
    for note in r.notes:
        print(f"  note: {note}")
    print("per-device memory (XLA memory_analysis):")
    for k in ("argument", "output", "alias", "temp", "generated_code"):
        print(f"  {k:<16} {fmt_bytes(r.memory[k]):>12}")
    print(f"  {'total':<16} {fmt_bytes(r.total_bytes):>12}  (argument + output - alias + temp + code)")
    if r.flops_per_device:
        print(f"compiled FLOPs per device per step: {fmt_flops(r.flops_per_device)}; model FLOPs "
              f"{fmt_flops(r.model_flops_per_device)}; at peak {fmt_flops(r.peak_flops, '/s')}: "
              f"step >= {r.step_seconds_at_peak:.2f} s, MFU <= {r.mfu_bound:.2f}")
    else:
        print("compiled FLOPs: cost_analysis() reported none")
    print(f"compile time: {r.lower_seconds:.1f} s lower + {r.compile_seconds:.1f} s compile")
    print(f"memory verdict: {r.verdict()}")
    if _JSON.value:
        write_text_atomic(_JSON.value, json.dumps(r.to_json(), indent=1))


if __name__ == "__main__":
    app.run(main)
