"""Writing one shard: sort its documents, assign 64-bit ids, write ArrayRecord.

A shard is ``<split>-<i:05d>-of-<n:05d>.array_record`` plus a sidecar
``.index.npy`` (structured array, one row per record: source_id, num_tokens,
num_chunks) that lets the training pipeline build per-source mixtures without
reading the records, and a ``.stats.json`` that the build folds into the
manifest and then deletes. Identical inputs give byte-identical files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections import Counter

import numpy as np
from etils import epath

from cbm_lm.data import records

INDEX_DTYPE = np.dtype([("source_id", "<i4"), ("num_tokens", "<i4"), ("num_chunks", "<i4")])
WRITER_OPTIONS = "group_size:1"


def shard_name(split: str, shard: int, num_shards: int) -> str:
    return f"{split}-{shard:05d}-of-{num_shards:05d}.array_record"


def is_local(path) -> bool:
    return "://" not in os.fspath(path)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_shard(out_dir, split: str, shard: int, num_shards: int, docs: list[dict]) -> dict:
    """Writes one shard; ``docs`` are dicts from the encode step.

    Each doc dict has: hash (bytes), source_id, doc_key, tokens, chunk_bounds,
    chunk_concepts, token_spans. Returns the shard's stats (also written as
    ``<shard>.stats.json``).
    """
    from array_record.python import array_record_module

    split_code = records.SPLITS.index(split)
    docs = sorted(docs, key=lambda d: (d["hash"], d["doc_key"]))
    name = shard_name(split, shard, num_shards)
    out_dir = epath.Path(out_dir)
    local_dir = None if is_local(out_dir) else tempfile.mkdtemp(prefix="cbm_shard_")
    path = os.fspath(out_dir / name) if local_dir is None else os.path.join(local_dir, name)
    writer = array_record_module.ArrayRecordWriter(path, WRITER_OPTIONS)
    index = np.zeros(len(docs), INDEX_DTYPE)
    n_chunks_total = n_tokens_total = 0
    per_source: dict[int, Counter] = {}
    chunk_concepts, token_concepts = Counter(), Counter()
    for i, d in enumerate(docs):
        n = len(d["chunk_bounds"]) - 1
        ids = np.array([records.make_id(split_code, shard, n_chunks_total + j) for j in range(n)],
                       np.int64)
        rec = records.DocumentRecord(
            tokens=d["tokens"], chunk_bounds=d["chunk_bounds"], chunk_concepts=d["chunk_concepts"],
            chunk_ids=ids, token_spans=d["token_spans"], source_id=d["source_id"],
            doc_id=records.make_id(split_code, shard, i), doc_key=d["doc_key"])
        rec.validate(f"{name} record {i}")
        writer.write(records.encode(rec))
        L = len(d["tokens"])
        index[i] = (d["source_id"], L, n)
        n_chunks_total += n
        n_tokens_total += L
        c = per_source.setdefault(int(d["source_id"]), Counter())
        c.update(documents=1, tokens=L, chunks=n)
        chunk_concepts.update(int(x) for x in d["chunk_concepts"].reshape(-1) if x >= 0)
        token_concepts.update(int(x) for x in d["token_spans"][:, 2])
    writer.close()
    buf = io.BytesIO()
    np.save(buf, index, allow_pickle=False)
    stats = {
        "split": split, "shard": shard, "file": name, "records": len(docs),
        "tokens": n_tokens_total, "chunks": n_chunks_total, "sha256": _sha256_file(path),
        "sources": {str(k): dict(v) for k, v in sorted(per_source.items())},
        "chunk_concepts": {str(k): v for k, v in sorted(chunk_concepts.items())},
        "token_concepts": {str(k): v for k, v in sorted(token_concepts.items())},
        "truncated_concept_lists": int(sum(d.get("truncated", 0) for d in docs)),
    }
    if local_dir is not None:
        (out_dir / name).write_bytes(open(path, "rb").read())
        os.remove(path)
        os.rmdir(local_dir)
    (out_dir / name.replace(".array_record", ".index.npy")).write_bytes(buf.getvalue())
    (out_dir / name.replace(".array_record", ".stats.json")).write_text(json.dumps(stats, sort_keys=True))
    return stats
