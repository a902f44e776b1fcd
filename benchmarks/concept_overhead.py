"""Train-step time of the concept-bottleneck model over the plain backbone, and CPU MFU.

Both steps run on one device at the benchmark shape (benchmarks/configs.py),
interleaved round by round (this machine is shared: medians of side-by-side
rounds, not absolute times, are the result):

  concept_overhead_ratio = median step time (ConceptBottleneckLM, full loss)
                           / median step time (same Backbone + tied LM head, next-token CE)
  cpu_mfu                = 6 x params x tokens / step time (concept tables counted)
                           / peak fp32 matmul FLOP/s of this machine (1024^2 jitted, same run)
"""

from __future__ import annotations

import statistics
import time

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks.plain_backbone import make_plain_step
from cbm_lm.config import MeshConfig, ModelConfig, logical_rules_from_config
from cbm_lm.parallel.mesh import make_mesh
from cbm_lm.data.synthetic import synthetic_batch
from cbm_lm.train.metrics import measured_matmul_flops
from cbm_lm.train.optimizer import make_optimizer
from cbm_lm.train.planning import count_params
from cbm_lm.train.state import init_train_state
from cbm_lm.train.step import make_train_step


def measure_concept_overhead(config, rounds: int = 5, steps: int = 3) -> dict:
    model_cfg = ModelConfig.from_config(config.model)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    rules = logical_rules_from_config(config.rules)
    n_steps = (rounds + 1) * steps
    tx, schedule = make_optimizer(config.optimizer, n_steps)
    graphdef, state, shardings = init_train_state(model_cfg, tx, 0, mesh, rules)
    batch = synthetic_batch(model_cfg, config.data.batch_size, config.data.seq_len,
                            config.data.max_chunk_concepts)
    cbm_step = make_train_step(graphdef, tx, schedule, config, model_cfg, shardings,
                               NamedSharding(mesh, P()))
    plain_step, params, opt_state = make_plain_step(model_cfg, config.optimizer, n_steps)

    def run_cbm():
        nonlocal state
        for _ in range(steps):
            state, m = cbm_step(state, batch)
            jax.block_until_ready(m["loss"])

    def run_plain():
        nonlocal params, opt_state
        for _ in range(steps):
            params, opt_state, loss = plain_step(params, opt_state, batch)
            jax.block_until_ready(loss)

    with jax.set_mesh(mesh):
        run_cbm(), run_plain()                       # compile + warm up
        peak = measured_matmul_flops()
        cbm_s, plain_s = [], []
        for _ in range(rounds):
            for fn, out in ((run_cbm, cbm_s), (run_plain, plain_s)):
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) / steps)
        peak = max(peak, measured_matmul_flops())
    cbm, plain = statistics.median(cbm_s), statistics.median(plain_s)
    tokens = config.data.batch_size * config.data.seq_len
    model_flops = 6 * count_params(model_cfg) * tokens
    return {"concept_overhead_ratio": cbm / plain, "cbm_step_seconds": cbm,
            "plain_step_seconds": plain, "cbm_train_tokens_per_sec": tokens / cbm,
            "cpu_mfu": model_flops / cbm / peak, "cpu_peak_matmul_flops": peak,
            "model_flops_per_step": model_flops}
