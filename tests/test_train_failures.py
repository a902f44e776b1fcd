"""A non-finite loss stops the run naming the step (nan_policy=stop) or is
skipped and counted (nan_policy=skip); a checkpoint saved on one mesh
(8 devices, fsdp=8) restores on another (4 devices)."""

import jax
import numpy as np
import pytest

from cbm_lm.config import MeshConfig, ModelConfig
from cbm_lm.default_config import DEFAULT_RULES, base_config
from cbm_lm.parallel.mesh import make_mesh
from cbm_lm.train.checkpointer import TrainCheckpointer
from cbm_lm.train.optimizer import make_optimizer
from cbm_lm.train.state import abstract_train_state, train_state_shardings
from train_fixtures import losses, run, tiny_corpus, train_args

# An absurd learning rate: step 1 is finite, its update overflows the params,
# so every later step's loss is non-finite.
EXPLODE = {"optimizer.learning_rate": 1e30, "optimizer.warmup_steps": 0, "train.num_steps": 4}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.slow
def test_nan_stops_and_names_the_step(corpus, tmp_path):
    proc = run(train_args(corpus, tmp_path / "run", **EXPLODE), check=False)
    assert proc.returncode != 0
    assert "non-finite loss or gradient at step 2" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_nan_skip_policy_counts_skipped_steps(corpus, tmp_path):
    workdir = tmp_path / "run"
    run(train_args(corpus, workdir, **EXPLODE, **{"train.nan_policy": "skip"}))
    import json
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0.0, 1.0, 2.0, 3.0]
    assert [r["finite"] for r in records] == [1.0, 0.0, 0.0, 0.0]
    assert sorted(losses(workdir)) == [1, 2, 3, 4]
    # the logged rate is the one the optimizer applies: its count stops at the first skip
    from cbm_lm.train.optimizer import learning_rate_schedule
    cfg = base_config().optimizer
    cfg.learning_rate, cfg.warmup_steps = 1e30, 0
    sched = learning_rate_schedule(cfg, 4)
    np.testing.assert_allclose([r["learning_rate"] for r in records],
                               [sched(0), sched(1), sched(1), sched(1)], rtol=1e-5)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_checkpoint_restores_on_a_different_mesh(tmp_path):
    config = base_config()
    config.checkpoint.async_save = False
    model_cfg = ModelConfig.from_config(config.model)
    tx, _ = make_optimizer(config.optimizer, 10)
    mesh8 = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    # Random values in every leaf (no model init to compile; distinct values also catch a
    # restore that permutes shards, which an init's constant norms and zero moments hide).
    _, abs_state, abs_params = abstract_train_state(model_cfg, tx)
    rng = np.random.default_rng(0)

    def fill(a, sharding):
        if np.issubdtype(a.dtype, np.floating):
            value = rng.standard_normal(a.shape)
        else:
            value = rng.integers(0, 2 if a.dtype == np.bool_ else 100, a.shape)
        return jax.device_put(value.astype(a.dtype), sharding)
    state = jax.tree.map(fill, abs_state,
                         train_state_shardings(abs_state, abs_params, mesh8, DEFAULT_RULES))
    state = state.replace(step=jax.device_put(np.int32(7), state.step.sharding))
    ckpt = TrainCheckpointer(tmp_path, config)
    ckpt.save(7, state, None)
    ckpt.close()

    mesh4 = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), jax.devices()[:4])
    _, abs_state, abs_params = abstract_train_state(model_cfg, tx)
    shardings = train_state_shardings(abs_state, abs_params, mesh4, DEFAULT_RULES)
    targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           abs_state, shardings)
    restored, step = TrainCheckpointer(tmp_path, config).restore_latest(targets, None)
    assert step == 7 and int(restored.step) == 7
    gate = restored.params["backbone"]["blocks"]["mlp"]["gate"]         # [L, D, F]
    assert len(gate.sharding.device_set) == 4
    assert gate.addressable_shards[0].data.shape == (2, 128 // 2, 512 // 2)   # fsdp=2 x tensor=2
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_learning_rate_schedule_by_hand():
    from cbm_lm.train.optimizer import learning_rate_schedule
    cfg = base_config().optimizer
    cfg.learning_rate, cfg.warmup_steps, cfg.min_lr_ratio = 1.0, 10, 0.1
    sched = learning_rate_schedule(cfg, 110)
    np.testing.assert_allclose([sched(0), sched(5), sched(10)], [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(sched(60), 0.1 + 0.9 * 0.5, atol=1e-6)   # half-way down the cosine
    np.testing.assert_allclose(sched(110), 0.1, atol=1e-6)
    cfg.warmup_steps = 0
    np.testing.assert_allclose(learning_rate_schedule(cfg, 100)(0), 1.0)
