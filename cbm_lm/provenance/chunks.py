"""Global chunk id -> (record, chunk), source and text, read back from the corpus shards.

A chunk id is ``split << 56 | shard << 36 | index`` where ``index`` counts the
shard's chunks in record order (cbm_lm/data/shards.py), so the record that
holds a chunk is found by a binary search over the cumulative chunk counts of
the shard's ``.index.npy`` sidecar, and only that record is read.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from etils import epath

from cbm_lm.data import records
from cbm_lm.data.corpus import Corpus
from cbm_lm.data.source import ShardedArrayRecordSource


class ChunkLookup:
    def __init__(self, corpus: Corpus):
        self.corpus = corpus
        self._sources: dict[str, ShardedArrayRecordSource] = {}

    @functools.lru_cache(maxsize=None)
    def _shard_index(self, split: str, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(first chunk index of each record [R+1], source id of each record [R])."""
        path, n = self.corpus.shards(split)[shard]
        idx = np.load(io.BytesIO(epath.Path(path.replace(".array_record", ".index.npy"))
                                 .read_bytes()), allow_pickle=False)
        if len(idx) != n:
            raise ValueError(f"{path}: index has {len(idx)} rows, manifest says {n} records")
        starts = np.concatenate([[0], np.cumsum(idx["num_chunks"])]).astype(np.int64)
        return starts, idx["source_id"].astype(np.int32)

    def locate(self, chunk_id: int) -> tuple[str, int, int, int]:
        """(split, shard, record index in shard, chunk index in record)."""
        split_code, shard, index = records.split_id(chunk_id)
        if split_code >= len(records.SPLITS):
            raise KeyError(f"chunk id {chunk_id}: split code {split_code} is not a corpus split")
        split = records.SPLITS[split_code]
        n_shards = len(self.corpus.shards(split))
        if shard >= n_shards:
            raise KeyError(f"chunk id {chunk_id}: shard {shard} but split {split!r} of "
                           f"{self.corpus.dir} has {n_shards} shards")
        starts, _ = self._shard_index(split, shard)
        if index >= starts[-1]:
            raise KeyError(f"chunk id {chunk_id}: index {index} past the {starts[-1]} chunks of "
                           f"{split} shard {shard}")
        rec = int(np.searchsorted(starts, index, side="right")) - 1
        return split, shard, rec, int(index - starts[rec])

    def source_id(self, chunk_id: int) -> int:
        split, shard, rec, _ = self.locate(chunk_id)
        return int(self._shard_index(split, shard)[1][rec])

    def source_name(self, chunk_id: int) -> str:
        return self.corpus.sources[self.source_id(chunk_id)]

    def tokens(self, chunk_id: int) -> np.ndarray:
        split, shard, rec_i, j = self.locate(chunk_id)
        key = f"{split}/{shard}"
        if key not in self._sources:
            self._sources[key] = ShardedArrayRecordSource([self.corpus.shards(split)[shard]])
        rec = self._sources[key][rec_i]
        if int(rec.chunk_ids[j]) != int(chunk_id):
            raise ValueError(f"chunk id {chunk_id}: record {rec_i} of {split} shard {shard} holds "
                             f"{int(rec.chunk_ids[j])} at chunk {j}; the corpus does not match "
                             "the id layout of cbm_lm/data/shards.py")
        return rec.tokens[rec.chunk_bounds[j]:rec.chunk_bounds[j + 1]]

    def text(self, chunk_id: int) -> str:
        return self.corpus.tokenizer.decode(self.tokens(chunk_id))

    def close(self) -> None:
        for s in self._sources.values():
            s.close()
        self._sources.clear()
