"""The key store: (global chunk id, key, step) rows beside the checkpoints.

Layout (one file set per process, so processes never write the same file):

  STORE/p<process:05d>/seg-<first_step:010d>-<last_step:010d>-<n:08d>-<seq:08d>.npz
      ids    int64   [n]      global chunk ids (cbm_lm.data.records.make_id)
      keys   float32 [n,d_p]  unit keys
      steps  int64   [n]      the train step that logged the row (0 for re-keyed rows)

``seq`` numbers a directory's segments in the order they were written (one more
than the highest on disk): steps and row count alone do not name a segment
uniquely, since re-keying and the gradient reference log every row at step 0 and
so write many equal-sized step-0 segments. A segment is never overwritten (a
write onto an existing name is refused). Stores written before ``seq`` existed
(``seg-<first>-<last>-<n>.npz``) are read as they are, ordered before any
segment of the same steps that has one.

Segments are immutable numpy files: an append is a new segment written to a
temporary name and renamed (atomic on local disks; object stores commit an
object whole). ArrayRecord and tensorstore cannot cheaply drop a tail, and
dropping a tail is what resume needs: the cursor of a process's store is the
checkpoint step, and ``truncate_after(step)`` deletes every row logged after
it (whole segments, or a rewritten straddling segment), so the steps redone
after ``kill -9`` + resume log their chunks exactly once.
"""

from __future__ import annotations

import io
import os
import re
from typing import Iterator

import numpy as np
from etils import epath

_SEG = re.compile(r"seg-(\d{10})-(\d{10})-(\d{8})(?:-(\d{8,}))?\.npz$")


def _parse(name: str) -> tuple[int, int, int, int]:
    """(first step, last step, rows, seq) of a segment name; seq -1 for old-style names."""
    first, last, n, seq = _SEG.search(name).groups()
    return int(first), int(last), int(n), -1 if seq is None else int(seq)


def next_seq(directory) -> int:
    """One more than the highest segment sequence number in ``directory`` (0 when none)."""
    return 1 + max((_parse(p.name)[3] for p in segments(directory)), default=-1)


def process_dir(store, process_index: int) -> epath.Path:
    return epath.Path(store) / f"p{process_index:05d}"


def _write_segment(directory: epath.Path, ids, keys, steps, seq: int) -> epath.Path:
    """Writes one segment as sequence number ``seq``; refuses to replace an existing one."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"seg-{int(steps[0]):010d}-{int(steps[-1]):010d}-{len(ids):08d}-{seq:08d}.npz"
    final = directory / name
    if final.exists():
        raise FileExistsError(f"{final}: key-store segment exists; segments are never "
                              f"overwritten (is another writer appending to {directory}?)")
    buf = io.BytesIO()
    np.savez(buf, ids=np.asarray(ids, np.int64), keys=np.asarray(keys, np.float32),
             steps=np.asarray(steps, np.int64))
    tmp = directory / (name + f".tmp{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(final)
    return final


def _read_segment(path: epath.Path) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as z:
            out = {k: z[k] for k in ("ids", "keys", "steps")}
    except Exception as e:  # noqa: BLE001 - re-raised naming the file
        raise ValueError(f"{path}: unreadable key-store segment ({e}); expected an .npz with "
                         "ids, keys, steps") from e
    n = len(out["ids"])
    if out["keys"].ndim != 2 or len(out["keys"]) != n or len(out["steps"]) != n:
        raise ValueError(f"{path}: inconsistent segment (ids {out['ids'].shape}, keys "
                         f"{out['keys'].shape}, steps {out['steps'].shape})")
    return out


def segments(directory) -> list[epath.Path]:
    """A process directory's segments in step order (temporary files skipped)."""
    d = epath.Path(directory)
    if not d.exists():
        return []
    segs = [p for p in d.iterdir() if _SEG.search(p.name)]
    return sorted(segs, key=_order)


