"""Atomic file writes through etils.epath, so outputs reach gs:// as well as local disks.

A file is written under a temporary sibling name and renamed into place, so a
reader never sees half a file and a failed write leaves the old file intact.
"""

from __future__ import annotations

import io
import os

from etils import epath


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> epath.Path:
    """Writes ``data`` to ``path`` (parents created) via ``path.tmp.PID`` + rename."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.name}.tmp.{os.getpid()}"
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_npy_atomic(path: str | os.PathLike, a) -> epath.Path:
    """``write_bytes_atomic`` of the .npy of array ``a`` (no pickles)."""
    import numpy as np
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return write_bytes_atomic(path, buf.getvalue())


def write_text_atomic(path: str | os.PathLike, text: str) -> epath.Path:
    """``write_bytes_atomic`` for UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def replace_dir_atomically(out: str | os.PathLike, write) -> epath.Path:
    """Runs ``write(tmp_dir)`` on a sibling temporary directory, then swaps it in for ``out``.

    A failure leaves ``out`` as it was; an existing ``out`` is replaced only once
    the new directory is complete (renamed aside, the new one renamed in, the old
    one removed). ``write`` receives the temporary directory as a str.
    """
    out = epath.Path(out)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        tmp.rmtree()
    try:
        write(str(tmp))
    except BaseException:
        if tmp.exists():
            tmp.rmtree()
        raise
    return swap_dir_in(tmp, out)


def swap_dir_in(tmp: str | os.PathLike, out: str | os.PathLike) -> epath.Path:
    """Moves the complete directory ``tmp`` to ``out``, replacing any ``out``.

    The second half of ``replace_dir_atomically``, for a directory that several
    processes wrote (each its own files) before one of them swaps it in: the old
    ``out`` is renamed aside, ``tmp`` renamed in, then the old one removed; when
    the rename in fails the old one is put back and ``tmp`` removed.
    """
    tmp, out = epath.Path(tmp), epath.Path(out)
    old = out.parent / f"{out.name}.old-{os.getpid()}"
    if out.is_dir():
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old.exists() and not out.exists():      # put the previous one back
            old.rename(out)
        if tmp.exists():
            tmp.rmtree()
        raise
    if old.exists():
        old.rmtree()
    return out
