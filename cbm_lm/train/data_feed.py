"""How each process gets its part of the global batch.

data.process_split:
  documents  every process reads a disjoint 1/P of the documents and packs its
             own rows (the scalable default: no process reads another's data).
  rows       every process runs the same global pipeline and keeps its rows
             [p*B/P, (p+1)*B/P): the global batch is identical for any process
             count, so runs are comparable across topologies, at the cost of
             each process reading all the data.
"""

from __future__ import annotations

import grain


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
