"""The training loop: mesh, state, data, jitted step, logging, eval, checkpoints.

    python launch/train.py --config gin_configs/tiny.py --workdir DIR [--config.x=y]

Resumes from the newest usable checkpoint in DIR (params, optimizer, rng and
every process's data-iterator state), so a resumed run continues the exact
batch stream and reproduces the uninterrupted losses bitwise.

SIGTERM (a preemption notice) goes through JAX's preemption service
(multihost_utils.reached_preemption_sync_point, asked via orbax's
CheckpointManager.reached_preemption): the hosts agree on one step, all save
it, and exit 0. launch/train.py starts the distributed runtime even for one
process so the service exists. The loop reads nothing from the device per
step: non-finite steps are checked at log and checkpoint steps
(cbm_lm/train/nonfinite.py).
"""

from __future__ import annotations

import functools
import itertools
import json
import time

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from cbm_lm.config import ConfigError, MeshConfig, ModelConfig, logical_rules_from_config
from cbm_lm.config_validation import validate_config
from cbm_lm.parallel.mesh import MESH_AXES, make_mesh
from cbm_lm.provenance.build import provenance_config
from cbm_lm.parallel.devices import known_peak_flops_per_device
from cbm_lm.train.planning import hardware_train_flops_per_token, model_train_flops_per_token
from cbm_lm.parallel.sharding import logical_to_spec
from cbm_lm.model.provenance import trains_key_head
from cbm_lm.train.checkpoint import absolute, read_config, restore_params, saved_provenance
from cbm_lm.train.checkpointer import TrainCheckpointer
from cbm_lm.train.chunk_keys import ChunkKeyLogger
from cbm_lm.train.data_feed import agreed_eval_batches, process_pipeline
from cbm_lm.train.corpus_check import (check_corpus_fits_model, read_manifest,
                                      resolve_known_concepts, resolve_mask_token)
from cbm_lm.train.nonfinite import NonFiniteLossError, NonFiniteWatch  # noqa: F401
from cbm_lm.train.memory_plan import MeshPlan, batch_problem
from cbm_lm.train.metrics import METRICS_FILE, MetricsLogger, measured_matmul_flops
from cbm_lm.train.key_refit import run_key_refit
from cbm_lm.train.optimizer import make_optimizer
from cbm_lm.train.state import abstract_train_state, init_train_state, train_state_shardings
from cbm_lm.train.device_batch import global_batch
from cbm_lm.train.step import (add_weighted_metrics, eval_step, make_eval_step,
                                make_train_step, step_config, weighted_metrics_mean)


def _truncate_metrics(path: epath.Path, last_step: int) -> None:
    """Drops metrics.jsonl lines past ``last_step`` (written before a crash, redone on resume).

    Called only after a checkpoint of ``last_step`` restored."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:     # the line a kill cut short: its step is redone anyway
                print(f"WARNING: {path}: dropping its last line, cut short ({e})", flush=True)
                continue
            raise ValueError(f"{path}: line {i + 1} is not JSON ({e}); fix or move the file "
                             "aside to resume") from e
        if record["step"] <= last_step:
            keep.append(line + "\n")
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


def make_micro_eval_step(graphdef, config, model_cfg, param_shardings, batch_sharding):
    """The jitted eval step, run as the train step runs: over train.grad_accum_steps
    micro-batches of batch / grad_accum_steps rows (lax.scan), so eval holds no more
    activations (logits: rows x T x vocab) than one train micro-step. Metrics combine as
    the train step's do (step.add_weighted_metrics): means weighted by each micro-batch's
    ``lm_tokens``, counts summed. Micro-batch i takes rows j * A + i, so each stays spread
    over every batch shard (no resharding); which rows go together does not change the
    weighted means. Each micro-batch draws eval_step's fixed key."""
    accum = config.train.grad_accum_steps
    if accum == 1:
        return make_eval_step(graphdef, config, model_cfg, param_shardings, batch_sharding)
    one = functools.partial(eval_step, graphdef=graphdef, config=step_config(model_cfg, config))
    micro_sharding = NamedSharding(batch_sharding.mesh, P(None, *batch_sharding.spec))

    def split(x):   # [B, ...] -> [A, B/A, ...]
        if x.shape[0] % accum:
            raise ValueError(f"eval batch of {x.shape[0]} does not split into {accum} "
                             f"micro-batches (train.grad_accum_steps)")
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, micro_sharding)

    def fn(params, batch):
        micro = jax.tree.map(split, batch)
        shapes = jax.eval_shape(one, params, jax.tree.map(lambda x: x[0], micro))

        def body(total, mb):
            return add_weighted_metrics(total, one(params, mb)), None

        total, _ = jax.lax.scan(body, {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()},
                                micro)
        return weighted_metrics_mean(total)

    return jax.jit(fn, in_shardings=(param_shardings, batch_sharding))


