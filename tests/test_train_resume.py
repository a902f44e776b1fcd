"""Resume: kill -9 mid-run, restart, and the losses from the resume point on
are bitwise identical to an uninterrupted run (data order included). A
corrupted newest checkpoint falls back to the previous one, saying so."""

import pathlib
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


def _args(corpus, workdir, **overrides):
    return train_args(corpus, workdir, **{**_KEYS, **overrides})


def _key_rows(workdir):
    """The logged store's rows sorted by (step, chunk id): ids, steps, keys."""
    rows = read_store(workdir / "provenance" / "keys" / "logged")
    order = np.lexsort((rows["ids"], rows["steps"]))
    return {k: v[order] for k, v in rows.items()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference_dir(corpus, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    run(_args(corpus, workdir))
    return workdir


@pytest.fixture(scope="module")
def reference(reference_dir):
    return losses(reference_dir)


def _wait_for(path: pathlib.Path, text: str, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early:\n{path.read_text()}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {text!r}")


def test_kill_and_resume_is_bitwise_identical(corpus, reference, reference_dir, tmp_path):
    workdir = tmp_path / "run"
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(_args(corpus, workdir), env=env(), stdout=f,
                                stderr=subprocess.STDOUT)
        _wait_for(log, "step 5/8", proc)       # checkpoints exist at steps 2 and 4
        proc.kill()                            # SIGKILL: no chance to save
        proc.wait()
    # Step 5's key rows reached disk (flushed at its log step) past checkpoint 4.
    assert _key_rows(workdir)["steps"].max() >= 5
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


def test_sigterm_saves_and_exits_zero(corpus, tmp_path):
    """SIGTERM goes through JAX's preemption service, which agrees on a save step a
    little later (it runs asynchronously), so this run is long enough to reach it."""
    long = {"checkpoint.every_steps": 1000, "train.num_steps": 60}
    reference = tmp_path / "reference"
    run(_args(corpus, reference, **long))
    workdir = tmp_path / "run"
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(_args(corpus, workdir, **long),
                                env=env(), stdout=f, stderr=subprocess.STDOUT)
        _wait_for(log, "step 3/60", proc)
        proc.terminate()
        rc = proc.wait(timeout=120)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert "preemption notice (SIGTERM): all 1 processes saved step" in text, text[-3000:]
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and 3 <= saved[0] < 60, saved
    resumed = run(_args(corpus, workdir, **long))
    assert f"resumed from step {saved[0]}" in resumed.stdout
    assert losses(workdir) == losses(reference)


def test_corrupted_latest_checkpoint_falls_back(corpus, reference, tmp_path):
    workdir = tmp_path / "run"
    run(_args(corpus, workdir, **{"train.num_steps": 8}))
    # Damage step 8: truncate every array file of its params.
    for f in (workdir / "checkpoints" / "8" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "d" in f.parent.name:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    proc = run(_args(corpus, workdir, **{"train.num_steps": 8}))
    out = proc.stdout + proc.stderr
    assert "checkpoint step 8" in out and "could not be restored" in out, out[-3000:]
    assert "resumed from step 6" in proc.stdout
    assert losses(workdir) == reference


def test_refused_override_then_original_command_resumes(corpus, reference, tmp_path):
    """A shape-changing override exits non-zero naming the leaves and the flag, moves
    nothing, and the original command then resumes where it was with its metrics kept."""
    workdir = tmp_path / "run"
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(_args(corpus, workdir), env=env(), stdout=f,
                                stderr=subprocess.STDOUT)
        _wait_for(log, "step 5/8", proc)       # checkpoints exist at steps 2 and 4
        proc.kill()
        proc.wait()
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
    resumed = run(_args(corpus, workdir))
    assert "resumed from step 4" in resumed.stdout, resumed.stdout[-2000:]
    assert losses(workdir) == reference


def test_fresh_start_keeps_metrics_of_a_run_killed_before_its_first_checkpoint(corpus, tmp_path):
    workdir = tmp_path / "run"
    log = tmp_path / "log.txt"
    args = _args(corpus, workdir, **{"checkpoint.every_steps": 100, "train.num_steps": 4})
    with open(log, "w") as f:
        proc = subprocess.Popen(args, env=env(), stdout=f, stderr=subprocess.STDOUT)
        _wait_for(log, "step 2/4", proc)       # no checkpoint yet
        proc.kill()
        proc.wait()
    first = (workdir / "metrics.jsonl").read_text()
    assert first.strip()
    rerun = run(args)
    assert "kept the earlier metrics.jsonl" in rerun.stdout, rerun.stdout[-2000:]
    kept = [p for p in workdir.glob("metrics.jsonl.*")]
    assert len(kept) == 1 and kept[0].read_text() == first
    assert sorted(losses(workdir)) == [1, 2, 3, 4]
