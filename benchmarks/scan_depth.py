"""Compile time and program size of the train step against depth: scanned vs unrolled blocks.

A config (run_all.py: gin_configs/tiny.py) at n_layers 2 and 8, the real
train step (train/step.py) lowered and compiled from abstract inputs on one
CPU device, with model.scan_layers True (one lax.scan over stacked blocks) and
False (the same blocks unrolled):

  hlo_chars   length of the optimized HLO text of the compiled step
  compile_s   lower + compile seconds (noisy on a shared machine; compare ratios)
  growth      value at 8 layers / value at 2 layers
"""

from __future__ import annotations

import jax

from cbm_lm.config import MeshConfig, ModelConfig, logical_rules_from_config
from cbm_lm.parallel.mesh import make_mesh
from cbm_lm.train.compile_check import lower_and_compile


def _compile(config, n_layers: int, scan: bool) -> dict:
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.model.n_layers, c.model.scan_layers = n_layers, scan
    model_cfg = ModelConfig.from_config(c.model)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    compiled, lower_s, compile_s = lower_and_compile(c, model_cfg, mesh,
                                                     logical_rules_from_config(c.rules))
    return {"hlo_chars": len(compiled.as_text()), "compile_s": lower_s + compile_s}


def measure_scan_depth(config) -> dict:
    out = {}
    for scan in (True, False):
        two, eight = _compile(config, 2, scan), _compile(config, 8, scan)
        out["scanned" if scan else "unrolled"] = {
            "layers_2": two, "layers_8": eight,
            "hlo_growth": eight["hlo_chars"] / two["hlo_chars"],
            "compile_growth": eight["compile_s"] / two["compile_s"]}
    return out


if __name__ == "__main__":   # the benchmark shape (benchmarks/configs.py): minutes per compile
    import json
    from benchmarks.configs import steerling_proportions_config
    print(json.dumps(measure_scan_depth(steerling_proportions_config()), indent=1))
