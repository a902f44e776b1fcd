"""The training loop: mesh, state, data, jitted step, logging, eval, checkpoints.

    python launch/train.py --config gin_configs/tiny.py --workdir DIR [--config.x=y]

Resumes from the newest usable checkpoint in DIR (params, optimizer, rng and
every process's data-iterator state), so a resumed run continues the exact
batch stream and reproduces the uninterrupted losses bitwise. SIGTERM saves a
checkpoint and exits 0.
"""

from __future__ import annotations

import json
import signal
import time

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding

from cbm_lm.config import MeshConfig, ModelConfig, logical_rules_from_config, validate_config
from cbm_lm.data.pipeline import make_pipeline
from cbm_lm.parallel.mesh import make_mesh
from cbm_lm.parallel.devices import peak_flops_per_device
from cbm_lm.train.planning import train_flops_per_token
from cbm_lm.parallel.sharding import logical_to_spec
from cbm_lm.train.checkpoint import absolute
from cbm_lm.train.checkpointer import TrainCheckpointer
from cbm_lm.train.data_feed import RowSliceIterator
from cbm_lm.train.corpus_check import check_corpus_fits_model, read_manifest, resolve_mask_token
from cbm_lm.train.metrics import METRICS_FILE, MetricsLogger, measured_matmul_flops
from cbm_lm.train.optimizer import make_optimizer
from cbm_lm.train.state import abstract_train_state, init_train_state, train_state_shardings
from cbm_lm.train.step import make_eval_step, make_train_step

# The batch fields the step reads; chunk/source ids stay on the host (64-bit).
DEVICE_FIELDS = ("tokens", "segment_ids", "positions", "concept_ids", "chunk_segment_ids")


class NonFiniteLossError(RuntimeError):
    pass


class _Sigterm:
    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        print("SIGTERM received: saving a checkpoint, then exiting", flush=True)
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _global_batch(local: dict, sharding: NamedSharding) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(local[k]))
            for k in DEVICE_FIELDS}


