"""Two JAX processes on localhost (CPU collectives over gloo).

1. With process_split=rows they train and reach the same losses as one process
   with the same global batch.
2. With process_split=documents their shares of the held-out split pack into
   different numbers of eval batches (5 and 4 here); eval runs the agreed
   minimum, so the per-batch collective cannot hang. SIGTERM sent to one
   process only is agreed through JAX's preemption service: both save the
   same step and exit 0, and the same command resumes from it.

Both tests train one configuration (only process_split differs, which the compiled
programs do not see), so the two-process step compiles once for the module
(the persistent compilation cache, tests/conftest.py).
"""

import json
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from train_fixtures import env, losses, run, tiny_corpus, train_args

pytestmark = pytest.mark.slow

STEPS = 20   # room for the preemption service to agree on a step (3 steps after SIGTERM seen)
_CONFIG = {"train.num_steps": STEPS, "mesh.data": -1, "data.seq_len": 16,
           "train.eval_batches": 100, "checkpoint.every_steps": 1000}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory.mktemp("corpus"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(corpus, workdir, overrides, logs):
    port = _free_port()
    procs = []
    for i, log in enumerate(logs):
        procs.append(subprocess.Popen(
            train_args(corpus, workdir, **overrides)
            + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
               f"--process_id={i}"],
            env=env(devices=1), stdout=log, stderr=subprocess.STDOUT, text=True))
    return procs


def test_two_processes_match_one(corpus, tmp_path):
    overrides = {**_CONFIG, "data.process_split": "rows", "train.eval_every": 0}
    single = tmp_path / "single"
    run(train_args(corpus, single, **overrides))

    multi = tmp_path / "multi"
    procs = _start(corpus, multi, overrides, [subprocess.PIPE, subprocess.PIPE])
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        outs.append(out)
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
    assert f"step {STEPS}/{STEPS}" in outs[0]
    want, got = losses(single), losses(multi)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [want[s] for s in (1, 2, 3)],
                               rtol=2e-5)
    # Each process saved its own data-iterator state into the shared checkpoint.
    data_dir = multi / "checkpoints" / str(STEPS) / "data"
    assert sorted(p.name for p in data_dir.glob("process_*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]


def test_uneven_eval_and_sigterm_to_one_process(corpus, tmp_path):
    workdir = tmp_path / "run"
    overrides = {**_CONFIG, "data.process_split": "documents", "train.eval_every": 2}
    paths = [tmp_path / f"log{i}.txt" for i in range(2)]
    files = [open(p, "w") for p in paths]
    procs = _start(corpus, workdir, overrides, files)
    try:
        deadline = time.time() + 900
        while f"step 2/{STEPS}" not in paths[0].read_text():   # one eval has run
            assert time.time() < deadline, paths[0].read_text()[-3000:]
            assert all(p.poll() is None for p in procs), paths[0].read_text()[-3000:]
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGTERM)           # one host gets the notice
        rcs = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in files:
            f.close()
    texts = [p.read_text() for p in paths]
    assert rcs == [0, 0], texts[0][-3000:] + texts[1][-3000:]
    # The two shares of the held-out split differ; eval ran the agreed minimum.
    assert "eval: 4 batches per process" in texts[0] and "[5, 4]" in texts[0], texts[0][-3000:]
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_lm_loss" in r for r in records)
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and saved[0] < STEPS, saved   # one agreed step, saved by both
    step = saved[0]
    assert all(f"all 2 processes saved step {step}" in t for t in texts), texts[1][-3000:]
    assert sorted(p.name for p in (workdir / "checkpoints" / str(step) / "data").glob("*.json")) \
        == ["process_0-of-2.json", "process_1-of-2.json"]

    # The same command resumes from the agreed step and finishes the run.
    files = [open(p, "w") for p in paths]
    procs = _start(corpus, workdir, overrides, files)
    rcs = [p.wait(timeout=300) for p in procs]
    for f in files:
        f.close()
    texts = [p.read_text() for p in paths]
    assert rcs == [0, 0], texts[0][-3000:] + texts[1][-3000:]
    assert f"resumed from step {step}" in texts[0]
    assert sorted(losses(workdir)) == list(range(1, STEPS + 1))
