"""Resume: kill -9 mid-run, restart, and the losses from the resume point on
are bitwise identical to an uninterrupted run (data order included). A
corrupted newest checkpoint falls back to the previous one, saying so.

Every trainer launch costs seconds, so the uninterrupted runs are module fixtures
shared by the tests that compare against them, and every run here uses one of two
step counts (8 or 60: the learning-rate schedule is part of the compiled step), so
the persistent compilation cache compiles each step program once.
"""

import pathlib
import shutil
import subprocess
import time

import numpy as np
import pytest

from cbm_lm.provenance.keystore import read_store
from cbm_lm.train.checkpoint import restore_source_mass
from train_fixtures import env, losses, run, tiny_corpus, train_args

pytestmark = pytest.mark.slow

# Every run logs chunk keys (provenance.log_keys), so the kill -9 test also checks the
# key store; the keys are an output of the step, so the losses are the same either way.
_KEYS = {"provenance.log_keys": True, "provenance.d_p": 16, "provenance.max_chunks_per_row": 8}
# 8 steps, checkpoints at 4 and 8: a run killed once "step 5/8" is logged has checkpoint 4
# and key rows through step 5 on disk, and the kill has 3 steps to land before step 8's save.
_SHORT = {"train.num_steps": 8, "checkpoint.every_steps": 4}
# 60 steps, no periodic checkpoint: the only one before the end is a preemption save.
_LONG = {"train.num_steps": 60, "checkpoint.every_steps": 1000}


def _args(corpus, workdir, **overrides):
    return train_args(corpus, workdir, **{**_KEYS, **_SHORT, **overrides})


def _key_rows(workdir):
    """The logged store's rows sorted by (step, chunk id): ids, steps, keys."""
    rows = read_store(workdir / "provenance" / "keys" / "logged")
    order = np.lexsort((rows["ids"], rows["steps"]))
    return {k: v[order] for k, v in rows.items()}


