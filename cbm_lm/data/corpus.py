"""Read side of a built corpus directory: manifest, shards, vocabularies."""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Iterator

import numpy as np
from etils import epath

from cbm_lm.data import records, shards
from cbm_lm.data import tokenizer as tokenizer_lib
from cbm_lm.data.concepts import ConceptVocab
from cbm_lm.data.corpus_finalize import FORMAT
from cbm_lm.data.source import ShardRef


class Corpus:
    """A corpus written by tools/build_corpus.py (requires its manifest.json)."""

    def __init__(self, directory):
        self.dir = epath.Path(directory)
        mf = self.dir / "manifest.json"
        if not mf.exists():
            raise FileNotFoundError(f"{mf}: no manifest; expected a complete corpus built by "
                                    "tools/build_corpus.py (an interrupted build has none)")
        self.manifest = json.loads(mf.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{mf}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")

    @property
    def max_chunk_concepts(self) -> int:
        return self.manifest["max_chunk_concepts"]

    def shards(self, split: str) -> list[ShardRef]:
        """[(path, num_records)] of a split, in shard order; each a ``ShardRef`` carrying
        the manifest's sha256 of the file (remote shards are staged and checked by it)."""
        if split not in self.manifest["splits"]:
            raise KeyError(f"{self.dir}: no split {split!r}; have {sorted(self.manifest['splits'])}")
        return [ShardRef(str(self.dir / s["file"]), s["records"], s.get("sha256"))
                for s in self.manifest["splits"][split]["shards"]]

    @functools.cached_property
    def tokenizer(self) -> tokenizer_lib.Tokenizer:
        return tokenizer_lib.load(self.dir)

    @functools.cached_property
    def concepts(self) -> ConceptVocab:
        return ConceptVocab.load(self.dir / "concepts.json")

    @functools.cached_property
    def sources(self) -> list[str]:
        return [s["name"] for s in json.loads((self.dir / "sources.json").read_text())["sources"]]

    def source_index(self, split: str) -> np.ndarray:
        """Per-record rows (source_id, num_tokens, num_chunks) over the split, shard order."""
        parts = []
        for path, n in self.shards(split):
            idx = np.load(io.BytesIO(epath.Path(path.replace(".array_record", ".index.npy"))
                                     .read_bytes()), allow_pickle=False)
            if len(idx) != n:
                raise ValueError(f"{path}: index has {len(idx)} rows, manifest says {n} records")
            parts.append(idx)
        return np.concatenate(parts) if parts else np.zeros(0, shards.INDEX_DTYPE)

    def documents(self, split: str) -> Iterator[records.DocumentRecord]:
        """Every document of a split, in shard order (one shard open at a time)."""
        from cbm_lm.data.source import ShardedArrayRecordSource
        for ref in self.shards(split):
            src = ShardedArrayRecordSource([ref])
            for i in range(ref[1]):
                yield src[i]
            src.close()

    def find_chunk(self, chunk_id: int) -> tuple[records.DocumentRecord, int]:
        """(document, chunk index) holding a global chunk id; reads one shard."""
        from cbm_lm.data.source import ShardedArrayRecordSource
        split_code, shard, _ = records.split_id(chunk_id)
        ref = self.shards(records.SPLITS[split_code])[shard]
        (path, n), src = ref, ShardedArrayRecordSource([ref])
        for rec in (src[i] for i in range(n)):
            hit = np.nonzero(rec.chunk_ids == chunk_id)[0]
            if len(hit):
                return rec, int(hit[0])
        raise KeyError(f"chunk id {chunk_id} not in {path}")
