"""AdamW with warmup + cosine decay, global-norm clipping and a decay mask.

  lr(s) = peak * s / warmup                                   s < warmup
        = min + (peak - min) * (1 + cos(pi * p)) / 2,  p = (s - warmup) / (total - warmup)

Weight decay applies to matrices only: norm scales (1-D params) are exempt.

The known concept head's key rows (``predictor``, or ``predictor_up`` when
factorized; ``known_head_keys``) may take their own rate and decay:

  lr_keys(s) = known_keys_lr_scale * lr(s),   decay_keys = known_keys_weight_decay

Each key row is a per-concept logistic read-out of h. Measured on the demo
checkpoint with h held fixed (docs/fidelity.md "Fidelity: the known-key refit"), the
shared rate and decay (3e-3, 0.1) leave those read-outs short of what they reach at
10x the rate without decay (held-out chunk AUROC 0.941 -> 0.952 over the same batches).
Through training, though, faster keys pull the backbone harder through the concept terms
(3x, no decay: AUROC 0.940 but perplexity 1.19 x the backbone's), so tiny.py refits the
keys after the last step instead (train/key_refit.py).
With both at their defaults the optimizer is the single AdamW it always was (same
state tree, so older checkpoints restore).
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


# The known head is dense today (model/rewrite.py builds it at rank 0); "predictor_up" names
# the key rows of a factorized head.
KNOWN_KEY_ROWS = ("predictor", "predictor_up")


def known_head_keys(params):
    """"known_keys" for the known concept head's key rows, "rest" for every other leaf."""
    def label(path, p):
        names = [getattr(k, "key", None) for k in path]
        return "known_keys" if "known_head" in names and names[-1] in KNOWN_KEY_ROWS else "rest"
    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(opt_cfg, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(opt_cfg, num_steps)

    def adamw(lr, weight_decay):
        return optax.adamw(lr, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                           weight_decay=weight_decay, mask=decay_mask)

    key_scale = float(opt_cfg.get("known_keys_lr_scale", 1.0))
    key_decay = float(opt_cfg.get("known_keys_weight_decay", opt_cfg.weight_decay))
    if key_scale == 1.0 and key_decay == opt_cfg.weight_decay:
        update = adamw(schedule, opt_cfg.weight_decay)
    else:
        update = optax.multi_transform(
            {"rest": adamw(schedule, opt_cfg.weight_decay),
             "known_keys": adamw(lambda step: key_scale * schedule(step), key_decay)},
            known_head_keys)
    tx = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip), update)
    never_apply = int(jnp.iinfo(jnp.int32).max)   # consecutive non-finite updates to drop
    return optax.apply_if_finite(tx, max_consecutive_errors=never_apply), schedule
