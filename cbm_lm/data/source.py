# Kept instead of grain.sources.ArrayRecordDataSource: that source holds one open reader per
# shard for its lifetime (no bound), while a corpus may have thousands of shards.
"""Random access over many ArrayRecord shards, opening few at a time.

``ShardedArrayRecordSource`` is a grain ``RandomAccessDataSource`` of decoded
``DocumentRecord``s. Record counts come from the manifest, so construction
opens nothing; readers are opened on first use and kept in an LRU of at most
``max_open`` (thousands of shards never mean thousands of open files). A shard
whose record count differs from the manifest, or a record that fails to read
or decode, raises an error naming the shard file and record index. Remote
shards (``gs://...``) are copied to a local cache directory on first use,
since the ArrayRecord reader needs a local file; the cached copy is named by the
manifest's sha256 of the shard and checked against it when staged, so a corpus
rebuilt in place (same paths, new bytes) is never read from a stale copy.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import os
import tempfile
import threading
import uuid
from collections.abc import Sequence

from etils import epath

from cbm_lm.data import records, shards


class ShardRef(tuple):
    """``(path, records)`` of one shard (unpacks as that pair) with ``sha256``, the
    manifest's hash of the file (None when unknown); what ``Corpus.shards`` returns."""

    def __new__(cls, path: str, records: int, sha256: str | None = None):
        self = super().__new__(cls, (path, records))
        self.sha256 = sha256
        return self

    def __getnewargs__(self):
        return (*self, self.sha256)

    def __repr__(self) -> str:
        return f"ShardRef({self[0]!r}, {self[1]}, sha256={self.sha256!r})"


def _stage_local(path: str, cache_dir: str | None, sha256: str | None = None) -> str:
    """A local file holding the shard at ``path``: ``path`` itself when local, else a
    cached copy. With ``sha256`` (the manifest's) the copy is named by it and its bytes
    checked against it before it enters the cache; without, the copy is named by the path
    and a shard replaced in place is not noticed."""
    if shards.is_local(path):
        return path
    cache = epath.Path(cache_dir or os.path.join(tempfile.gettempdir(), "cbm_lm_shards"))
    cache.mkdir(parents=True, exist_ok=True)
    key = sha256[:32] if sha256 else hashlib.sha1(path.encode()).hexdigest()[:16]
    local = cache / f"{key}-{epath.Path(path).name}"
    if not local.exists():
        data = epath.Path(path).read_bytes()
        if sha256 and (got := hashlib.sha256(data).hexdigest()) != sha256:
            raise ValueError(f"{path}: sha256 {got} but the manifest says {sha256}; expected the "
                             "shard the manifest describes (was the corpus rebuilt or changed "
                             "since it was opened?)")
        # one temporary name per caller (grain's read threads share a pid); the rename is
        # atomic, and a second copy of the same bytes replacing the first is harmless
        part = local.with_name(f"{local.name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        part.write_bytes(data)
        os.replace(part, local)
    return os.fspath(local)


class ShardedArrayRecordSource:
    """``len`` = total records; ``src[i]`` = the i-th DocumentRecord in shard order."""

    def __init__(self, shard_list: Sequence[tuple], max_open: int = 64,
                 cache_dir: str | None = None):
        """``shard_list``: ``(path, records)`` pairs (``ShardRef``s carry the manifest's
        sha256, which remote shards are staged and checked by) or ``(path, records,
        sha256)`` triples."""
        self._shards = [(str(e[0]), int(e[1])) for e in shard_list]
        self._sha256 = [e[2] if len(e) > 2 else getattr(e, "sha256", None) for e in shard_list]
        self._starts = [0]
        for _, n in self._shards:
            self._starts.append(self._starts[-1] + n)
        self._max_open = max_open
        self._cache_dir = cache_dir
        self._init_runtime()

    def _init_runtime(self):
        self._readers: collections.OrderedDict = collections.OrderedDict()
        self._in_use = collections.Counter()     # reads in flight per open shard
        self._lock = threading.Lock()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items()
                if k not in ("_readers", "_in_use", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_runtime()

    def __len__(self) -> int:
        return self._starts[-1]

    def __repr__(self) -> str:
        return f"ShardedArrayRecordSource({len(self._shards)} shards, {len(self)} records)"

    def locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range 0..{len(self) - 1}")
        s = bisect.bisect_right(self._starts, index) - 1
        return s, index - self._starts[s]

    def _acquire(self, s: int):
        """The open reader of shard ``s``, counted in use until ``_release(s)``: the
        least recently used readers past ``max_open`` are closed only when no read
        holds them (grain reads from several threads)."""
        from array_record.python import array_record_module
        with self._lock:
            if s in self._readers:
                self._readers.move_to_end(s)
                self._in_use[s] += 1
                return self._readers[s]
        path, expected = self._shards[s]
        try:
            reader = array_record_module.ArrayRecordReader(
                _stage_local(path, self._cache_dir, self._sha256[s]), "readahead_buffer_size:0",
                file_reader_buffer_size=32768)
            n = reader.num_records()
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: cannot open shard ({e}); expected an ArrayRecord file with "
                             f"{expected} records (is it truncated?)") from e
        if n != expected:
            try:
                reader.close()
            except Exception:  # noqa: BLE001 - a truncated file may not even close cleanly
                pass
            raise ValueError(f"{path}: shard has {n} records but the manifest expects {expected}; "
                             "the shard is truncated or was replaced")
        with self._lock:
            if s in self._readers:             # another thread opened it meanwhile
                reader.close()
                self._readers.move_to_end(s)
            else:
                self._readers[s] = reader
            self._in_use[s] += 1
            self._evict()
            return self._readers[s]

    def _release(self, s: int) -> None:
        with self._lock:
            self._in_use[s] -= 1
            self._evict()

    def _evict(self) -> None:
        """Closes idle readers, oldest first, while more than max_open are open (lock held)."""
        for k in list(self._readers):
            if len(self._readers) <= self._max_open:
                return
            if self._in_use[k] == 0:
                self._readers.pop(k).close()

    def _read(self, s: int, positions: list[int]) -> list[records.DocumentRecord]:
        path = self._shards[s][0]
        reader = self._acquire(s)
        try:
            raw = reader.read(positions)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path} records {positions[:4]}: read failed ({e}); expected "
                             "intact records (is the shard truncated?)") from e
        finally:
            self._release(s)
        return [records.decode(b, f"{path} record {p}") for b, p in zip(raw, positions)]

    def __getitem__(self, index) -> records.DocumentRecord:
        s, pos = self.locate(int(index))
        return self._read(s, [pos])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[records.DocumentRecord]:
        by_shard = collections.defaultdict(list)
        for k, i in enumerate(indices):
            s, pos = self.locate(int(i))
            by_shard[s].append((pos, k))
        out = [None] * len(indices)
        for s, items in by_shard.items():
            for rec, (_, k) in zip(self._read(s, [p for p, _ in items]), items):
                out[k] = rec
        return out

    def close(self) -> None:
        with self._lock:
            for r in self._readers.values():
                r.close()
            self._readers.clear()


class Subset:
    """A source restricted to ``indices`` (e.g. the records of one source)."""

    def __init__(self, source, indices):
        self._source, self._indices = source, list(map(int, indices))

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i):
        return self._source[self._indices[int(i)]]

    def __getitems__(self, ids):
        return self._source.__getitems__([self._indices[int(i)] for i in ids])