def _truncate_metrics(path: epath.Path, last_step: int) -> None:
    """Drops metrics.jsonl lines past ``last_step`` (written before a crash, redone on resume).

    Called only after a checkpoint of ``last_step`` restored."""
    if not path.exists():
        return
    keep = [line + "\n" for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text("".join(keep))
    tmp.replace(path)


def _set_aside_metrics(path: epath.Path) -> None:
    """A fresh start keeps an earlier metrics.jsonl (e.g. of a run killed before its first
    checkpoint) as metrics.jsonl.<time>, so nothing logged is ever lost."""
    if path.exists() and path.read_text().strip():
        dst = path.parent / f"{path.name}.{int(time.time())}"
        path.rename(dst)
        print(f"no checkpoint to resume: kept the earlier {path.name} as {dst}", flush=True)


def _pipeline(config, split, per_process_batch, *, eval_mode=False):
    """This process's batch iterator (see cbm_lm/train/data_feed.py for process_split)."""
    rows = config.data.process_split == "rows"
    p, n = jax.process_index(), jax.process_count()
    it = make_pipeline(
        config.data.dir, split, per_process_batch * (n if rows else 1), config.data.seq_len,
        seed=config.data.shuffle_seed, process_index=0 if rows else p,
        process_count=1 if rows else n, max_chunk_concepts=config.data.max_chunk_concepts,
        mixture=dict(config.data.mixture) or None,
        worker_count=0 if eval_mode else config.data.worker_count,
        packing_bins=config.data.packing_bins or None,
        **({"num_epochs": 1, "shuffle": False, "drop_remainder": True} if eval_mode else {}))
    if rows and n > 1:
        it = RowSliceIterator(it, p * per_process_batch, (p + 1) * per_process_batch)
    return it


def _evaluate(eval_step, params, config, per_process_batch, batch_sharding) -> dict:
    totals, n = {}, 0
    for local in _pipeline(config, config.data.eval_split, per_process_batch, eval_mode=True):
        m = jax.device_get(eval_step(params, _global_batch(local, batch_sharding)))
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + float(v)
        n += 1
        if n >= config.train.eval_batches:
            break
    return {f"eval_{k}": v / max(n, 1) for k, v in totals.items()}


def train(config, workdir: str) -> dict:
    """Runs (or resumes) training; returns the last logged metrics."""
    validate_config(config)   # refuses a config that cannot train well before anything is written
    absolute(workdir).mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(config.data.dir)
    resolve_mask_token(config, manifest)
    model_cfg = ModelConfig.from_config(config.model)
    check_corpus_fits_model(manifest, config.data.dir, model_cfg, config.data.seq_len)
    mesh = make_mesh(MeshConfig.from_config(config.mesh))
    rules = logical_rules_from_config(config.rules)
    if config.data.batch_size % jax.process_count():
        raise ValueError(f"data.batch_size={config.data.batch_size} does not split over "
                         f"{jax.process_count()} processes")
    per_process_batch = config.data.batch_size // jax.process_count()
    tx, schedule = make_optimizer(config.optimizer, config.train.num_steps)
    graphdef, abs_state, abs_params = abstract_train_state(model_cfg, tx)
    shardings = train_state_shardings(abs_state, abs_params, mesh, rules)
    batch_sharding = NamedSharding(mesh, logical_to_spec(("batch",), rules))

    data_iter = _pipeline(config, config.data.split, per_process_batch)
    ckpt = TrainCheckpointer(workdir, config)
    targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           abs_state, shardings)
    state, restored_step = ckpt.restore_latest(targets, data_iter)
    if state is None:
        graphdef, state, _ = init_train_state(model_cfg, tx, config.seed, mesh, rules)
        start = 0
    else:
        start = int(restored_step)
        print(f"resumed from step {start} in {workdir}", flush=True)
    ckpt.write_config()
    metrics_path = absolute(workdir) / METRICS_FILE
    if jax.process_index() == 0:
        if state is None:
            _set_aside_metrics(metrics_path)
        else:
            _truncate_metrics(metrics_path, start)
    logger = MetricsLogger(absolute(workdir), config.train.num_steps, enabled=jax.process_index() == 0)

    # Two-stream diffusion runs the model on [noisy | clean]: 2 model tokens per data token.
    streams = 2 if (model_cfg.objective == "diffusion" and config.loss.diffusion_clean_context) else 1
    flops_per_token = streams * train_flops_per_token(model_cfg, streams * config.data.seq_len)
    if jax.devices()[0].platform == "cpu" and not config.hardware.peak_flops_per_device:
        peak = measured_matmul_flops() * jax.process_count()   # simulated devices share a host
    else:
        peak = peak_flops_per_device(jax.devices()[0].device_kind,
                                     config.hardware.peak_flops_per_device) * jax.device_count()
    sigterm = _Sigterm()
    last = {}
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        train_step = make_train_step(graphdef, tx, schedule, config, model_cfg, shardings,
                                     batch_sharding)
        eval_step = make_eval_step(graphdef, config, model_cfg, shardings.params, batch_sharding)
        t_last, tokens_since = time.time(), 0
        step = start
        try:
            while step < config.train.num_steps:
                local = next(data_iter)
                state, metrics = train_step(state, _global_batch(local, batch_sharding))
                step += 1
                tokens_since += config.data.batch_size * config.data.seq_len
                finite = bool(jax.device_get(metrics["finite"]))
                if not finite and config.train.nan_policy == "stop":
                    raise NonFiniteLossError(
                        f"non-finite loss or gradient at step {step} "
                        f"(loss={float(jax.device_get(metrics['loss']))}); stopping. "
                        f"Set --config.train.nan_policy=skip to skip such steps.")
                skipped = int(jax.device_get(state.skipped))
                if skipped > config.train.max_skipped_steps:
                    raise NonFiniteLossError(
                        f"{skipped} steps skipped for non-finite loss by step {step}, more than "
                        f"train.max_skipped_steps={config.train.max_skipped_steps}")
                is_last = step == config.train.num_steps
                log_now = step % config.train.log_every == 0 or is_last
                eval_now = bool(config.train.eval_every) and (
                    step % config.train.eval_every == 0 or is_last)
                if log_now or eval_now:
                    now = time.time()
                    last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    tps = tokens_since / max(now - t_last, 1e-9)
                    last.update(tokens_per_sec=tps, mfu=tps * flops_per_token / peak)
                    if eval_now:
                        last.update(_evaluate(eval_step, state.params, config, per_process_batch,
                                              batch_sharding))
                    t_last, tokens_since = time.time(), 0
                    logger.write(step, last)
                    logger.console(step, last)
                if (step % config.checkpoint.every_steps == 0 or step == config.train.num_steps
                        or sigterm.requested):
                    ckpt.save(step, state, data_iter)
                if sigterm.requested:
                    break
        finally:
            ckpt.close()
            logger.close()
            sigterm.restore()
    return last
