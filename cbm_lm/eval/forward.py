"""Jitted forward passes of a restored model over [N,T] windows, in row batches."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from cbm_lm.model import ConceptBottleneckLM, LMOutput


@nnx.jit
def _forward(model, tokens, positions, segment_ids, stream):
    return model(tokens, positions=positions, segment_ids=segment_ids, stream=stream)


def forward(model: ConceptBottleneckLM, tokens, positions=None, segment_ids=None,
            stream=None) -> LMOutput:
    """model(tokens) jitted (one compile per shape)."""
    return _forward(model, tokens, positions, segment_ids, stream)


def iter_rows(fn: Callable[[np.ndarray], dict], n: int, batch: int):
    """Yields (start, fn(rows) as numpy arrays [k,...]) per row batch, rows [start, start+k).

    ``rows`` always holds ``batch`` indices (the last batch repeats its last
    row, and the repeats are dropped), so a jitted fn compiles once. Raises
    ValueError for n < 1 (no row to run fn on, so no output shapes) or batch < 1.
    """
    if n < 1:
        raise ValueError(f"map_rows: n={n} rows; expected >= 1 (no window to evaluate)")
    if batch < 1:
        raise ValueError(f"map_rows: batch={batch}; expected >= 1")
    for i in range(0, n, batch):
        rows = np.minimum(np.arange(i, i + batch), n - 1)
        out = jax.device_get(fn(rows))
        keep = min(batch, n - i)
        yield i, {k: np.asarray(v)[:keep] for k, v in out.items()}


def map_rows(fn: Callable[[np.ndarray], dict], n: int, batch: int) -> dict:
    """Concatenates fn(rows) over row batches (``iter_rows``); returns dicts of numpy
    arrays [n,...]. Raises ValueError for n < 1."""
    parts = [out for _, out in iter_rows(fn, n, batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
