"""The model call a sampler makes, with the generation's steering applied (inside jit).

``SteerArrays`` is the device-side form of a steer_spec.Steering: the
intervention tensors, the injection direction and strength, the logit mask.
The static parts (is there an injection, its layer and cutoff) live in
``SteerStatic`` so that jit specializes on them. ``call`` runs

  model(tokens, segment_ids=..., intervene_*=..., drop_epsilon=...,
        injection = alpha[b,t] * d, inject_layer=L, inject_alpha=1)

which is what GenerationTrace.model_inputs rebuilds on the host for a replay.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cbm_lm.inference.steer_spec import Steering
from cbm_lm.model.lm import predicting_positions


@dataclasses.dataclass(frozen=True)
class SteerStatic:
    has_known: bool = False
    has_unknown: bool = False
    drop_epsilon: bool = False
    inject_layer: int | None = None
    cutoff_tokens: int | None = None
    has_logit_mask: bool = False


class SteerArrays(NamedTuple):
    known_ids: jax.Array | None      # [B,L,K]
    known_vals: jax.Array | None
    unknown_ids: jax.Array | None
    unknown_vals: jax.Array | None
    direction: jax.Array | None      # [D]
    alpha: jax.Array | None          # [] raw strength
    logit_mask: jax.Array | None     # [V]


def prepare(steering: Steering, batch: int, length: int) -> tuple[SteerStatic, SteerArrays]:
    """Host Steering -> (static settings, device arrays) for a [batch, length] generation."""
    iv, inj = steering.intervention, steering.injection
    rows = np.arange(batch)
    known = unknown = None
    if iv is not None:
        kw = iv.model_kwargs(rows, length)
        known, unknown = kw.get("intervene_known"), kw.get("intervene_unknown")
    static = SteerStatic(
        has_known=known is not None, has_unknown=unknown is not None,
        drop_epsilon=bool(iv is not None and iv.drop_epsilon
                          and (known is not None or unknown is not None)),
        inject_layer=inj.layer if inj is not None else None,
        cutoff_tokens=inj.cutoff_tokens if inj is not None else None,
        has_logit_mask=steering.logit_mask is not None)
    arrays = SteerArrays(
        *(known if known is not None else (None, None)),
        *(unknown if unknown is not None else (None, None)),
        None if inj is None else jnp.asarray(inj.direction, jnp.float32),
        None if inj is None else jnp.asarray(inj.alpha, jnp.float32),
        None if steering.logit_mask is None else jnp.asarray(steering.logit_mask, jnp.float32))
    return static, arrays


def diffusion_steered(tokens, segment_ids, mask_id: int, shift: bool):
    """[B,L] bool: where a diffusion step injects, the positions whose state predicts a
    masked token (model.lm.predicting_positions): the masked positions themselves
    (Steerling), and under ``model.diffusion_shift`` also the position before each masked
    one, without which a block's first masked token is predicted from an unsteered state.
    The training steering loss injects by the same rule (objectives/steering_loss.py)."""
    return predicting_positions(tokens == mask_id, segment_ids, shift)


def injection_alpha(static: SteerStatic, arrays: SteerArrays, n_committed: jax.Array) -> jax.Array:
    """alpha [N] for rows with ``n_committed`` [N] tokens (zero past the cutoff)."""
    a = jnp.broadcast_to(arrays.alpha, n_committed.shape)
    if static.cutoff_tokens is None:
        return a
    return jnp.where(n_committed < static.cutoff_tokens, a, 0.0)


def call(model, tokens, segment_ids, static: SteerStatic, arrays: SteerArrays, *,
         steered=None, alpha=None, rows=None, positions=None, kv_cache=None):
    """model(...) with the steering. steered [N,T] bool and alpha [N] or [N,T] place the
    injection; rows [N] pick the intervention rows (default all); positions [N,T] the
    columns of the intervention tensors (default 0..T-1, a full-length call)."""
    kw = {}

    def pick(a):
        a = a if rows is None else a[rows]
        if positions is not None:
            a = jnp.take_along_axis(a, positions[..., None], axis=1)
        return a

    if static.has_known:
        kw["intervene_known"] = (pick(arrays.known_ids), pick(arrays.known_vals))
    if static.has_unknown:
        kw["intervene_unknown"] = (pick(arrays.unknown_ids), pick(arrays.unknown_vals))
    if static.drop_epsilon:
        kw["drop_epsilon"] = True
    if static.inject_layer is not None:
        a = alpha if alpha.ndim == 2 else alpha[:, None]
        scale = jnp.where(steered, a, 0.0).astype(jnp.float32)
        kw.update(injection=scale[..., None] * arrays.direction, inject_layer=static.inject_layer,
                  inject_alpha=1.0)
    return model(tokens, segment_ids=segment_ids, positions=positions, kv_cache=kv_cache, **kw)
