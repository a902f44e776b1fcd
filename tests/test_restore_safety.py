"""A failed restore never costs a run (issue 12 item 1).

Truth: the checkpoint directory's listing and file bytes before and after a
refused restore (nothing moved, nothing deleted), and the leaves a
shape-changing override really changes (model.d_model=64 changes every
embed-sized array of a d_model=32 model).
"""

import pathlib

import jax
import numpy as np
import pytest

from cbm_lm.config import MeshConfig, ModelConfig
from cbm_lm.default_config import DEFAULT_RULES, base_config
from cbm_lm.model import ConceptBottleneckLM
from cbm_lm.parallel.mesh import make_mesh
from cbm_lm.train.checkpoint import CheckpointError, save_params
from cbm_lm.train.checkpointer import CheckpointMismatchError, TrainCheckpointer
from cbm_lm.train.optimizer import make_optimizer
from cbm_lm.train.state import abstract_train_state, init_train_state, train_state_shardings


def _config(**model):
    c = base_config()
    c.checkpoint.async_save = False
    c.model.d_model, c.model.mlp_dim, c.model.vocab_size = 32, 64, 64
    c.model.concepts.n_known, c.model.concepts.n_unknown = 16, 16
    c.model.concepts.known_topk, c.model.concepts.unknown_topk = 4, 4
    for k, v in model.items():
        setattr(c.model, k, v)
    return c


def _mesh():
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])


def _targets(config):
    tx, _ = make_optimizer(config.optimizer, 10)
    _, abs_state, abs_params = abstract_train_state(ModelConfig.from_config(config.model), tx)
    sh = train_state_shardings(abs_state, abs_params, _mesh(), DEFAULT_RULES)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abs_state, sh)


def _save_run(workdir, config, steps=(2, 4)):
    tx, _ = make_optimizer(config.optimizer, 10)
    _, state, _ = init_train_state(ModelConfig.from_config(config.model), tx, 0, _mesh(),
                                   DEFAULT_RULES)
    ckpt = TrainCheckpointer(workdir, config)
    ckpt.write_config()
    for s in steps:
        ckpt.save(s, state.replace(step=state.step + s), None)
    ckpt.close()
    return state


def _snapshot(root: pathlib.Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _corrupt(step_dir: pathlib.Path):
    """Truncates every array data file of the step's params (as a torn write would)."""
    for f in (step_dir / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "d" in f.parent.name:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_shape_changing_override_is_refused_naming_leaves_and_flag(tmp_path):
    _save_run(tmp_path, _config())
    before = _snapshot(tmp_path)
    wider = _config(d_model=64)
    with pytest.raises(CheckpointMismatchError) as err:
        TrainCheckpointer(tmp_path, wider).restore_latest(_targets(wider), None)
    msg = str(err.value)
    # mlp.gate is [n_layers, d_model, mlp_dim]: (2, 32, 64) saved, (2, 64, 64) for d_model=64.
    assert "params.backbone.blocks.mlp.gate: shape (2, 32, 64) saved vs (2, 64, 64) wanted" in msg, msg
    assert "--config.model.d_model=64 (checkpoint: 32)" in msg, msg
    assert _snapshot(tmp_path) == before           # nothing moved, rewritten or deleted
    restored, step = TrainCheckpointer(tmp_path, _config()).restore_latest(
        _targets(_config()), None)                  # the original config still resumes
    assert step == 4 and int(restored.step) == 4


def test_unreadable_storage_moves_nothing(tmp_path, monkeypatch):
    """Every restore failing (storage down) raises and leaves every step in place."""
    config = _config()
    _save_run(tmp_path, config)
    before = _snapshot(tmp_path)
    ckpt = TrainCheckpointer(tmp_path, config)

    def down(*a, **k):
        raise OSError("storage unavailable")
    monkeypatch.setattr(ckpt.manager, "restore", down)
    with pytest.raises(CheckpointError, match="nothing was moved"):
        ckpt.restore_latest(_targets(config), None)
    assert _snapshot(tmp_path) == before
    assert not (tmp_path / "quarantine").exists()


def test_only_step_unreadable_is_not_quarantined(tmp_path):
    config = _config()
    _save_run(tmp_path, config, steps=(4,))
    _corrupt(tmp_path / "checkpoints" / "4")
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="nothing was moved"):
        TrainCheckpointer(tmp_path, config).restore_latest(_targets(config), None)
    assert _snapshot(tmp_path) == before


def test_unreadable_newest_is_quarantined_once_an_older_step_restores(tmp_path):
    config = _config()
    state = _save_run(tmp_path, config)
    _corrupt(tmp_path / "checkpoints" / "4")
    restored, step = TrainCheckpointer(tmp_path, config).restore_latest(_targets(config), None)
    assert step == 2 and int(restored.step) == 2
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    assert [p.name.split("-")[0] for p in (tmp_path / "quarantine").iterdir()] == ["4"]


def test_params_only_workdir_points_at_init_from(tmp_path):
    config = _config()
    model = ConceptBottleneckLM(ModelConfig.from_config(config.model),
                                rngs=__import__("flax").nnx.Rngs(0))
    save_params(tmp_path, config, model)
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="--init_from"):
        TrainCheckpointer(tmp_path, config).restore_latest(_targets(config), None)
    assert _snapshot(tmp_path) == before