def _saved_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _wait_for(path: pathlib.Path, text: str, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early:\n{path.read_text()}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {text!r}")


def _start(args, log: pathlib.Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(args, env=env(), stdout=f, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference_dir(corpus, tmp_path_factory):
    """An uninterrupted 8-step run (checkpoints 4 and 8)."""
    workdir = tmp_path_factory.mktemp("reference")
    run(_args(corpus, workdir))
    return workdir


@pytest.fixture(scope="module")
def reference(reference_dir):
    return losses(reference_dir)


@pytest.fixture(scope="module")
def long_reference(corpus, tmp_path_factory):
    """An uninterrupted 60-step run, made the way a user would after a run was killed
    before its first checkpoint: kill -9 at step 2, then the same command again (a fresh
    start). Returns (workdir, the killed run's metrics.jsonl text, the rerun's stdout)."""
    tmp = tmp_path_factory.mktemp("long_reference")
    workdir, log = tmp / "run", tmp / "log.txt"
    args = _args(corpus, workdir, **_LONG)
    proc = _start(args, log)
    _wait_for(log, "step 2/60", proc)          # no checkpoint before step 60
    proc.kill()
    proc.wait()
    assert not (workdir / "checkpoints").exists() or not _saved_steps(workdir)
    first = (workdir / "metrics.jsonl").read_text()
    rerun = run(args)
    return workdir, first, rerun.stdout


def test_kill_then_refused_override_then_resume_is_bitwise_identical(
        corpus, reference, reference_dir, tmp_path):
    """kill -9 mid-run; a shape-changing override then exits non-zero naming the leaves
    and the flag, moving nothing; the original command then resumes where it was and
    reproduces the uninterrupted run bitwise (losses, chunk keys, source mass)."""
    workdir = tmp_path / "run"
    log = tmp_path / "log.txt"
    proc = _start(_args(corpus, workdir), log)
    _wait_for(log, "step 5/8", proc)           # checkpoint 4 exists, step 8's does not
    proc.kill()                                # SIGKILL: no chance to save
    proc.wait()
    assert _saved_steps(workdir) == [4], log.read_text()[-2000:]
    # Step 5's key rows reached disk (flushed at its log step) past checkpoint 4.
    assert _key_rows(workdir)["steps"].max() >= 5

    listing = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    config_json = (workdir / "config.json").read_text()
    bad = run(_args(corpus, workdir, **{"model.d_model": 64}), check=False)
    assert bad.returncode != 0
    assert "--config.model.d_model=64 (checkpoint: 32)" in bad.stderr, bad.stderr[-3000:]
    # The blocks are one scanned stack: tiny.py's 2 layers lead every block leaf's shape.
    assert "mlp.gate: shape (2, 32, 64) saved vs (2, 64, 64) wanted" in bad.stderr, \
        bad.stderr[-3000:]
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == listing
    assert (workdir / "config.json").read_text() == config_json
    # the same shapes, another data order: the saved iterator position would skip or repeat
    reordered = run(_args(corpus, workdir, **{"data.shuffle_seed": 7}), check=False)
    assert reordered.returncode != 0
    assert "data.shuffle_seed: saved 0, now 7" in reordered.stderr, reordered.stderr[-3000:]
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == listing
    assert (workdir / "config.json").read_text() == config_json

    resumed = run(_args(corpus, workdir))
    assert "resumed from step 4" in resumed.stdout, resumed.stdout[-2000:]
    got = losses(workdir)
    assert sorted(got) == list(range(1, 9))
    assert got == reference                    # float equality: bitwise
    # The key store holds every chunk id exactly as often as the uninterrupted run's,
    # logged at the same steps with the same keys.
    want, have = _key_rows(reference_dir), _key_rows(workdir)
    assert len(want["ids"]) > 8 * 4 and len(np.unique(want["ids"])) > 8
    np.testing.assert_array_equal(have["ids"], want["ids"])
    np.testing.assert_array_equal(have["steps"], want["steps"])
    np.testing.assert_array_equal(have["keys"], want["keys"])
    assert sorted(np.unique(have["steps"]).tolist()) == list(range(1, 9))
    # The concept x source mass is checkpointed with the rest: resumed == uninterrupted.
    mass = restore_source_mass(workdir)
    assert mass.sum() > 0
    np.testing.assert_array_equal(mass, restore_source_mass(reference_dir))


def test_corrupted_latest_checkpoint_falls_back(reference_dir, corpus, reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference_dir, workdir)   # an uninterrupted run's checkpoints 4 and 8
    # Damage step 8: truncate every array file of its params.
    for f in (workdir / "checkpoints" / "8" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "d" in f.parent.name:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    proc = run(_args(corpus, workdir))
    out = proc.stdout + proc.stderr
    assert "checkpoint step 8" in out and "could not be restored" in out, out[-3000:]
    assert "resumed from step 4" in proc.stdout
    assert losses(workdir) == reference


def test_sigterm_saves_and_exits_zero(corpus, long_reference, tmp_path):
    """SIGTERM goes through JAX's preemption service, which agrees on a save step a
    little later (it runs asynchronously), so this run is long enough to reach it."""
    workdir = tmp_path / "run"
    log = tmp_path / "log.txt"
    proc = _start(_args(corpus, workdir, **_LONG), log)
    _wait_for(log, "step 3/60", proc)
    proc.terminate()
    rc = proc.wait(timeout=120)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert "preemption notice (SIGTERM): all 1 processes saved step" in text, text[-3000:]
    saved = _saved_steps(workdir)
    assert len(saved) == 1 and 3 <= saved[0] < 60, saved
    resumed = run(_args(corpus, workdir, **_LONG))
    assert f"resumed from step {saved[0]}" in resumed.stdout
    assert losses(workdir) == losses(long_reference[0])


def test_fresh_start_keeps_metrics_of_a_run_killed_before_its_first_checkpoint(long_reference):
    workdir, first, rerun_stdout = long_reference
    assert first.strip()
    assert "kept the earlier metrics.jsonl" in rerun_stdout, rerun_stdout[-2000:]
    kept = [p for p in workdir.glob("metrics.jsonl.*")]
    assert len(kept) == 1 and kept[0].read_text() == first
    assert sorted(losses(workdir)) == list(range(1, 61))
