"""Training the learned chunk-provenance key head: in-batch InfoNCE between two views.

The learned head (model/provenance.py, ``provenance.head="learned"``) keys chunk j as

  key_j = n(u_j + p_j W)     u_j = sum_p lambda_p p_j^p (the fixed key, before n),
                             p_j = [n(a^k), n(a^u), n(a^h), n(a^x)]_j  [4 d_p], W [4 d_p, d_p]

and the train step (train/losses.py) adds ``provenance.contrastive_weight`` x

  L = 1/2 (CE(K_a K_b^T / tau, diag) + CE(K_b K_a^T / tau, diag))   (``contrastive_loss``)

over the valid chunks of the batch (valid in both views), K_v [N, d_p] the keys of the
same chunks computed from two views of them, both from the step's one forward pass:

  two-stream diffusion [noisy | clean]: view a pools the noisy stream (its hidden state,
      its concepts, its tokens with the mask id where masked), view b the clean stream;
  otherwise (autoregressive, a diffusion model's AR warmup, one-stream diffusion):
      token dropout. View v pools only the tokens t with keep^v_t = 1,
      keep^v_t ~ Bernoulli(1 - r) independently per token and view, r =
      ``provenance.token_dropout`` (``token_dropout_views``); a chunk whose every
      token is dropped in a view has no key there and leaves the loss.

Gradient: the pooled inputs (hidden state, concept active sets, next-token losses) enter
under stop_gradient, so L trains W alone and cannot move the LM (the fixed tables are
constants). W starts at 0, where the key is the fixed key.

Shapes: hidden [B,T,D]; known / unknown active sets [B,T,S]; tokens, chunk segment
ids [B,T]; nll [B,T-1]; keys [B,M,d_p], M = ``provenance.max_chunks_per_row``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cbm_lm.model.provenance import ChunkProvenanceHead, ProjectionTables, contrastive_loss


class KeyView(NamedTuple):
    """One view of a batch's chunks: what the head pools (see the module docstring)."""
    hidden: jax.Array                # [B,T,D]
    known: object                    # ConceptActivations, indices / weights [B,T,S]
    unknown: object | None
    tokens: jax.Array                # [B,T] the tokens the view's stream read
    chunk_segment_ids: jax.Array     # [B,T] 0 = not pooled
    nll: jax.Array | None            # [B,T-1] next-token losses (autoregressive pooling)


def token_dropout_views(rng: jax.Array, chunk_segment_ids: jax.Array, rate: float
                        ) -> tuple[jax.Array, jax.Array]:
    """Two chunk segment id arrays [B,T]: each keeps a token's id with probability 1 - rate
    (independent masks) and sets the others to 0, which the head's pooling skips."""
    ka, kb = jax.random.split(rng)
    keep_a = jax.random.uniform(ka, chunk_segment_ids.shape) >= rate
    keep_b = jax.random.uniform(kb, chunk_segment_ids.shape) >= rate
    zero = jnp.zeros_like(chunk_segment_ids)
    return (jnp.where(keep_a, chunk_segment_ids, zero),
            jnp.where(keep_b, chunk_segment_ids, zero))


def view_keys(head: ChunkProvenanceHead, view: KeyView, segment_ids: jax.Array,
              tables: ProjectionTables | None = None):
    """ChunkKeys of ``view``, its inputs under stop_gradient (only the head's W learns)."""
    sg = jax.lax.stop_gradient
    out = SimpleNamespace(logits=None, hidden=sg(view.hidden), known=jax.tree.map(sg, view.known),
                          unknown=None if view.unknown is None else jax.tree.map(sg, view.unknown))
    nll = None if view.nll is None else sg(view.nll)
    return head(out, view.tokens, segment_ids, view.chunk_segment_ids, nll=nll, tables=tables)


def in_batch_top1(keys_a: jax.Array, keys_b: jax.Array, valid: jax.Array) -> jax.Array:
    """Fraction of valid chunks whose nearest view-b key (inner product, over the batch's
    valid chunks) is their own: the retrieval the loss trains, as a number to watch."""
    a = keys_a.reshape(-1, keys_a.shape[-1])
    b = keys_b.reshape(-1, keys_b.shape[-1])
    v = valid.reshape(-1)
    sims = jnp.where(v[None, :], a @ b.T, -jnp.inf)
    hit = (jnp.argmax(sims, axis=1) == jnp.arange(a.shape[0])) & v
    return hit.sum().astype(jnp.float32) / jnp.maximum(v.sum(), 1).astype(jnp.float32)


def key_contrastive_loss(head: ChunkProvenanceHead, view_a: KeyView, view_b: KeyView,
                         segment_ids: jax.Array, tables: ProjectionTables | None = None
                         ) -> tuple[jax.Array, dict]:
    """(L, metrics): the InfoNCE of the module docstring between the two views' keys,
    at ``head.cfg.contrastive_temperature``; metrics: in-batch top-1 and chunk count."""
    ka = view_keys(head, view_a, segment_ids, tables)
    kb = view_keys(head, view_b, segment_ids, tables)
    valid = ka.valid & kb.valid
    loss = contrastive_loss(ka.keys, kb.keys, valid, head.cfg.contrastive_temperature)
    return loss, {"provenance_view_top1": jax.lax.stop_gradient(
                      in_batch_top1(ka.keys, kb.keys, valid)),
                  "provenance_view_chunks": valid.sum().astype(jnp.float32)}
