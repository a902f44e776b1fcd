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


def map_rows(fn: Callable[[np.ndarray], dict], n: int, batch: int) -> dict:
    """Concatenates fn(rows) over row batches; returns dicts of numpy arrays [n,...].

    ``rows`` always holds ``batch`` indices (the last batch repeats its last
    row, and the repeats are dropped), so a jitted fn compiles once.
    """
    parts = []
    for i in range(0, n, batch):
        rows = np.minimum(np.arange(i, i + batch), n - 1)
        out = jax.device_get(fn(rows))
        keep = min(batch, n - i)
        parts.append({k: np.asarray(v)[:keep] for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