def _order(path: epath.Path) -> tuple[int, int, int, int]:
    """Steps first, then write order (seq) among segments of the same steps."""
    first, last, n, seq = _parse(path.name)
    return first, last, seq, n


def row_count(directory) -> int:
    """Rows in a process directory's segments, from their names (nothing is read)."""
    return sum(_parse(p.name)[2] for p in segments(directory))


class KeyStoreWriter:
    """Buffers one process's rows and appends them as segments.

    ``add`` buffers; ``flush`` writes the buffer as one segment (call it before
    a checkpoint is saved, so the checkpoint's step covers only written rows);
    a full buffer (``flush_rows``) flushes itself.
    """

    def __init__(self, store, process_index: int, flush_rows: int = 1 << 16):
        self.dir = process_dir(store, process_index)
        self.flush_rows = flush_rows
        self._ids, self._keys, self._steps = [], [], []
        self._n = 0
        self._seq: int | None = None    # the next segment's; read from the directory first

    def add(self, ids: np.ndarray, keys: np.ndarray, step: int) -> None:
        ids = np.asarray(ids, np.int64)
        if not len(ids):
            return
        self._ids.append(ids)
        self._keys.append(np.asarray(keys, np.float32))
        self._steps.append(np.full(len(ids), step, np.int64))
        self._n += len(ids)
        if self._n >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not self._n:
            return
        if self._seq is None:
            self._seq = next_seq(self.dir)
        _write_segment(self.dir, np.concatenate(self._ids), np.concatenate(self._keys),
                       np.concatenate(self._steps), self._seq)
        self._seq += 1
        self._ids, self._keys, self._steps, self._n = [], [], [], 0

    def truncate_after(self, step: int) -> int:
        """Deletes this process's rows logged after ``step``; returns how many."""
        self._ids, self._keys, self._steps, self._n = [], [], [], 0
        self._seq = None                # truncation may write a segment of its own
        return truncate_after(self.dir, step)


def truncate_after(directory, step: int) -> int:
    """Drops rows with steps > ``step`` from a process directory; returns how many.

    A straddling segment is rewritten (new file first, then the old one
    removed), so a crash inside this function loses no row <= step.
    """
    dropped = 0
    d = epath.Path(directory)
    if d.exists():
        for tmp in [p for p in d.iterdir() if ".tmp" in p.name]:
            tmp.unlink()
    seq = next_seq(directory)
    for seg in segments(directory):
        first, last, n, _ = _parse(seg.name)
        if first > step:
            seg.unlink()
            dropped += n
        elif last > step:
            rows = _read_segment(seg)
            keep = rows["steps"] <= step
            _write_segment(d, rows["ids"][keep], rows["keys"][keep], rows["steps"][keep], seq)
            seq += 1
            seg.unlink()
            dropped += int((~keep).sum())
    return dropped


def iter_segments(store) -> Iterator[dict[str, np.ndarray]]:
    """Every segment of every process under ``store``."""
    root = epath.Path(store)
    if not root.exists():
        return
    for pdir in sorted(p for p in root.iterdir() if p.name.startswith("p")):
        for seg in segments(pdir):
            yield _read_segment(seg)


def read_store(store) -> dict[str, np.ndarray]:
    """All rows of a store: ids [N], keys [N,d_p], steps [N] (process, then step order)."""
    parts = list(iter_segments(store))
    if not parts:
        raise FileNotFoundError(f"{store}: empty key store (no p*/seg-*.npz segments)")
    return {k: np.concatenate([p[k] for p in parts]) for k in ("ids", "keys", "steps")}


def latest_keys(rows: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One key per chunk id: the one logged at the latest step. Returns (ids, keys)."""
    order = np.lexsort((rows["steps"], rows["ids"]))
    ids = rows["ids"][order]
    last = np.ones(len(ids), bool)
    last[:-1] = ids[1:] != ids[:-1]
    return ids[last], rows["keys"][order][last]
