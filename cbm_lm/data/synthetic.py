"""A synthetic batch of the data contract's shape, for tests and benchmarks.

tokens, segment_ids, positions [B,T]; concept_ids [B,T,K] (one random concept
per sequence in slot 0, -1 padded); chunk_segment_ids [B,T] (32-token chunks).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cbm_lm.config import ModelConfig


def synthetic_batch(model_cfg: ModelConfig, batch_size: int, seq_len: int, k: int, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, model_cfg.vocab_size - 4, size=(batch_size, seq_len))
    concept_ids = np.full((batch_size, seq_len, k), -1)
    concept_ids[..., 0] = rng.integers(0, model_cfg.concepts.n_known, size=(batch_size, 1))
    chunk = (np.arange(seq_len) // 32 + 1)[None].repeat(batch_size, 0)
    return {"tokens": jnp.asarray(tokens, jnp.int32),
            "segment_ids": jnp.ones((batch_size, seq_len), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32),
                                          (batch_size, seq_len)),
            "concept_ids": jnp.asarray(concept_ids, jnp.int32),
            "chunk_segment_ids": jnp.asarray(chunk, jnp.int32)}
