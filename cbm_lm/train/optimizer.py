"""AdamW with warmup + cosine decay, global-norm clipping and a decay mask.

  lr(s) = peak * s / warmup                                   s < warmup
        = min + (peak - min) * (1 + cos(pi * p)) / 2,  p = (s - warmup) / (total - warmup)

Weight decay applies to matrices only: norm scales (1-D params) are exempt.
Gradient accumulation happens in the train step (a scan over micro-batches),
not here, so the optimizer sees one update per step. optax.apply_if_finite
drops a non-finite update (params and moments untouched), however many in a
row; the train loop decides whether to stop (train.nan_policy).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(opt_cfg, num_steps: int) -> optax.Schedule:
    peak = opt_cfg.learning_rate
    warmup = min(opt_cfg.warmup_steps, max(num_steps - 1, 0))
    if warmup == 0:  # the first step already runs at the peak rate
        return optax.cosine_decay_schedule(peak, max(num_steps, 1), alpha=opt_cfg.min_lr_ratio)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1), end_value=peak * opt_cfg.min_lr_ratio)


def decay_mask(params):
    """True for parameters that get weight decay: matrices, not counting the stacked
    blocks' leading [L] layer axis (a stack of norm scales [L,D] is still exempt)."""
    def is_matrix(path, p):
        stacked = any(getattr(k, "key", None) == "blocks" for k in path)
        return p.ndim - int(stacked) >= 2
    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(opt_cfg, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(opt_cfg, num_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(opt_cfg.grad_clip),
        optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                    weight_decay=opt_cfg.weight_decay, mask=decay_mask),
    )
    never_apply = int(jnp.iinfo(jnp.int32).max)   # consecutive non-finite updates to drop
    return optax.apply_if_finite(tx, max_consecutive_errors=never_apply), schedule
