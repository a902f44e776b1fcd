"""The trainer's own files reach a gs:// workdir through etils.epath (issue 12 item 4).

Offline stand-in for a bucket: fsspec's "gs"/"gcs" protocols (what epath and
TensorBoard's gfile use for gs:// without TensorFlow) are pointed at a local
folder. Truth: the files land in that folder, and no local folder named
"gs:" appears (what plain open() did). Orbax writes the checkpoint arrays
through TensorStore's own GCS driver, which needs a real bucket: not tested here.
"""

import json
import os

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from cbm_lm.default_config import base_config
from cbm_lm.train.checkpoint import read_config, write_config
from cbm_lm.train.loop import _set_aside_metrics, _truncate_metrics
from cbm_lm.train.metrics import MetricsLogger


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    root = tmp_path / "bucket_root"
    root.mkdir()

    class FakeGCS(LocalFileSystem):
        """gs://b/x <-> ROOT/b/x."""
        protocol = ("gs", "gcs")

        def __init__(self, *a, finalize_on_close=None, **kw):
            super().__init__(*a, **kw)

        @classmethod
        def _strip_protocol(cls, path):
            path = path[0] if isinstance(path, list) else path
            for p in ("gs://", "gcs://"):
                if str(path).startswith(p):
                    return str(root / str(path)[len(p):]).rstrip("/")
            return LocalFileSystem._strip_protocol(path)

        def unstrip_protocol(self, name):
            return "gs://" + os.path.relpath(name, root)

    for proto in ("gs", "gcs"):
        fsspec.register_implementation(proto, FakeGCS, clobber=True)
    from etils.epath import backend
    backend.fsspec_backend._get_filesystem.cache_clear()
    monkeypatch.chdir(tmp_path)
    yield root
    backend.fsspec_backend._get_filesystem.cache_clear()


def test_run_files_go_to_the_bucket(bucket, tmp_path):
    from etils import epath
    workdir = "gs://my-bucket/run"
    logger = MetricsLogger(workdir, total_steps=3)
    for step in (1, 2, 3):
        logger.write(step, {"loss": 1.0 / step})
    logger.close()
    write_config(workdir, base_config())

    local = bucket / "my-bucket" / "run"
    lines = (local / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3]
    assert read_config(workdir).model.d_model == base_config().model.d_model
    assert list((local / "tensorboard").glob("events.out.tfevents.*"))
    assert not (tmp_path / "gs:").exists()

    _truncate_metrics(epath.Path(workdir) / "metrics.jsonl", 2)
    assert [json.loads(l)["step"] for l in (local / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2]
    _set_aside_metrics(epath.Path(workdir) / "metrics.jsonl")
    kept = list(local.glob("metrics.jsonl.*"))
    assert len(kept) == 1 and not (local / "metrics.jsonl").exists()
    assert not (tmp_path / "gs:").exists()
