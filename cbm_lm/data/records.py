"""The document record stored in ArrayRecord shards, and 64-bit id layout.

One record = one document:

    tokens        int32 [L]        token ids of the whole document
    chunk_bounds  int32 [n+1]      chunk i covers tokens[chunk_bounds[i]:chunk_bounds[i+1]]
    chunk_concepts int32 [n, K]    concept ids of each chunk, -1 padded
    chunk_ids     int64 [n]        global chunk ids (see ``make_id``)
    token_spans   int32 [m, 3]     token-level labels (start, end, concept id),
                                   end exclusive, in document token coordinates
    header: source_id, doc_id (int64), doc_key (str, the input's id)

Bytes layout (deterministic, little-endian): ``b"CBMR"``, u32 header length,
JSON header (sorted keys, with dtype/shape of each array), then the raw
array bytes in header order.

Ids: ``id = split << 56 | shard << 36 | index`` where split is 0 (train) or 1
(heldout), shard < 2**20 and index < 2**36 is the position of the chunk (or
document) within its shard. Ids are unique, deterministic, non-negative and
decode to the shard that holds them (``split_id``).
"""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np

MAGIC = b"CBMR"
SPLITS = ("train", "heldout")
_SHARD_BITS, _INDEX_BITS = 20, 36

_ARRAYS = (
    ("tokens", np.int32, 1),
    ("chunk_bounds", np.int32, 1),
    ("chunk_concepts", np.int32, 2),
    ("chunk_ids", np.int64, 1),
    ("token_spans", np.int32, 2),
)


def make_id(split: int, shard: int, index: int) -> int:
    """64-bit id of the ``index``-th chunk/document of ``shard`` in ``split``."""
    if not (0 <= shard < 2**_SHARD_BITS and 0 <= index < 2**_INDEX_BITS
            and 0 <= split < 2**7):
        raise ValueError(f"id out of range: split={split} shard={shard} index={index}")
    return (split << (_SHARD_BITS + _INDEX_BITS)) | (shard << _INDEX_BITS) | index


def split_id(i: int) -> tuple[int, int, int]:
    """Inverse of ``make_id``: (split, shard, index)."""
    i = int(i)
    return (i >> (_SHARD_BITS + _INDEX_BITS), (i >> _INDEX_BITS) & (2**_SHARD_BITS - 1),
            i & (2**_INDEX_BITS - 1))


@dataclasses.dataclass
class DocumentRecord:
    tokens: np.ndarray
    chunk_bounds: np.ndarray
    chunk_concepts: np.ndarray
    chunk_ids: np.ndarray
    token_spans: np.ndarray
    source_id: int
    doc_id: int
    doc_key: str = ""

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_bounds) - 1

    def validate(self, where: str = "record") -> None:
        """Raises ValueError if the arrays are inconsistent."""
        n, L = self.num_chunks, len(self.tokens)
        problems = []
        if n < 1 or self.chunk_bounds[0] != 0 or self.chunk_bounds[-1] != L:
            problems.append(f"chunk_bounds must run 0..{L}, got {self.chunk_bounds.tolist()[:8]}")
        elif np.any(np.diff(self.chunk_bounds) <= 0):
            problems.append("chunk_bounds must be strictly increasing")
        if self.chunk_concepts.shape[0] != n or self.chunk_ids.shape != (n,):
            problems.append(f"{n} chunks but chunk_concepts {self.chunk_concepts.shape}, "
                            f"chunk_ids {self.chunk_ids.shape}")
        if self.token_spans.size and (self.token_spans[:, 0].min() < 0
                                      or self.token_spans[:, 1].max() > L):
            problems.append("token_spans outside the document")
        if problems:
            raise ValueError(f"{where}: invalid document record: {'; '.join(problems)}")


def encode(rec: DocumentRecord) -> bytes:
    """Serializes a record to deterministic bytes."""
    header = {"source_id": int(rec.source_id), "doc_id": int(rec.doc_id),
              "doc_key": rec.doc_key, "arrays": []}
    blobs = []
    for name, dtype, ndim in _ARRAYS:
        a = np.ascontiguousarray(getattr(rec, name), dtype=np.dtype(dtype).newbyteorder("<"))
        if a.ndim != ndim:
            raise ValueError(f"{name}: expected {ndim}-d array, got shape {a.shape}")
        header["arrays"].append([name, list(a.shape)])
        blobs.append(a.tobytes())
    h = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<I", len(h)), h, *blobs])


def decode(data: bytes, where: str = "record") -> DocumentRecord:
    """Parses bytes written by ``encode``; raises ValueError naming ``where``."""
    try:
        if data[:4] != MAGIC:
            raise ValueError(f"bad magic {bytes(data[:4])!r}, expected {MAGIC!r}")
        (hlen,) = struct.unpack_from("<I", data, 4)
        header = json.loads(bytes(data[8:8 + hlen]))
        off, arrays = 8 + hlen, {}
        for (name, dtype, _), (hname, shape) in zip(_ARRAYS, header["arrays"], strict=True):
            assert name == hname, (name, hname)
            count = int(np.prod(shape))
            nbytes = count * np.dtype(dtype).itemsize
            if off + nbytes > len(data):
                raise ValueError(f"truncated: array {name} needs {nbytes} bytes at {off}, "
                                 f"record has {len(data)}")
            arrays[name] = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"),
                                         count=count, offset=off).reshape(shape)
            off += nbytes
        return DocumentRecord(source_id=header["source_id"], doc_id=header["doc_id"],
                              doc_key=header.get("doc_key", ""), **arrays)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(f"{where}: cannot decode document record: {e}") from e
