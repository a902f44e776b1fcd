"""Per-row bookkeeping both samplers share: PRNG keys, commit-time capture, kept tokens.

A batch of B rows of length L is sampled side by side, but each row must come
out as it would alone. So each row draws from its own key
fold_in(key(seed), seeds[b]) (``row_keys``); commit-time captures are written
per (row, position) into [B,L,...] buffers (``capture_buffers``,
``write_capture``); and the trace keeps a row's prompt and its committed
tokens, pad_id elsewhere (``kept_tokens``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def row_keys(seed: int, batch: int, seeds=None) -> jax.Array:
    """One PRNG key per row [B]: fold_in(key(seed), seeds[b]) (seeds default 0..B-1)."""
    seeds = np.arange(batch) if seeds is None else np.asarray(seeds)
    if seeds.shape != (batch,):
        raise ValueError(f"seeds must give one int per prompt ({batch}), got shape {seeds.shape}")
    base = jax.random.key(seed)
    return jax.vmap(lambda s: jax.random.fold_in(base, s))(jnp.asarray(seeds, jnp.uint32))


def capture_buffers(capture_fn, model, out, batch: int, length: int, n: int):
    """Zeroed [B,L,...] buffers shaped like capture_fn's outputs for n commits ([n,...])."""
    shapes = jax.eval_shape(lambda o: capture_fn(model, o, jnp.zeros(n, jnp.int32),
                                                 jnp.zeros(n, jnp.int32),
                                                 jnp.zeros(n, jnp.int32)), out)
    return jax.tree.map(lambda s: jnp.zeros((batch, length) + s.shape[1:], s.dtype), shapes)


def write_capture(cap, rows, dest, vals):
    """cap[rows[i], dest[i]] = vals[i] for every buffer ([N] indices; dest = L drops)."""
    return jax.tree.map(lambda buf, v: buf.at[rows, dest].set(v.astype(buf.dtype), mode="drop"),
                        cap, vals)


def kept_tokens(x: np.ndarray, committed_step: np.ndarray, prompt_lens: np.ndarray,
                pad_id: int) -> np.ndarray:
    """[B,L] int32: the prompt and the committed tokens of each row, pad_id elsewhere."""
    in_prompt = np.arange(x.shape[1])[None, :] < prompt_lens[:, None]
    return np.where((committed_step >= 0) | in_prompt, x, pad_id).astype(np.int32)
