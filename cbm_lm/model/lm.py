"""ConceptBottleneckLM: backbone -> concept rewrite -> LM head (tied by default).

  h        = Backbone(tokens)                    [B,T,D]
  rewrite  = ConceptRewrite(h)                   known + unknown + epsilon
  logits   = composed W_emb^T                    [B,T,V]

Since the LM head is linear in ``composed``, every logit splits exactly into
per-concept contributions plus epsilon (cbm_lm/attribution/decomposition.py).

With ``model.diffusion_shift`` (Dream's shift, diffusion only) row i of the output is
computed from the backbone's state at position i-1 of the same document (position 0 of
a document keeps its own): h'_i = h_{i-1}. Every row of LMOutput then still describes
the prediction of token i, so samplers, the decomposition and steering read it
unchanged, while the network predicts each token from the position before it, exactly
as a next-token model does; AR training carries over to diffusion (train/losses.py).

With a ProvenanceConfig that trains the learned key head (``trains_key_head``: head
"learned", contrastive_weight > 0) the model also carries ``provenance_head``, a
ChunkProvenanceHead whose mix W [4 d_p, d_p] is a param like any other: the train step
trains it (objectives/key_contrastive.py), checkpoints hold it, and re-keying
(provenance/rekey.py ``make_head``) uses it. The forward pass never reads it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cbm_lm.config import ModelConfig, ProvenanceConfig
from cbm_lm.model.backbone import Backbone
from cbm_lm.model.concepts import ConceptActivations
from cbm_lm.model.layers import normal, param, token_dot
from cbm_lm.model.provenance import ChunkProvenanceHead, trains_key_head
from cbm_lm.model.rewrite import ConceptRewrite


class LMOutput(NamedTuple):
    logits: jax.Array                    # [B,T,V] fp32
    hidden: jax.Array                    # [B,T,D] final-norm backbone output
    known: ConceptActivations            # known head: active set, weights, top-k
    unknown: ConceptActivations | None   # unknown head, None if disabled
    known_features: jax.Array            # [B,T,D]
    unknown_features: jax.Array          # [B,T,D]
    epsilon: jax.Array                   # [B,T,D]
    composed: jax.Array                  # [B,T,D]
    kv_cache: tuple | None = None        # updated KV cache when decoding with one

    @property
    def residual(self) -> jax.Array:
        """composed - known - unknown [B,T,D]: what the concepts leave to the logit.

        Equals epsilon when there is an unknown head; without one it also holds
        Steerling's h - stop_grad(known) slot.
        """
        return self.composed - self.known_features - self.unknown_features


def shift_to_predictions(h: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                         earlier_block: jax.Array | None = None, block_size: int = 1
                         ) -> jax.Array:
    """h [B,T,D] -> h' [B,T,D] with h'_i = h_{i-1} inside a document (h'_i = h_i at its start).

    ``earlier_block`` [B,T,D] (two-stream training: the clean stream) is read instead of
    ``h`` where position i-1 lies in an earlier diffusion block than i (i % b == 0): at
    generation time that block is committed, so its clean state is what the sampler sees.
    positions / segment_ids [B,T]: documents restart positions at 0.
    """
    prev_ok = (positions > 0) & (segment_ids == jnp.roll(segment_ids, 1, axis=1))
    prev = jnp.roll(h, 1, axis=1)
    if earlier_block is not None:
        new_block = (positions % block_size == 0)[..., None]
        prev = jnp.where(new_block, jnp.roll(earlier_block, 1, axis=1), prev)
    return jnp.where(prev_ok[..., None], prev, h)


def predicting_positions(targets, segment_ids, shift: bool):
    """[B,T] bool: the positions whose state predicts a token of ``targets`` [B,T] bool:
    the targets themselves, and under ``diffusion_shift`` (token i read from position i-1,
    ``shift_to_predictions``) also the position before each, in the same document. Where a
    steering injection must land to reach those predictions. numpy or jax arrays."""
    xp = jnp if isinstance(targets, jax.Array) else np
    targets = targets & (segment_ids > 0)
    if not shift:
        return targets
    pad = xp.zeros_like(targets[:, :1])
    next_target = xp.concatenate([targets[:, 1:], pad], axis=1)
    same_doc = xp.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1], pad], axis=1)
    return targets | (next_target & same_doc)


class ConceptBottleneckLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs,
                 provenance: ProvenanceConfig | None = None):
        """provenance: the run's provenance section; the model carries the learned key
        head when it trains one (module docstring)."""
        self.config = cfg
        self.backbone = Backbone(cfg, rngs=rngs)
        self.rewrite = ConceptRewrite(cfg, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, normal(cfg.init_std), (cfg.vocab_size, cfg.d_model),
                                 ("vocab", "embed"), jnp.dtype(cfg.param_dtype))
        if trains_key_head(provenance):
            self.provenance_head = ChunkProvenanceHead(provenance, cfg, rngs=rngs)

    def unembedding(self) -> jax.Array:
        """W [V,D]: logits = composed W^T."""
        if self.config.tie_embeddings:
            return self.backbone.embedding[...]
        return self.lm_head[...]

    def hidden(self, tokens=None, *, positions=None, segment_ids=None, **backbone_kw):
        """The backbone state each row's prediction reads, [B,T,D]: the backbone's h, moved
        one position right within each document under ``diffusion_shift``."""
        h = self.backbone(tokens, positions=positions, segment_ids=segment_ids, **backbone_kw)
        if not self.config.diffusion_shift:
            return h
        h, cache = h if backbone_kw.get("kv_cache") is not None else (h, None)
        ref = tokens if tokens is not None else backbone_kw["input_embeds"]
        b, t = ref.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        h = shift_to_predictions(h, positions, segment_ids)
        return h if cache is None else (h, cache)

    def logits_from(self, composed: jax.Array) -> jax.Array:
        """composed [B,T,D] -> logits [B,T,V] fp32 (the tied LM head), accumulated in fp32
        whatever the compute dtype: bf16 logits near 16 are 0.125 apart."""
        w = self.unembedding().astype(composed.dtype)
        return token_dot(composed, w.T, out_dtype=jnp.float32)

    def __call__(self, tokens: jax.Array | None = None, *, positions=None, segment_ids=None,
                 stream=None, input_embeds=None, intervene_known=None, intervene_unknown=None,
                 drop_epsilon=False, teacher_features=None, teacher_alpha=0.0,
                 injection=None, inject_layer=None, inject_alpha: float = 1.0,
                 kv_cache=None) -> LMOutput:
        """tokens [B,T] int32 (or input_embeds [B,T,D]) -> LMOutput.

        positions / segment_ids [B,T] describe packed documents (default: one
        document, positions 0..T-1). stream [B,T] (0 noisy / 1 clean) selects
        two-stream diffusion attention (model/attention.py).
        intervene_* = (ids [B,T,K], vals [B,T,K]).
        kv_cache (Backbone.init_kv_cache, causal models): decode the T new tokens
        at ``positions`` against the cache; the updated cache is in the output.
        """
        h = self.hidden(tokens, positions=positions, segment_ids=segment_ids, stream=stream,
                        input_embeds=input_embeds, injection=injection,
                        inject_layer=inject_layer, inject_alpha=inject_alpha,
                        kv_cache=kv_cache)
        if kv_cache is not None:
            h, kv_cache = h
        rw = self.rewrite(h, intervene_known=intervene_known,
                          intervene_unknown=intervene_unknown, drop_epsilon=drop_epsilon,
                          teacher_features=teacher_features, teacher_alpha=teacher_alpha)
        return LMOutput(self.logits_from(rw.composed), h, rw.known, rw.unknown, rw.known_features,
                        rw.unknown_features, rw.epsilon, rw.composed, kv_cache)


def abstract_lm(cfg: ModelConfig, provenance: ProvenanceConfig | None = None):
    """(graphdef, param State of ShapeDtypeStructs) of the model; nothing is allocated.
    provenance: as for ConceptBottleneckLM (adds the learned key head's W when trained).

    The model holds only nnx.Param state, so ``nnx.merge(graphdef, params)``
    rebuilds a live module from any params of this structure.
    """
    abstract = nnx.eval_shape(lambda: ConceptBottleneckLM(cfg, rngs=nnx.Rngs(0),
                                                          provenance=provenance))
    return nnx.split(abstract, nnx.Param)