def _evaluate(eval_step, params, config, per_process_batch, batch_sharding, n_batches) -> dict:
    """Mean eval metrics over exactly ``n_batches`` (agreed by every process)."""
    totals = {}
    it = process_pipeline(config, config.data.eval_split, per_process_batch, eval_mode=True)
    for local in itertools.islice(it, n_batches):
        m = jax.device_get(eval_step(params, global_batch(local, batch_sharding)))
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return {f"eval_{k}": v / max(n_batches, 1) for k, v in totals.items()}


def _restore_init_from(init_from, targets: dict, config):
    """--init_from's params -> (params, step). A checkpoint that trained no key head (e.g. an
    imported one) gives every param but the head's W, which keeps its init (0: the fixed
    key) when this run trains one."""
    if "provenance_head" in targets and not trains_key_head(
            saved_provenance(read_config(init_from))):
        targets = {k: v for k, v in targets.items() if k != "provenance_head"}
    return restore_params(init_from, targets, config=config)


def _check_batch_split(config, mesh, rules) -> None:
    """The train step splits data.batch_size into train.grad_accum_steps micro-batches, each
    over the mesh's batch shards (the eval step likewise): refused here, naming the fields,
    rather than by a sharding error at the first step."""
    plan = MeshPlan(ici=tuple(mesh.shape[a] for a in MESH_AXES), dcn=(1,) * len(MESH_AXES))
    bad = batch_problem(config, plan, rules)
    if bad:
        raise ConfigError(f"{bad}; change data.batch_size, train.grad_accum_steps or the mesh")


