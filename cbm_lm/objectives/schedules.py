"""Step schedules for the training objectives; plain jnp, safe with a traced step.

  linear(step; a, b, n)      = a + (b - a) * clip(step / n, 0, 1)     (= b when n <= 0)
  teacher_forcing_alpha      = linear(step; start, end, decay_steps)
  epsilon_dropout_prob       = linear(step; start, prob, warmup_steps)  (constant if warmup_steps=0)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def linear_schedule(step, start: float, end: float, steps: int) -> jax.Array:
    """start -> end linearly over ``steps`` steps, then held at end (float32 scalar).

    optax.linear_schedule, except that steps <= 0 means "already at end" (optax
    would hold ``start``).
    """
    step = jnp.asarray(step, jnp.float32)
    if steps <= 0:
        return jnp.asarray(end, jnp.float32) + 0.0 * step
    return jnp.asarray(optax.linear_schedule(start, end, steps)(step), jnp.float32)


def teacher_forcing_alpha(step, start: float, end: float, decay_steps: int) -> jax.Array:
    """Teacher-forcing strength alpha(step): linear from start to end over decay_steps."""
    return linear_schedule(step, start, end, decay_steps)


def epsilon_dropout_prob(step, prob: float, warmup_steps: int = 0, start: float = 0.0
                         ) -> jax.Array:
    """Per-sequence epsilon-dropout probability: ``prob``, or a linear warmup from ``start``."""
    return linear_schedule(step, start, prob, warmup_steps)


def sample_epsilon_dropout(rng: jax.Array, batch: int, prob) -> jax.Array:
    """[batch] bool: drop epsilon for each sequence with probability ``prob``."""
    return jax.random.uniform(rng, (batch,)) < prob
