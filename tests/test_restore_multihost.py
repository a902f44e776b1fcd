"""Restore fallback is collective across processes (DESIGN.md section 6).

Two JAX processes on localhost (CPU collectives over gloo, as in
test_train_multihost.py) save steps 2 and 4; then the same run is resumed with a
read error injected into process 1's read of step 4's params only (a transient
failure on one host: process 0 reads step 4 fine). Truth: both processes must
resume from the same step (2), step 4 is set aside once, by process 0, after
both restored step 2, and the run finishes with the losses of the uninterrupted
run. Before the fix, process 1 fell back to step 2 alone while process 0 resumed
from step 4 and process 1 then waited in a barrier process 0 never reached: a
mixed state, then a hang until the distributed runtime aborted both (rc -6; the
timeout below bounds it either way).

The failure is injected by a wrapper script (written by this test) that patches
orbax's StandardCheckpointHandler.restore in the trainer subprocess before it
runs launch/train.py; the library has no test hook.
"""

import shutil
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from train_fixtures import env, losses, tiny_corpus, train_args

pytestmark = pytest.mark.slow

_CONFIG = {"mesh.data": -1, "data.seq_len": 16, "data.process_split": "rows",
           "train.eval_every": 0, "checkpoint.every_steps": 2, "checkpoint.keep": 3}

_WRAPPER = """\
import runpy, sys
import jax
import orbax.checkpoint as ocp

_restore = ocp.StandardCheckpointHandler.restore

def _flaky_restore(self, directory, *args, **kwargs):
    parts = str(directory).rstrip("/").split("/")
    if jax.process_index() == {process} and parts[-2:] == ["{step}", "params"]:
        raise OSError("injected transient read error on process {process}")
    return _restore(self, directory, *args, **kwargs)

ocp.StandardCheckpointHandler.restore = _flaky_restore
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two(args, logs, timeout, wrapper=None):
    """Runs `args` as processes 0 and 1; returns their exit codes and outputs."""
    port = _free_port()
    files = [open(log, "w") for log in logs]
    procs = []
    try:
        for i, f in enumerate(files):
            cmd = args + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                          f"--process_id={i}"]
            if wrapper is not None:            # python WRAPPER launch/train.py ...
                cmd = [sys.executable, str(wrapper)] + cmd[1:]
            procs.append(subprocess.Popen(cmd, env=env(devices=1), stdout=f,
                                          stderr=subprocess.STDOUT, text=True))
        rcs = [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        rcs = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in files:
            f.close()
    texts = [log.read_text() for log in logs]
    assert rcs == [0, 0], (f"exit codes {rcs} (None: hung past {timeout} s)\n--- process 0:\n"
                           f"{texts[0][-3000:]}\n--- process 1:\n{texts[1][-3000:]}")
    return texts


def test_one_process_failing_to_read_newest_step_moves_all_to_an_older_one(tmp_path):
    corpus = tiny_corpus(tmp_path / "corpus")
    workdir = tmp_path / "run"
    logs = [tmp_path / f"log{i}.txt" for i in range(2)]

    args = train_args(corpus, workdir, **_CONFIG, **{"train.num_steps": 6})
    _run_two(args, logs, 300)
    ckpts = workdir / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [2, 4, 6]
    first = losses(workdir)
    shutil.rmtree(ckpts / "6")          # as if killed after step 4 was saved

    wrapper = tmp_path / "flaky_train.py"
    wrapper.write_text(textwrap.dedent(_WRAPPER).format(process=1, step=4))
    texts = _run_two(args, logs, 120, wrapper=wrapper)   # the same command, resumed

    # Both processes took the step every process could read, not each its own newest.
    for i, text in enumerate(texts):
        assert "resumed from step 2" in text, f"process {i}:\n{text[-3000:]}"
        assert "resumed from step 4" not in text, f"process {i}:\n{text[-3000:]}"
    assert "injected transient read error on process 1" in texts[1], texts[1][-3000:]
    assert "process(es) [1] could not read it" in texts[0], texts[0][-3000:]
    # Step 4 was set aside once (by process 0), and redone; step 2 (restored) stays.
    assert [p.name.split("-")[0] for p in (workdir / "quarantine").iterdir()] == ["4"]
    assert "moved unreadable checkpoint step 4" in texts[0]
    assert "moved unreadable checkpoint step 4" not in texts[1]
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [2, 4, 6]
    # Steps 3-6, redone from step 2, retrace the first run's: one consistent state on both
    # processes (process 0 training on from step 4 would log no step 3 at all).
    got = losses(workdir)
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in range(3, 7)], [first[s] for s in range(3, 7)],
                               rtol=1e-5)
