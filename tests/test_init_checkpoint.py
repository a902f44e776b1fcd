"""tools/init_checkpoint.py's library call: a random-init checkpoint always loads (the
config validated, the learned key head included) and never lands on an existing run."""

import pathlib

import jax
import numpy as np
import pytest

from cbm_lm.config import ConfigError
from cbm_lm.default_config import load_config_file
from cbm_lm.train.checkpoint import CheckpointError, init_checkpoint, load_model

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config():
    c = load_config_file(ROOT / "gin_configs" / "tiny.py")
    c.provenance.head, c.provenance.contrastive_weight = "learned", 0.1
    c.provenance.rekey_d_p = 0
    return c


def test_a_learned_key_head_checkpoint_loads(tmp_path):
    init_checkpoint(tmp_path / "ckpt", _config())
    model, config = load_model(tmp_path / "ckpt")
    assert config.provenance.head == "learned"
    from flax import nnx
    head = nnx.state(model, nnx.Param).to_pure_dict()["provenance_head"]   # the learned W
    leaves = [np.asarray(x) for x in jax.tree.leaves(head)]
    assert leaves and all(np.isfinite(x).all() for x in leaves)   # (zero-initialized)


def test_an_existing_run_or_a_bad_config_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="already holds config.json"):
        init_checkpoint(run, _config())
    assert (run / "config.json").read_text() == "{}"
    bad = _config()
    bad.train.log_every = 0
    with pytest.raises(ConfigError, match="train.log_every"):
        init_checkpoint(tmp_path / "new", bad)
    assert not (tmp_path / "new").exists()


def test_a_failed_save_leaves_out_absent_and_a_rerun_succeeds(tmp_path, monkeypatch):
    from cbm_lm.train import checkpoint
    real = checkpoint.save_params

    def killed(d, config, model, **kw):    # the params land, then the save dies
        real(d, config, model, **kw)        # (before config.json would be complete)
        (pathlib.Path(d) / "config.json").unlink()
        raise KeyboardInterrupt("killed mid-save")
    monkeypatch.setattr(checkpoint, "save_params", killed)
    out = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        init_checkpoint(out, _config())
    assert not out.exists() and list(tmp_path.iterdir()) == []   # no half checkpoint, no tmp
    monkeypatch.setattr(checkpoint, "save_params", real)
    init_checkpoint(out, _config())                              # the rerun is not refused
    load_model(out)


def test_a_directory_holding_other_files_is_refused(tmp_path):
    out = tmp_path / "logs"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="non-empty directory that is not a cbm_lm"):
        init_checkpoint(out, _config())
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    init_checkpoint(empty, _config())                   # an empty directory is fine
    load_model(empty)
