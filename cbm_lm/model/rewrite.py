"""ConceptRewrite: h -> known + unknown + epsilon (DESIGN.md section 2).

With an unknown head:
  known    = KnownHead(h)                      supervised concepts, trained by concept losses
  unknown  = UnknownHead(stop_grad(h))         discovered concepts
  epsilon  = h - known - stop_grad(unknown)    the residual the concepts do not explain
  composed = known + stop_grad(unknown) + epsilon  (== h in value)

Because epsilon cancels ``known`` inside ``composed``, the LM loss sends no
gradient to the known head unless epsilon is dropped (``drop_epsilon``, the
training-time epsilon dropout) or the known features are intervened on
(epsilon is dropped then too, so steering changes the output).

Without an unknown head the residual r = h - known_pred of the head's own
prediction (no intervention, no teacher forcing) takes the unknown slot:
  composed = h + stop_grad(known_used - known_pred)
               + (1 - keep) (known_used - stop_grad(known_used))      [B,T,D]
(keep = 1 while epsilon is kept). In value composed = h + known_used - known_pred:
exactly h (bitwise, any dtype) when nothing overrides the prediction, and
shifted by what an intervention or teacher forcing changed. The known head gets
LM gradient only when epsilon is dropped, as with an unknown head. (Steerling
forms known_used + (h - stop_grad(known_used)) + epsilon: h whatever known_used
is, so steering does nothing there, and it drifts from h in bf16.) The
decomposition counts r with epsilon (LMOutput.residual).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cbm_lm.model.concepts import ConceptActivations, ConceptHead


class RewriteOutput(NamedTuple):
    known: ConceptActivations
    unknown: ConceptActivations | None
    known_features: jax.Array    # [B,T,D]
    unknown_features: jax.Array  # [B,T,D], zeros without an unknown head
    epsilon: jax.Array           # [B,T,D], the correction added (zeros when dropped)
    composed: jax.Array          # [B,T,D], what the LM head reads


class ConceptRewrite(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        cc = cfg.concepts
        pd = jnp.dtype(cfg.param_dtype)
        common = dict(d_model=cfg.d_model, block_size=cc.block_size,
                      dense_threshold=cc.dense_threshold, clip=cc.logit_clip, clip_mode=cc.clip_mode,
                      scoring=cc.scoring, kernels=cc.kernels,
                      init_std=cfg.init_std, rngs=rngs, param_dtype=pd)
        self.known_head = ConceptHead(
            n_concepts=cc.n_known, n_padded=cc.n_known_padded, rank=0, topk=cc.known_topk,
            report_topk=cc.known_report_topk, axis_name="known_concepts", **common)
        if cc.use_unknown:
            self.unknown_head = ConceptHead(
                n_concepts=cc.n_unknown, n_padded=cc.n_unknown_padded, rank=cc.unknown_rank,
                topk=cc.unknown_topk, report_topk=cc.unknown_report_topk,
                axis_name="unknown_concepts", **common)
        else:
            self.unknown_head = None
        self.epsilon_correction = cc.epsilon_correction

    def __call__(self, h: jax.Array, *, intervene_known=None, intervene_unknown=None,
                 drop_epsilon: bool | jax.Array = False, teacher_features=None,
                 teacher_alpha: float | jax.Array = 0.0) -> RewriteOutput:
        """h [B,T,D]. intervene_* = (ids [B,T,K], vals [B,T,K]) or None.

        drop_epsilon: a Python bool, or a [B] bool array (per-sequence dropout).
        teacher_features [B,T,D]: pooled ground-truth concept embeddings; the
        known features fed forward are pred + alpha (teacher - pred)
        (teacher forcing, training only; ``known.features`` stays the prediction).
        """
        known = self.known_head(h, *(intervene_known or (None, None)))
        known_features = known.features
        if teacher_features is not None:
            alpha = jnp.asarray(teacher_alpha, h.dtype)
            known_features = known_features + alpha * (teacher_features.astype(h.dtype) - known_features)
        if not self.epsilon_correction or intervene_known is not None:
            keep = jnp.zeros((h.shape[0], 1, 1), h.dtype)
        else:
            drop = jnp.broadcast_to(jnp.asarray(drop_epsilon), (h.shape[0],))
            keep = jnp.where(drop, 0.0, 1.0).astype(h.dtype)[:, None, None]

        if self.unknown_head is None:
            # The prediction's own features: a second head pass only when intervening.
            predicted = known.features if intervene_known is None else self.known_head(h).features
            sg = jax.lax.stop_gradient
            shift = sg(known_features - predicted)               # 0 unless overridden
            composed = h + shift + (1 - keep) * (known_features - sg(known_features))
            zeros = jnp.zeros_like(h)
            return RewriteOutput(known, None, known_features, zeros, zeros, composed)

        unknown = self.unknown_head(jax.lax.stop_gradient(h), *(intervene_unknown or (None, None)))
        unknown_features = unknown.features
        unk_for_lm = jax.lax.stop_gradient(unknown_features)
        epsilon = keep * (h - (unk_for_lm + known_features))
        composed = known_features + unk_for_lm + epsilon
        return RewriteOutput(known, unknown, known_features, unknown_features, epsilon, composed)
