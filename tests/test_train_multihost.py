"""Two JAX processes on localhost (CPU collectives over gloo) train 3 steps and
reach the same losses as one process with the same global batch."""

import socket
import subprocess

import numpy as np
import pytest

from train_fixtures import env, losses, run, tiny_corpus, train_args

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    corpus = tiny_corpus(tmp_path / "corpus")
    overrides = {"train.num_steps": 3, "data.process_split": "rows", "mesh.data": -1,
                 "checkpoint.every_steps": 3}
    single = tmp_path / "single"
    run(train_args(corpus, single, **overrides))

    multi = tmp_path / "multi"
    port = _free_port()
    procs = [subprocess.Popen(
        train_args(corpus, multi, **overrides)
        + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        env=env(devices=1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        outs.append(out)
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
    assert "step 3/3" in outs[0]
    want, got = losses(single), losses(multi)
    assert sorted(got) == [1, 2, 3]
    np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [want[s] for s in (1, 2, 3)],
                               rtol=2e-5)
    # Each process saved its own data-iterator state into the shared checkpoint.
    data_dir = multi / "checkpoints" / "3" / "data"
    assert sorted(p.name for p in data_dir.glob("process_*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
