"""Step schedules for the training objectives; plain jnp, safe with a traced step.

  linear(step; a, b, n)        = a + (b - a) * clip(step / n, 0, 1)      (= b when n <= 0)
  hold_decay(f; a, b, f0, f1)  = a                                     f <= f0
                               = b + (a - b) (1 + cos(pi (f - f0) / (f1 - f0))) / 2
                               = b                                     f >= f1
  teacher forcing, "linear":  alpha = linear(step; start, end, decay_steps)
  teacher forcing, "report":  alpha = hold_decay(step / total; 1.0, 0.5, 0.15, 0.5)
                              (Steerling's technical report: 1.0 held to 15% of training,
                              cosine to 0.5 by 50%, then 0.5)
  unknown-head teacher forcing beta = hold_decay(step / total; 1, floor, hold, until, linear)
  epsilon_dropout_prob         = linear(step; start, prob, warmup_steps)  (constant if 0)
  noise curriculum centre      = linear(step; 0.2, 0.8, total)   (see objectives/diffusion.py)
  AR-to-diffusion adaptation   AR phase  iff  step < round(f_ar * total)
                               lookahead w = min(floor(b (step - s0) / n_anneal), b - 1),
                               s0 = round(f_ar * total), n_anneal = round(f_anneal * total)
                               (w = 0: causal attention; w = b - 1: block-causal)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

# Steerling's technical report teacher-forcing schedule (fractions of training).
REPORT_TF_HOLD, REPORT_TF_END, REPORT_TF_FLOOR = 0.15, 0.5, 0.5


def linear_schedule(step, start: float, end: float, steps: int) -> jax.Array:
    """start -> end linearly over ``steps`` steps, then held at end (float32 scalar).

    optax.linear_schedule, except that steps <= 0 means "already at end" (optax
    would hold ``start``).
    """
    step = jnp.asarray(step, jnp.float32)
    if steps <= 0:
        return jnp.asarray(end, jnp.float32) + 0.0 * step
    return jnp.asarray(optax.linear_schedule(start, end, steps)(step), jnp.float32)


def hold_decay(frac, start: float, end: float, hold: float, until: float,
               kind: str = "cosine") -> jax.Array:
    """``start`` up to fraction ``hold``, cosine (or linear) to ``end`` at ``until``, then ``end``."""
    frac = jnp.asarray(frac, jnp.float32)
    p = jnp.clip((frac - hold) / max(until - hold, 1e-9), 0.0, 1.0)
    if kind == "cosine":
        return (end + (start - end) * 0.5 * (1.0 + jnp.cos(math.pi * p))).astype(jnp.float32)
    if kind == "linear":
        return (start + (end - start) * p).astype(jnp.float32)
    raise ValueError(f"decay kind must be 'cosine' or 'linear', got {kind!r}")


def training_fraction(step, total_steps: int) -> jax.Array:
    """step / total_steps in [0, 1] (1 when total_steps <= 0)."""
    if total_steps <= 0:
        return jnp.ones((), jnp.float32)
    return jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)


def teacher_forcing_alpha(step, start: float, end: float, decay_steps: int, *,
                          schedule: str = "linear", total_steps: int = 0) -> jax.Array:
    """Teacher-forcing strength alpha(step).

    schedule="linear": start -> end over decay_steps. schedule="report": the technical
    report's hold-cosine-floor over ``total_steps`` (start/end/decay_steps unused).
    """
    if schedule == "linear":
        return linear_schedule(step, start, end, decay_steps)
    if schedule == "report":
        return hold_decay(training_fraction(step, total_steps), 1.0, REPORT_TF_FLOOR,
                           REPORT_TF_HOLD, REPORT_TF_END)
    raise ValueError(f"teacher-forcing schedule must be 'linear' or 'report', got {schedule!r}")


def epsilon_dropout_prob(step, prob: float, warmup_steps: int = 0, start: float = 0.0
                         ) -> jax.Array:
    """Per-sequence epsilon-dropout probability: ``prob``, or a linear warmup from ``start``."""
    return linear_schedule(step, start, prob, warmup_steps)


def sample_epsilon_dropout(rng: jax.Array, batch: int, prob) -> jax.Array:
    """[batch] bool: drop epsilon for each sequence with probability ``prob``."""
    return jax.random.uniform(rng, (batch,)) < prob


def ar_warmup_steps(fraction: float, total_steps: int) -> int:
    """The number of leading steps trained with the next-token objective."""
    return int(round(fraction * total_steps))


def in_ar_phase(step, fraction: float, total_steps: int) -> jax.Array:
    """bool scalar: ``step`` lies in the AR warmup (a function of the step alone, so a
    resumed run continues in the right phase)."""
    return jnp.asarray(step) < ar_warmup_steps(fraction, total_steps)


def mask_lookahead(step, ar_fraction: float, anneal_fraction: float, total_steps: int,
                   block_size: int) -> jax.Array:
    """int32 scalar w of the annealed attention mask (model/attention.py): 0 at the end of
    the AR warmup, growing by one every n_anneal / b steps, b - 1 (block-causal) from the
    end of the anneal on."""
    start = ar_warmup_steps(ar_fraction, total_steps)
    length = max(ar_warmup_steps(anneal_fraction, total_steps), 1)
    w = jnp.floor(block_size * (jnp.asarray(step, jnp.float32) - start) / length)
    return jnp.clip(w, 0, block_size - 1).astype(jnp.int32)
