"""Tokens per second consumed by the jitted train step of a config (CPU or accelerator).

measure_train_step_tokens_per_sec(config) builds the real TrainState and
jitted step (cbm_lm.train.step) on a one-device mesh, feeds a fixed
synthetic batch of the data contract's shape, and times ``steps`` steps
after ``warmup`` compiled ones (blocking on the result each step).
"""

from __future__ import annotations

import time

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from cbm_lm.config import MeshConfig, ModelConfig, logical_rules_from_config
from cbm_lm.data.synthetic import synthetic_batch
from cbm_lm.parallel.mesh import make_mesh
from cbm_lm.train.optimizer import make_optimizer
from cbm_lm.train.state import init_train_state
from cbm_lm.train.step import make_train_step


def measure_train_step_tokens_per_sec(config, steps: int = 10, warmup: int = 2) -> dict:
    model_cfg = ModelConfig.from_config(config.model)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    rules = logical_rules_from_config(config.rules)
    tx, schedule = make_optimizer(config.optimizer, steps + warmup)
    graphdef, state, shardings = init_train_state(model_cfg, tx, 0, mesh, rules)
    batch = synthetic_batch(model_cfg, config.data.batch_size, config.data.seq_len,
                            config.data.max_chunk_concepts)
    step = make_train_step(graphdef, tx, schedule, config, model_cfg, shardings,
                           NamedSharding(mesh, P()))
    with jax.set_mesh(mesh):
        t_compile = time.perf_counter()
        for _ in range(warmup):
            state, m = step(state, batch)
        jax.block_until_ready(m["loss"])
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, batch)
            jax.block_until_ready(m["loss"])
        dt = time.perf_counter() - t0
    tokens = steps * config.data.batch_size * config.data.seq_len
    return {"train_step_tokens_per_sec": round(tokens / dt),
            "train_step_seconds": round(dt / steps, 4),
            "compile_and_warmup_seconds": round(t0 - t_compile, 2)}
