"""The grain training pipeline over a built corpus (DESIGN.md section 4).

    ArrayRecord shards (MapDataset) -> shuffle(seed) -> this process's slice
    [-> per-source datasets mixed by weight: data.mixture, or data.source_weighting
    "windows" (data/source_weighting.py)] -> repeat -> split documents into
    pieces of <= T tokens -> first-fit pack to T (segment ids, positions) ->
    per-token concept ids [T, K], chunk ids, source ids -> batch
    [-> multiprocess prefetch]

Each batch is a dict of numpy arrays (B = per-process batch size):

    tokens             int32 [B, T]     pad id where segment_ids == 0
    segment_ids        int32 [B, T]     0 = padding, 1..n = documents in the row
    positions          int32 [B, T]     restart at 0 per document (piece)
    concept_ids        int32 [B, T, K]  the token's chunk concepts + its
                                        token-level labels, -1 padded
    chunk_ids          int64 [B, T]     global 64-bit chunk id, -1 padding
    chunk_segment_ids  int32 [B, T]     0 = padding, 1..m = chunk within the row
    source_ids         int32 [B, T]     -1 padding

Processes: the same seed gives every process the same global permutation, and
process p takes elements p, p + P, ... of it, so processes see disjoint
documents that together cover the split (per epoch; each epoch reshuffles).
The returned iterator is a grain DatasetIterator: ``get_state()`` /
``set_state()`` round-trip exactly (packing replays from the parent state of
the current packed batch).
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Mapping

import grain
import numpy as np

from cbm_lm.config import ConfigError
from cbm_lm.data.corpus import Corpus
from cbm_lm.data.pieces import PiecesOf, to_pieces
from cbm_lm.data.source import ShardedArrayRecordSource, Subset
from cbm_lm.data.source_weighting import WEIGHTINGS, window_mixture

_FEATURES = ("tokens", "concept_ids", "chunk_ids", "chunk_local", "source_ids")


def finalize_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Packed row -> the batch contract (segment ids, positions, chunk segments)."""
    seg = row["tokens_segment_ids"].astype(np.int32)
    pos = row["tokens_positions"].astype(np.int32)
    local = row["chunk_local"]
    prev = np.concatenate([[-1], local[:-1]])
    new_chunk = (seg != 0) & ((pos == 0) | (local != prev))
    chunk_seg = np.where(seg != 0, np.cumsum(new_chunk), 0).astype(np.int32)
    return {
        "tokens": row["tokens"].astype(np.int32),
        "segment_ids": seg,
        "positions": np.where(seg != 0, pos, 0).astype(np.int32),
        "concept_ids": row["concept_ids"].astype(np.int32),
        "chunk_ids": row["chunk_ids"].astype(np.int64),
        "chunk_segment_ids": chunk_seg,
        "source_ids": row["source_ids"].astype(np.int32),
    }


def _documents(corpus: Corpus, split: str, seed: int, shuffle: bool, process_index: int,
               process_count: int, mixture: Mapping[str, float] | None,
               source_weighting: str = "natural", window: int = 0) -> grain.MapDataset:
    src = ShardedArrayRecordSource(corpus.shards(split))
    if len(src) == 0:
        raise ValueError(f"{corpus.dir}: split {split!r} has no documents")
    if source_weighting not in WEIGHTINGS:
        raise ConfigError(f"data.source_weighting must be one of {WEIGHTINGS}, got "
                          f"{source_weighting!r}")
    if source_weighting == "windows":
        if mixture:
            raise ConfigError(f"data.mixture {dict(mixture)} and data.source_weighting="
                              f"'windows' both set the source weights: set one")
        index = corpus.source_index(split)
        mixture = window_mixture(index["source_id"], index["num_tokens"], corpus.sources,
                                 window)

    def prepare(ds, s, what=f"split {split!r}"):
        n = len(ds)
        ds = ds.shuffle(seed=s) if shuffle else ds
        ds = ds[process_index::process_count]
        if len(ds) == 0:
            raise ConfigError(f"{corpus.dir}: process {process_index} of {process_count} gets "
                             f"no documents of {what} ({n} in all; expected at "
                             f"least one per process): split rows instead of documents "
                             f"(--config.data.process_split=rows), or for the eval split turn "
                             f"eval off (--config.train.eval_every=0)")
        return ds

    if not mixture:
        return prepare(grain.MapDataset.source(src), seed)
    names = corpus.sources
    unknown = sorted(set(mixture) - set(names))
    if unknown:
        raise ValueError(f"mixture sources {unknown} not in {corpus.dir}/sources.json "
                         f"(known: {names})")
    index = corpus.source_index(split)["source_id"]
    parts, weights = [], []
    for name, w in sorted(mixture.items()):
        if w <= 0:
            continue
        ids = np.nonzero(index == names.index(name))[0]
        if len(ids) == 0:
            raise ValueError(f"mixture source {name!r} has no documents in split {split!r}")
        parts.append(prepare(grain.MapDataset.source(Subset(src, ids)),
                             seed + 1 + names.index(name),
                             f"mixture source {name!r} in split {split!r}"))
        weights.append(float(w))
    if not parts:
        raise ValueError(f"mixture {dict(mixture)} has no positive weight")
    return grain.MapDataset.mix(parts, weights)


def make_dataset(data_dir, split: str, batch_size: int, seq_len: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, max_chunk_concepts: int = 8,
                 mixture: Mapping[str, float] | None = None, worker_count: int = 0,
                 num_epochs: int | None = None, shuffle: bool = True,
                 packing_bins: int | None = None, drop_remainder: bool = True,
                 read_threads: int = 4, source_weighting: str = "natural",
                 window_tokens: int = 0) -> grain.IterDataset:
    """The pipeline as a grain IterDataset (see the module docstring)."""
    corpus = Corpus(data_dir)
    pad_id = corpus.tokenizer.pad_id
    ds = _documents(corpus, split, seed, shuffle, process_index, process_count, mixture,
                    source_weighting, window_tokens or seq_len)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map(functools.partial(to_pieces, seq_len=seq_len, k=max_chunk_concepts))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64))
    ds = grain.experimental.FlatMapIterDataset(ds, PiecesOf())
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={k: seq_len for k in _FEATURES},
        num_packing_bins=packing_bins or max(batch_size, 8), seed=seed, shuffle_bins=shuffle,
        padding_struct={"tokens": pad_id, "concept_ids": -1, "chunk_ids": -1,
                        "chunk_local": -1, "source_ids": -1})
    ds = ds.map(finalize_row)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if worker_count > 0:
        _ensure_absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return ds


def make_pipeline(data_dir, split: str, batch_size: int, seq_len: int, seed: int = 0,
                  process_index: int = 0, process_count: int = 1, max_chunk_concepts: int = 8,
                  mixture: Mapping[str, float] | None = None, worker_count: int = 0,
                  **kwargs: Any) -> grain.DatasetIterator:
    """Iterator over batches with ``get_state()``/``set_state()`` (see module docstring).

    ``batch_size`` is per process. Extra keyword arguments go to ``make_dataset``
    (num_epochs: None = forever, shuffle, packing_bins, drop_remainder).
    """
    return iter(make_dataset(data_dir, split, batch_size, seq_len, seed, process_index,
                             process_count, max_chunk_concepts, mixture, worker_count, **kwargs))


def _ensure_absl_flags_parsed() -> None:
    """grain worker processes read absl flags; outside absl.app.run parse defaults."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv[:1], known_only=True)
