"""An offline stand-in for a gs:// bucket (pytest fixture ``bucket``).

fsspec's "gs"/"gcs" protocols (what epath and TensorBoard's gfile use for gs://
without TensorFlow) are pointed at a local folder, ``<tmp_path>/bucket_root``:
``gs://b/x`` is ``bucket_root/b/x``. The working directory is ``tmp_path``, so a
plain open() of "gs://..." would show up there as a folder named "gs:".
"""

import os

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem


def register_fake_gcs(root) -> None:
    """Points fsspec's gs:// and gcs:// at the local folder ``root`` (gs://b/x <-> root/b/x);
    also used by subprocess scripts that import this module."""
    root = str(root)

    class FakeGCS(LocalFileSystem):
        protocol = ("gs", "gcs")

        def __init__(self, *a, finalize_on_close=None, **kw):
            super().__init__(*a, **kw)

        @classmethod
        def _strip_protocol(cls, path):
            path = path[0] if isinstance(path, list) else path
            for p in ("gs://", "gcs://"):
                if str(path).startswith(p):
                    return os.path.join(root, str(path)[len(p):]).rstrip("/")
            return LocalFileSystem._strip_protocol(path)

        def unstrip_protocol(self, name):
            return "gs://" + os.path.relpath(name, root)

    for proto in ("gs", "gcs"):
        fsspec.register_implementation(proto, FakeGCS, clobber=True)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    root = tmp_path / "bucket_root"
    root.mkdir()
    register_fake_gcs(root)
    from etils.epath import backend
    backend.fsspec_backend._get_filesystem.cache_clear()
    monkeypatch.chdir(tmp_path)
    yield root
    backend.fsspec_backend._get_filesystem.cache_clear()
