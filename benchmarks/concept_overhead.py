"""Train-step time of the concept-bottleneck model over the plain backbone, and CPU MFU.

Both steps run on one device at the benchmark shape (benchmarks/configs.py),
interleaved round by round, each step timed alone. This machine is shared, and
other work only ever adds time, so the least-disturbed step of each (the minimum,
as timeit reports) is the estimate; the ratio of medians is reported beside it, and the same two ratios in process CPU
time (``cpu_time_ratio``, ``median_cpu_time_ratio``: all threads' CPU seconds per step,
which waiting for a core does not inflate; a diagnostic, since under load the wall
minimum of one side can come from a quieter moment than the other's):

  concept_overhead_ratio = min step time (ConceptBottleneckLM, full loss)
                           / min step time (same Backbone + tied LM head, next-token CE)
  cpu_mfu                = model FLOPs per step / min step time
                           / peak fp32 matmul FLOP/s of this machine (1024^2 jitted, best
                             of 5 in every round of the same run)

Model FLOPs are the trainer's own count (train/planning.py model_train_flops_per_token,
3 x forward with no remat recompute, the numerator of the MFU the train loop logs:
projections, attention scores and mixing, LM head, both concept heads), less the
backward it assigns to the dense top-k selection, which is not differentiated
(stop_gradient):

  flops/token = 3 fwd - 2 (2 C_k D + 2 C_u Q_u)     fwd = planning.forward_flops_per_token

At the benchmark shape that is 129.7 MFLOP per token; the 6 x params x tokens rule used
before (140.1 M) charged the concept tables 6 FLOPs per parameter per token, where
the known predictor is only read forward and the tables' other rows not at all, and
left out attention.

Two ceilings are reported beside the ratios, so a reader can tell what the code
can still win from what the shape fixes:

  concept_flops_ratio  = model FLOPs (concept step) / model FLOPs (plain step)
                         the overhead ratio at equal efficiency (1.030 at the benchmark
                         shape: the concept heads' matmuls; anything above it is the
                         selection, gathers and elementwise work)
  plain_mfu            = the plain step's own MFU; the concept step runs the same
                         backbone, so its MFU sits near this one
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
from cbm_lm.train.planning import backbone_forward_flops_per_token, model_train_flops_per_token
from cbm_lm.train.state import init_train_state
from cbm_lm.train.step import make_train_step


def model_flops_per_token(model_cfg, seq_len: int) -> float:
    """Train FLOPs per token (module docstring): the trainer's count less the selection's
    backward (the dense top-k scores every concept forward only)."""
    cc = model_cfg.concepts
    select = 2 * cc.n_known * model_cfg.d_model
    if cc.use_unknown:
        select += 2 * cc.n_unknown * (cc.unknown_rank or model_cfg.d_model)
    return model_train_flops_per_token(model_cfg, seq_len) - 2 * select


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

    def run_cbm(times=None, cpu=None):
        nonlocal state
        for _ in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            state, m = cbm_step(state, batch)
            jax.block_until_ready(m["loss"])
            if times is not None:
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)

    def run_plain(times=None, cpu=None):
        nonlocal params, opt_state
        for _ in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            params, opt_state, loss = plain_step(params, opt_state, batch)
            jax.block_until_ready(loss)
            if times is not None:
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)

    with jax.set_mesh(mesh):
        run_cbm(), run_plain()                       # compile + warm up
        peak = measured_matmul_flops()
        cbm_s, plain_s, cbm_c, plain_c = [], [], [], []
        for _ in range(rounds):
            run_cbm(cbm_s, cbm_c), run_plain(plain_s, plain_c)
            peak = max(peak, measured_matmul_flops())   # least-disturbed too, every round
    cbm, plain = min(cbm_s), min(plain_s)
    tokens = config.data.batch_size * config.data.seq_len
    model_flops = model_flops_per_token(model_cfg, config.data.seq_len) * tokens
    plain_flops = 3 * backbone_forward_flops_per_token(model_cfg, config.data.seq_len) * tokens
    return {"concept_overhead_ratio": cbm / plain, "cbm_step_seconds": cbm,
            "plain_step_seconds": plain,
            "median_ratio": statistics.median(cbm_s) / statistics.median(plain_s),
            "cpu_time_ratio": min(cbm_c) / min(plain_c),
            "median_cpu_time_ratio": statistics.median(cbm_c) / statistics.median(plain_c),
            "cbm_step_seconds_all": [round(x, 3) for x in cbm_s],
            "plain_step_seconds_all": [round(x, 3) for x in plain_s], "cbm_train_tokens_per_sec": tokens / cbm,
            "cpu_mfu": model_flops / cbm / peak, "cpu_peak_matmul_flops": peak,
            "model_flops_per_step": model_flops, "plain_model_flops_per_step": plain_flops,
            "concept_flops_ratio": model_flops / plain_flops,
            "plain_mfu": plain_flops / plain / peak}
