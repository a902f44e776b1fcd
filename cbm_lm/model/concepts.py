"""ConceptHead: sparse sigmoid concept activations and their features.

For hidden states h [B,T,D] and C concepts:

  logits   z = cap(q K^T)                   [B,T,C]  (never materialized for large C)
  weights  w = sigmoid(z)
  active   S = top-k of z per token         (k = ``topk``; None = all C)
  features f = sum_{i in S} w_i E_i         [B,T,D]

Two parameterizations (Steerling's names):
  dense (rank 0):   q = h,         K = predictor [C,D],             E = embedding [C,D]
  factorized (r):   q = h down,    K = predictor_up [C,r],          E_i = embedding_coef_i basis
                    down [D,r],    embedding_coef [C,r], basis [r,D]
The factorized features are formed in rank space: f = (sum_i w_i coef_i) basis.

Top-k selection runs in blocks of ``block_size`` concepts (a running top-k
merged block by block), so memory is O(B*T*(k + block)), not O(B*T*C), once C
exceeds ``dense_threshold``. The selected logits are then recomputed from the
gathered rows so gradients reach the tables; the selection itself is not
differentiated. Up to ``dense_threshold`` the selection scores all of z [N,C]
anyway, so the selected logits are read off it (``picked_logits``) and only
their gradient gathers rows: the forward (inference) gathers no [N,k,Q] keys. On
CPU the ranking runs in compiled kernels that apply the hard or straight-through cap
themselves (the soft cap stays XLA's) and, for a factorized head, never write z out
(model/topk_cpu.py, model/factorized_topk_cpu.py). That kernel sums a factorized
head's z in its own order, so its ids can differ from the blockwise scoring's or
``kernels="xla"``'s, which rank XLA's product, where two logits tie within rounding.

The cap bounds logits to [-c, c] (``clip_mode``, DESIGN.md section 2):
  hard              clip(z, -c, c)                 Steerling's; zero gradient outside
  straight_through  z + stop_grad(clip(z) - z)     Steerling's values, gradient 1 everywhere
  soft              c tanh(z / c)                  smooth; values differ from Steerling's
A hard clip never lets the loss pull back a concept pushed past c (its
gradient is 0 there), so training configs default to straight_through, which
keeps every forward value (and so parity with Steerling) unchanged.

Interventions override the weight of chosen concepts at chosen positions:
``intervene_ids`` [B,T,K] (-1 = no-op slot) and ``intervene_vals`` [B,T,K].
A top-k slot whose concept is overridden gets weight 0 and the overriding
value is added as an extra active slot, so ``features`` always equals
sum(weights * E[indices]) over the returned active set: the exact logit
decomposition holds with and without interventions.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cbm_lm.model.concept_topk import cap_logits, map_row_shards, sharded_streaming_topk
from cbm_lm.model.layers import normal, param
from cbm_lm.model.sparse_rows import mix, pick
from cbm_lm.model.sparse_rows_cpu import gather_mix, gather_pick
from cbm_lm.model.factorized_topk_cpu import factorized_top_k
from cbm_lm.model.topk_cpu import top_k_capped, top_k_ids


class ConceptActivations(NamedTuple):
    """What a ConceptHead produced for [B,T] tokens.

    features:     [B,T,D]  sum(weights * E[indices]) over the active slots.
    indices:      [B,T,S]  active concept ids (top-k, then intervened ids); 0 where weight is 0 padding.
    weights:      [B,T,S]  the weights actually used (sigmoid, override value, or 0).
    topk_indices: [B,T,k'] the predicted top-k' concept ids (before interventions), best first.
    topk_logits:  [B,T,k'] their clipped logits.
    mixed:        [B,T,r]  a factorized head's rank-space mix sum(weights * coef[indices]),
                           so features = mixed @ basis; None for a dense head (its mix is
                           ``features``). Lets a loss of the features work in rank space.
    """
    features: jax.Array
    indices: jax.Array
    weights: jax.Array
    topk_indices: jax.Array
    topk_logits: jax.Array
    mixed: jax.Array | None = None

    @property
    def topk_weights(self) -> jax.Array:
        return jax.nn.sigmoid(self.topk_logits)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def picked_logits(q: jax.Array, keys: jax.Array, ids: jax.Array, z_picked: jax.Array,
                  kernels: str = "auto") -> jax.Array:
    """z_picked = z[n, ids[n,s]] [N,S], already read off the dense selection's z = q keys^T,
    with the gradient of q[n] . keys[ids[n,s]] (``gather_pick``); z_picked gets none."""
    return z_picked


def _picked_fwd(q, keys, ids, z_picked, kernels):
    return z_picked, (q, keys, ids)


def _picked_bwd(kernels, res, g):
    q, keys, ids = res
    _, vjp = jax.vjp(lambda q_, k_: gather_pick(q_, k_, ids, kernels), q, keys)
    dq, dkeys = vjp(g)
    return dq, dkeys, None, jnp.zeros_like(g)


picked_logits.defvjp(_picked_fwd, _picked_bwd)


class ConceptHead(nnx.Module):
    """h [B,T,D] -> ConceptActivations (see module docstring)."""

    def __init__(self, *, n_concepts: int, n_padded: int, d_model: int, rank: int,
                 topk: int | None, report_topk: int | None, block_size: int,
                 dense_threshold: int, clip: float, axis_name: str, init_std: float,
                 rngs: nnx.Rngs, param_dtype=jnp.float32, clip_mode: str = "hard",
                 scoring: str = "gather", kernels: str = "auto"):
        self.n_concepts, self.rank, self.topk = n_concepts, rank, topk
        self.kernels = kernels
        self.report_topk = report_topk if report_topk is not None else (topk or 64)
        self.report_topk = min(self.report_topk, n_concepts)
        self.block_size, self.dense_threshold, self.clip = block_size, dense_threshold, clip
        self.clip_mode, self.scoring = clip_mode, scoring
        init = normal(init_std)
        c = self.axis_name = axis_name
        if rank:
            self.predictor_down = param(rngs, init, (d_model, rank), ("embed", "rank"), param_dtype)
            self.predictor_up = param(rngs, init, (n_padded, rank), (c, "rank"), param_dtype)
            self.embedding_coef = param(rngs, init, (n_padded, rank), (c, "rank"), param_dtype)
            self.embedding_basis = param(rngs, init, (rank, d_model), ("rank", "embed"), param_dtype)
        else:
            self.predictor = param(rngs, init, (n_padded, d_model), (c, "embed"), param_dtype)
            self.embedding = param(rngs, init, (n_padded, d_model), (c, "embed"), param_dtype)

    # -- the two parameterizations behind one interface ---------------------------------
    def keys(self) -> jax.Array:
        """[C_pad, Q]: the rows whose dot product with the query is the logit."""
        return (self.predictor_up if self.rank else self.predictor)[...]

    def values(self) -> jax.Array:
        """[C_pad, V]: the rows mixed by the weights (rank space when factorized)."""
        return (self.embedding_coef if self.rank else self.embedding)[...]

    def query(self, h: jax.Array) -> jax.Array:
        """h [...,D] -> q [...,Q] in fp32 (the factorized down-projection accumulates and
        returns fp32: rounding q to a bf16 compute dtype moved every unknown logit by up to
        ~0.4% and could flip near-ties in its top-k)."""
        if self.rank:
            return jnp.matmul(h, self.predictor_down[...].astype(h.dtype),
                              preferred_element_type=jnp.float32)
        return h.astype(jnp.float32)

    def out_proj(self, v: jax.Array) -> jax.Array:
        """Mixed values [...,V] -> features [...,D]."""
        return v @ self.embedding_basis[...].astype(v.dtype) if self.rank else v

    def mix_values(self, weights: jax.Array, ids: jax.Array) -> jax.Array:
        """sum_s weights[n,s] values[ids[n,s]] -> [N,V] fp32 (weights, ids [N,S]): blockwise
        (``scoring``: its gradient is a block matmul, not a scatter of [N,S,V] rows) or by
        gathering the rows."""
        if self.scoring == "blockwise":
            return mix(weights, ids, self.values(), self.block_size)
        return gather_mix(weights, ids, self.values(), self.kernels)

    def concept_vectors(self, ids: jax.Array) -> jax.Array:
        """E[ids]: the feature direction of each concept, [...,D]."""
        return self.out_proj(jnp.take(self.values(), ids, axis=0).astype(jnp.float32))

    def dense_logits(self, h: jax.Array) -> jax.Array:
        """All logits [B,T,C]; refuses above dense_threshold (analysis only)."""
        if self.n_concepts > self.dense_threshold:
            raise ValueError(
                f"dense logits over {self.n_concepts} concepts exceed dense_threshold="
                f"{self.dense_threshold}; use the streaming top-k outputs instead")
        keys = self.keys()[: self.n_concepts].astype(jnp.float32)
        return self.cap(self.query(h) @ keys.T)

    def select_topk(self, q: jax.Array, k: int) -> jax.Array:
        """Indices [N,k] of the k largest logits per row (no gradient)."""
        q = jax.lax.stop_gradient(q)
        keys = jax.lax.stop_gradient(self.keys())
        if self.n_concepts <= self.dense_threshold:
            z = self.cap(q @ keys[: self.n_concepts].astype(jnp.float32).T)
            return top_k_ids(z, k, self.kernels)
        return sharded_streaming_topk(q, keys, self.n_concepts, k, self.block_size, self.clip,
                                      self.clip_mode, concept_axis=self.axis_name)[1]

    def dense_select(self, q: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
        """(ids [N,k], capped logits [N,k]) of the top-k of z = q K^T over all
        n_concepts <= dense_threshold, ranked on cap(z); the logits carry the
        gathered-row gradient. The factorized head scores and ranks in one kernel
        (model/factorized_topk_cpu.py: its z [N,C] is a rank-r product, cheaper to
        recompute in cache than to write out); the dense head forms z with XLA."""
        keys = self.keys()[: self.n_concepts]
        q_sg = jax.lax.stop_gradient(q)
        keys_sg = jax.lax.stop_gradient(keys).astype(jnp.float32)
        if self.rank:
            ids, z_ids = map_row_shards(
                lambda q_s, ut: factorized_top_k(q_s, ut, k, self.clip, self.clip_mode,
                                                 self.kernels),
                q_sg, keys_sg.T)
        else:
            ids, z_ids = top_k_capped(q_sg @ keys_sg.T, k, self.clip, self.clip_mode,
                                      self.kernels)
        return ids, self.cap(picked_logits(q, keys, ids, z_ids, self.kernels))

    def logits_for(self, q: jax.Array, ids: jax.Array) -> jax.Array:
        """Capped logits of concepts ``ids`` [N,S] for queries q [N,Q] -> [N,S]."""
        if self.scoring == "blockwise":
            return self.cap(pick(q, self.keys(), ids, self.block_size))
        return self.cap(gather_pick(q, self.keys(), ids, self.kernels))

    def cap(self, z: jax.Array) -> jax.Array:
        """Raw logits -> capped logits (``clip_mode``), the only place the cap is applied."""
        return cap_logits(z, self.clip, self.clip_mode)

    # -- forward ------------------------------------------------------------------------
    def __call__(self, h: jax.Array, intervene_ids: jax.Array | None = None,
                 intervene_vals: jax.Array | None = None,
                 active_ids: jax.Array | None = None) -> ConceptActivations:
        """active_ids [B,T,k]: use this active set instead of selecting the top-k
        (attribution holds the set fixed along an integration path)."""
        b, t, d = h.shape
        q = self.query(h.reshape(b * t, d))
        logits = None
        every = active_ids is None and self.topk is None     # all C concepts, every row
        if active_ids is not None:
            ids = active_ids.reshape(b * t, -1).astype(jnp.int32)
        elif self.topk is None:
            if self.n_concepts > self.dense_threshold:
                raise ValueError(
                    f"topk=None weights all {self.n_concepts} concepts densely; that is only "
                    f"allowed up to dense_threshold={self.dense_threshold}")
            ids = jnp.broadcast_to(jnp.arange(self.n_concepts, dtype=jnp.int32),
                                   (b * t, self.n_concepts))
            # z = q K^T as one matmul: scoring ids = 0..C-1 row by row would gather (or
            # block-scatter) C key rows per token, [N,C,Q], where XLA's own ops run it
            logits = self.cap(q @ self.keys()[: self.n_concepts].astype(jnp.float32).T)
        elif self.scoring == "gather" and self.n_concepts <= self.dense_threshold:
            ids, logits = self.dense_select(q, self.topk)                         # [N,k]
        else:
            ids = self.select_topk(q, self.topk)
        if logits is None:
            logits = self.logits_for(q, ids)                                      # [N,k]
        weights = jax.nn.sigmoid(logits)

        if self.report_topk == ids.shape[-1] and self.topk is not None:
            top_ids, top_logits = ids, logits
        else:
            pos = top_k_ids(logits, self.report_topk, self.kernels)
            top_ids = jnp.take_along_axis(ids, pos, axis=-1)
            top_logits = jnp.take_along_axis(logits, pos, axis=-1)

        if intervene_ids is not None:
            iv_ids = intervene_ids.reshape(b * t, -1).astype(jnp.int32)
            iv_vals = intervene_vals.reshape(b * t, -1).astype(jnp.float32)
            valid = iv_ids >= 0
            overridden = jnp.any((ids[:, :, None] == iv_ids[:, None, :]) & valid[:, None, :], -1)
            weights = jnp.where(overridden, 0.0, weights)
            ids = jnp.concatenate([ids, jnp.where(valid, iv_ids, 0)], axis=-1)
            weights = jnp.concatenate([weights, jnp.where(valid, iv_vals, 0.0)], axis=-1)

        if every:       # sum_c w[n,c] V[c] over all C as a matmul, + any intervened rows
            c = self.n_concepts
            mixed = weights[:, :c] @ self.values()[:c].astype(jnp.float32)
            if ids.shape[-1] > c:
                mixed = mixed + self.mix_values(weights[:, c:], ids[:, c:])
        else:
            mixed = self.mix_values(weights, ids)
        features = self.out_proj(mixed).astype(h.dtype)

        def shape(x):
            return x.reshape(b, t, *x.shape[1:])

        return ConceptActivations(shape(features), shape(ids), shape(weights),
                                  shape(top_ids), shape(top_logits),
                                  shape(mixed) if self.rank else None)