def train(config, workdir: str, init_from: str | None = None) -> dict:
    """Runs (or resumes) training; returns the last logged metrics.

    init_from: a checkpoint directory (e.g. tools/import_steerling.py's output)
    whose params start a fresh run (optimizer, step and data start anew);
    ignored when ``workdir`` already holds a checkpoint to resume.
    """
    validate_config(config)   # refuses a config that cannot train well before anything is written
    mesh = make_mesh(MeshConfig.from_config(config.mesh))
    rules = logical_rules_from_config(config.rules)
    _check_batch_split(config, mesh, rules)   # also before anything is written
    absolute(workdir).mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(config.data.dir)
    resolve_mask_token(config, manifest)
    resolve_known_concepts(config, manifest)
    model_cfg = ModelConfig.from_config(config.model)
    check_corpus_fits_model(manifest, config.data.dir, model_cfg, config.data.seq_len,
                            max_chunk_concepts=config.data.max_chunk_concepts,
                            max_sources=provenance_config(config).max_sources)
    if config.data.batch_size % jax.process_count():
        raise ValueError(f"data.batch_size={config.data.batch_size} does not split over "
                         f"{jax.process_count()} processes")
    per_process_batch = config.data.batch_size // jax.process_count()
    tx, schedule = make_optimizer(config.optimizer, config.train.num_steps)
    prov = provenance_config(config)
    graphdef, abs_state, abs_params = abstract_train_state(model_cfg, tx, prov.max_sources, prov)
    shardings = train_state_shardings(abs_state, abs_params, mesh, rules)
    batch_sharding = NamedSharding(mesh, logical_to_spec(("batch",), rules))

    data_iter = process_pipeline(config, config.data.split, per_process_batch)
    ckpt = TrainCheckpointer(workdir, config)
    targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           abs_state, shardings)
    state, restored_step = ckpt.restore_latest(targets, data_iter)
    fresh = state is None
    if fresh:
        start = 0
        # --init_from's shapes are checked before anything is initialized: a checkpoint
        # that does not fit is refused at once, not after a model init.
        loaded = _restore_init_from(init_from, targets.params, config) if init_from else None
        graphdef, state, _ = init_train_state(model_cfg, tx, config.seed, mesh, rules,
                                              prov.max_sources, prov)
        if loaded is not None:
            state = state.replace(params={**state.params, **loaded[0]})
            print(f"initialized the params from {init_from} (step {loaded[1]})", flush=True)
    else:
        start = int(restored_step)
        print(f"resumed from step {start} in {workdir}"
              + (f" (--init_from={init_from} not used)" if init_from else ""), flush=True)
    ckpt.write_config()
    keylog = None
    if prov.log_keys:   # WORKDIR/provenance/keys/logged, cut back to the restored step
        keylog = ChunkKeyLogger(absolute(workdir), batch_sharding)
        keylog.resume(start)
    metrics_path = absolute(workdir) / METRICS_FILE
    if jax.process_index() == 0:
        if fresh:
            _set_aside_metrics(metrics_path)
        else:
            _truncate_metrics(metrics_path, start)
    logger = MetricsLogger(absolute(workdir), config.train.num_steps,
                           enabled=jax.process_index() == 0, start_step=start)   # ETA origin

    # FLOPs per data-token slot: mfu counts model FLOPs (3 x forward, no remat recompute),
    # hfu hardware FLOPs (recompute included). Two-stream diffusion runs the model on
    # [noisy | clean] but unembeds the noisy stream only (planning.step_forward_flops_per_token).
    two_stream = model_cfg.objective == "diffusion" and config.loss.diffusion_clean_context
    model_flops = model_train_flops_per_token(model_cfg, config.data.seq_len, two_stream=two_stream)
    hw_flops = hardware_train_flops_per_token(model_cfg, config.data.seq_len, two_stream=two_stream)
    if jax.devices()[0].platform == "cpu" and not config.hardware.peak_flops_per_device:
        peak = measured_matmul_flops() * jax.process_count()   # simulated devices share a host
    else:   # None for a chip with no known peak (warned once): no mfu/hfu then
        peak = known_peak_flops_per_device(jax.devices()[0].device_kind,
                                           config.hardware.peak_flops_per_device)
        peak = peak * jax.device_count() if peak else None
    n_eval = (agreed_eval_batches(config, per_process_batch) if config.train.eval_every else 0)
    watch = NonFiniteWatch(config.train.nan_policy, config.train.max_skipped_steps)
    last = {}
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        train_step = make_train_step(graphdef, tx, schedule, config, model_cfg, shardings,
                                     batch_sharding)
        eval_step = make_micro_eval_step(graphdef, config, model_cfg, shardings.params,
                                         batch_sharding)
        t_last, tokens_since, real_since = time.time(), 0, 0.0
        step = start
        try:
            while step < config.train.num_steps:
                local = next(data_iter)
                out = train_step(state, global_batch(local, batch_sharding))
                state, metrics = out[:2]
                step += 1
                if keylog is not None:
                    keylog.record(step, out[2])
                tokens_since += config.data.batch_size * config.data.seq_len
                # The step's real (non-padding) tokens, summed on device: no host sync here.
                real_since = real_since + metrics.get("real_tokens", 0.0)
                watch.record(step, metrics)
                # Every process asks at every step; all see True at the same step.
                preempted = ckpt.manager.reached_preemption(step)
                is_last = step == config.train.num_steps
                log_now = step % config.train.log_every == 0 or is_last
                eval_now = n_eval > 0 and (step % config.train.eval_every == 0 or is_last)
                save_now = step % config.checkpoint.every_steps == 0 or is_last or preempted
                if log_now or eval_now or save_now:
                    watch.check(state.skipped)      # the only host syncs: log / save steps
                refit = {}
                if is_last and not preempted and config.train.get("key_refit_steps", 0):
                    try:
                        refit_state, refit = run_key_refit(state, graphdef, config, data_iter,
                                                           batch_sharding)
                    except BaseException:   # the trained step is saved before the error goes on
                        if keylog is not None:
                            keylog.checkpoint(step)
                        ckpt.save(step, state, data_iter)
                        raise
                    state = refit_state
                    print(f"key refit: {config.train.key_refit_steps} steps on "
                          f"{config.train.key_refit_batches} batches' states: concept loss "
                          f"{refit['key_refit_first_concept_loss']:.4g} -> "
                          f"{refit['key_refit_last_concept_loss']:.4g}, residual energy "
                          f"{refit['key_refit_first_energy']:.4g} -> "
                          f"{refit['key_refit_last_energy']:.4g} "
                          f"({refit['key_refit_seconds']:.0f} s)", flush=True)
                    t_last += refit["key_refit_seconds"]   # the step's throughput excludes it
                if log_now or eval_now:
                    now = time.time()
                    last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    last.update(refit)
                    dt = max(now - t_last, 1e-9)
                    real = float(real_since) if "real_tokens" in metrics else tokens_since
                    # tokens_per_sec: real tokens; mfu/hfu: FLOPs of every slot (padding too).
                    last["tokens_per_sec"] = real / dt
                    if peak:
                        slots_per_sec = tokens_since / dt
                        last.update(mfu=slots_per_sec * model_flops / peak,
                                    hfu=slots_per_sec * hw_flops / peak)
                    if eval_now:
                        last.update(_evaluate(eval_step, state.params, config, per_process_batch,
                                              batch_sharding, n_eval))
                    t_last, tokens_since, real_since = time.time(), 0, 0.0
                    if keylog is not None:
                        keylog.flush()
                    logger.write(step, last)
                    logger.console(step, last)
                if save_now:
                    if keylog is not None:
                        keylog.checkpoint(step)   # rows through step, then the cursor
                    ckpt.save(step, state, data_iter)
                if preempted:
                    print(f"preemption notice (SIGTERM): all {jax.process_count()} processes "
                          f"saved step {step}; exiting", flush=True)
                    break
        finally:
            if keylog is not None:
                keylog.close()
            ckpt.close()
            logger.close()
    return last
