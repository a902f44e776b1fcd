"""How each process gets its part of the global batch.

data.process_split:
  documents  every process reads a disjoint 1/P of the documents and packs its
             own rows (the scalable default: no process reads another's data).
  rows       every process runs the same global pipeline and keeps its rows
             [p*B/P, (p+1)*B/P): the global batch is identical for any process
             count, so runs are comparable across topologies, at the cost of
             each process reading all the data.

Eval runs a collective per batch, so every process must run the same number
of eval batches: with ``documents`` a process's share of the held-out split
can pack into fewer batches than another's. ``agreed_eval_batches`` counts
them once at start-up and takes the minimum over processes.
"""

from __future__ import annotations

import itertools

import grain
import jax
import numpy as np

from cbm_lm.data.pipeline import make_pipeline


class RowSliceIterator(grain.DatasetIterator):
    """Wraps a global-batch iterator and yields rows [start, stop) of each batch."""

    def __init__(self, parent: grain.DatasetIterator, start: int, stop: int):
        super().__init__(parent)
        self._it = parent
        self._start, self._stop = start, stop

    def __next__(self):
        batch = next(self._it)
        return {k: v[self._start:self._stop] for k, v in batch.items()}

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state):
        self._it.set_state(state)


def process_pipeline(config, split: str, per_process_batch: int, *, eval_mode: bool = False):
    """This process's iterator of [per_process_batch, seq_len] batches of ``split``."""
    rows = config.data.process_split == "rows"
    p, n = jax.process_index(), jax.process_count()
    it = make_pipeline(
        config.data.dir, split, per_process_batch * (n if rows else 1), config.data.seq_len,
        seed=config.data.shuffle_seed, process_index=0 if rows else p,
        process_count=1 if rows else n, max_chunk_concepts=config.data.max_chunk_concepts,
        # eval scores the whole split: a mixture stops at its first exhausted source
        mixture=None if eval_mode else (dict(config.data.mixture) or None),
        source_weighting="natural" if eval_mode else config.data.source_weighting,
        window_tokens=config.data.window_tokens,
        worker_count=0 if eval_mode else config.data.worker_count,
        packing_bins=config.data.packing_bins or None,
        **({"num_epochs": 1, "shuffle": False, "drop_remainder": True} if eval_mode else {}))
    if rows and n > 1:
        it = RowSliceIterator(it, p * per_process_batch, (p + 1) * per_process_batch)
    return it


def agreed_eval_batches(config, per_process_batch: int) -> int:
    """min over processes of min(train.eval_batches, this process's eval batches)."""
    it = process_pipeline(config, config.data.eval_split, per_process_batch, eval_mode=True)
    local = sum(1 for _ in itertools.islice(it, config.train.eval_batches))
    if jax.process_count() == 1:
        if local == 0:
            print(f"WARNING: eval skipped: {config.data.eval_split!r} holds no complete batch",
                  flush=True)
        return local
    from jax.experimental import multihost_utils
    counts = multihost_utils.process_allgather(np.asarray(local, np.int32))
    agreed = int(np.min(counts))
    if len(set(np.asarray(counts).ravel().tolist())) > 1 and jax.process_index() == 0:
        print(f"eval: {agreed} batches per process (the fewest any process's share of "
              f"{config.data.eval_split!r} holds; per process: {np.asarray(counts).tolist()})",
              flush=True)
    if agreed == 0 and jax.process_index() == 0:
        print(f"WARNING: eval skipped: some process's share of {config.data.eval_split!r} "
              f"holds no complete batch", flush=True)
    return agreed
