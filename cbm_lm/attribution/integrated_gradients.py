"""Integrated gradients on input embeddings (Sundararajan et al. 2017).

For one logit query q (an input sequence x_q [L] with embeddings e = E[x_q]
[L,D], a read position r_q and a target token y_q), with f_q(e) the model's
logit of y_q at r_q and a baseline b [L,D]:

  IG_q[t] = sum_d (e - b)[t,d] * (1/n) sum_{s=1..n} d f_q(b + (s/n)(e - b)) / d e[t,d]

(right Riemann sum with ``n_steps`` = n; n = 1 is gradient x input). By the
fundamental theorem of calculus sum_t IG_q[t] -> f_q(e) - f_q(b) as n grows
(completeness); ``IGResult`` returns both ends so the gap can be checked.

Baselines (Steerling's BaselineMode): "mask" puts the MASK embedding at every
position (the trained absence-of-information state of a diffusion model), so
positions still masked in a diffusion snapshot get exactly zero attribution;
"pad" the PAD embedding; "zero" the zero vector.

The function integrated is the model's logit, written without the training
time stop-gradients of the concept rewrite (cbm_lm/model/rewrite.py), so the
gradient is the true gradient of the value the model computes:

  composed = K(h) + U(h) + keep * (h - K(h) - U(h))     with an unknown head
  composed = h + K(h) - K_pred(h)                      without one

with K, U the known/unknown features as used (interventions applied), K_pred
the known head's own prediction, keep = 0 when epsilon is dropped (weight
interventions), else 1. Unsteered, composed == h. Under weight interventions the logit goes through the concept
heads' top-k selection, which jumps where the active set changes along the
path; the path integrated holds each head's active set at the one selected
for the explained input x (``active_sets``), so f is smooth, f(x) is the
model's logit, and completeness holds (f(baseline) is then the logit of the
baseline with x's concepts active).

Queries are batched: Q rows run as one [Q,L,D] forward + backward per
Riemann step (the logit of row q depends only on row q, so the gradient of
the sum is the per-row gradient), in jitted batches of ``batch_size`` rows,
optionally sharded over the mesh's batch axes.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cbm_lm.model.lm import ConceptBottleneckLM

BASELINES = ("mask", "pad", "zero")


class LogitQuery(NamedTuple):
    """Q logit queries: the exact model call that produced each logit, and the logit.

    tokens:        [Q,L] int32  the model input (a diffusion snapshot, or the AR prefix)
    read_pos:      [Q]   int32  position whose logits are read (p for diffusion, p-1 for AR)
    targets:       [Q]   int32  the token whose logit is explained
    positions:     [Q,L] int32  RoPE positions (packed/left-padded rows), or None for 0..L-1
    segment_ids:   [Q,L] int32  attention segments (0 = padding), or None for one segment
    known_ids / known_vals:     [Q,L,K] weight interventions on the known head, or None
    unknown_ids / unknown_vals: [Q,L,K] weight interventions on the unknown head, or None
    drop_epsilon:  [Q]   bool   whether the call dropped epsilon (True under interventions)
    injection:     [Q,L,D] fp32 residual-stream injection (alpha already folded in), or None
    """
    tokens: jax.Array
    read_pos: jax.Array
    targets: jax.Array
    positions: jax.Array | None = None
    segment_ids: jax.Array | None = None
    known_ids: jax.Array | None = None
    known_vals: jax.Array | None = None
    unknown_ids: jax.Array | None = None
    unknown_vals: jax.Array | None = None
    drop_epsilon: jax.Array | None = None
    injection: jax.Array | None = None

    @property
    def num(self) -> int:
        return int(self.tokens.shape[0])

    def take(self, rows) -> "LogitQuery":
        """The queries at ``rows`` (numpy int array), every field sliced alike."""
        return LogitQuery(*(None if f is None else jnp.asarray(f)[rows] for f in self))


class IGResult(NamedTuple):
    """attributions [Q,L] fp32; f_input / f_baseline [Q]: the logit at e and at b."""
    attributions: jax.Array
    f_input: jax.Array
    f_baseline: jax.Array

    def completeness_gap(self) -> jax.Array:
        """[Q]: sum_t IG[t] - (f(e) - f(b)); -> 0 as n_steps grows on a smooth path."""
        return self.attributions.sum(-1) - (self.f_input - self.f_baseline)


def baseline_embedding(model: ConceptBottleneckLM, mode: str = "mask", *,
                       mask_id: int | None = None, pad_id: int | None = None) -> jax.Array:
    """The [D] baseline vector for ``mode`` in BASELINES (fp32)."""
    if mode not in BASELINES:
        raise ValueError(f"baseline: expected one of {BASELINES}, got {mode!r}")
    if mode == "zero":
        return jnp.zeros((model.config.d_model,), jnp.float32)
    if mode == "mask":
        token = model.config.resolved_mask_token_id if mask_id is None else mask_id
    elif pad_id is None:
        raise ValueError("baseline 'pad' needs pad_id (the tokenizer's <|pad|> id)")
    else:
        token = pad_id
    return model.backbone.embedding[...][token].astype(jnp.float32)


def read_hidden(model: ConceptBottleneckLM, embeds: jax.Array, q: LogitQuery,
                inject_layer: int | None = None) -> jax.Array:
    """The final-norm hidden state at each query's read position, [Q,1,D]."""
    h = model.hidden(input_embeds=embeds, positions=q.positions, segment_ids=q.segment_ids,
                     injection=q.injection, inject_layer=inject_layer)
    return h[jnp.arange(embeds.shape[0]), q.read_pos][:, None, :]


def active_sets(model: ConceptBottleneckLM, h_r: jax.Array):
    """(known ids, unknown ids) [Q,1,k] the heads select for h_r [Q,1,D] (None: dense head)."""
    out = []
    for head in (model.rewrite.known_head, model.rewrite.unknown_head):
        if head is None or head.topk is None:
            out.append(None)
            continue
        ids = head.select_topk(head.query(h_r[:, 0]), head.topk)
        out.append(jax.lax.stop_gradient(ids)[:, None, :])
    return tuple(out)


def query_logits(model: ConceptBottleneckLM, embeds: jax.Array, q: LogitQuery,
                 inject_layer: int | None = None, active=(None, None)) -> jax.Array:
    """f_q(embeds): the logit of q.targets at q.read_pos, [Q], for input embeddings [Q,L,D].

    Equal in value to ``model(q.tokens, ...).logits[q, read_pos, target]`` but
    differentiable end to end (no stop-gradients; see the module docstring).
    active: (known, unknown) ids [Q,1,k] to hold the heads' active sets at, or None.
    """
    h_r = read_hidden(model, embeds, q, inject_layer)
    n = embeds.shape[0]
    rows = jnp.arange(n)

    def at_read(ids, vals):
        if ids is None:
            return None, None
        return ids[rows, q.read_pos][:, None], vals[rows, q.read_pos][:, None]

    rw = model.rewrite
    known = rw.known_head(h_r, *at_read(q.known_ids, q.known_vals), active_ids=active[0]).features
    if rw.unknown_head is None:
        # composed = h + known_used - known_pred in value (cbm_lm/model/rewrite.py).
        predicted = rw.known_head(h_r, active_ids=active[0]).features
        composed = h_r + known - predicted
        return _logit(model, composed, q.targets)
    unknown = rw.unknown_head(h_r, *at_read(q.unknown_ids, q.unknown_vals),
                              active_ids=active[1]).features
    keep = jnp.ones((n,), h_r.dtype) if q.drop_epsilon is None else (
        1.0 - q.drop_epsilon.astype(h_r.dtype))
    if not rw.epsilon_correction:
        keep = jnp.zeros_like(keep)
    composed = known + unknown + keep[:, None, None] * (h_r - known - unknown)
    return _logit(model, composed, q.targets)


def _logit(model, composed, targets):
    """composed [Q,1,D] . W_y -> [Q]."""
    w_y = jnp.take(model.unembedding(), targets, axis=0).astype(jnp.float32)     # [Q,D]
    return jnp.einsum("qd,qd->q", composed[:, 0].astype(jnp.float32), w_y)


def _ig_rows(graphdef, state, q: LogitQuery, baseline, n_steps, inject_layer):
    model = nnx.merge(graphdef, state)
    for head in (model.rewrite.known_head, model.rewrite.unknown_head):
        # Same values; the true (zero) gradient past the cap, which completeness needs.
        if head is not None and head.clip_mode == "straight_through":
            head.clip_mode = "hard"
    e = model.backbone.embed(q.tokens).astype(jnp.float32)               # [Q,L,D]
    b = jnp.broadcast_to(baseline, e.shape).astype(jnp.float32)
    delta = e - b
    active = active_sets(model, read_hidden(model, e, q, inject_layer))

    def f(x):
        return query_logits(model, x, q, inject_layer, active)

    def total(x):
        return f(x).sum()

    def step(s, acc):
        alpha = (s + 1).astype(jnp.float32) / n_steps.astype(jnp.float32)
        return acc + jax.grad(total)(b + alpha * delta)

    grads = jax.lax.fori_loop(0, n_steps, step, jnp.zeros_like(e))
    attributions = (delta * grads).sum(-1) / n_steps
    return attributions, f(e), f(b)


@functools.lru_cache(maxsize=32)
def _compiled(graphdef, inject_layer):
    # n_steps is traced (a while loop), so one compilation serves every n_steps.
    return jax.jit(functools.partial(_ig_rows, graphdef, inject_layer=inject_layer))


def integrated_gradients(model: ConceptBottleneckLM, queries, *,
                         baseline: str | jax.Array = "mask", n_steps: int = 32,
                         inject_layer: int | None = None, batch_size: int = 16,
                         mask_id: int | None = None, pad_id: int | None = None,
                         mesh: Mesh | None = None, batch_axes=("data", "fsdp")) -> IGResult:
    """IG of each query's logit w.r.t. its input embeddings.

    model: a ConceptBottleneckLM (its params may be sharded over ``mesh``).
    queries: Q LogitQuery rows, or any source with ``num`` and ``take(rows) ->
    LogitQuery`` (cbm_lm.attribution.replay.ReplaySet builds them lazily). baseline: a mode in BASELINES, or a [D] / [L,D] array.
    inject_layer: the layer L the queries' ``injection`` is added from (static).
    batch_size: rows per jitted call (the last batch is padded by repeating row 0).
    mesh: shard the rows over ``batch_axes`` of this mesh (batch_size is rounded
    up to a multiple of their size); params keep their own shardings.
    Returns IGResult with attributions [Q,L].
    """
    if n_steps < 1:
        raise ValueError(f"n_steps: expected >= 1, got {n_steps}")
    if isinstance(baseline, str):
        baseline = baseline_embedding(model, baseline, mask_id=mask_id, pad_id=pad_id)
    graphdef, state = nnx.split(model)
    row_sharding = None
    if mesh is not None:
        axes = tuple(a for a in batch_axes if a in mesh.shape)
        n_dev = int(np.prod([mesh.shape[a] for a in axes]))
        batch_size = -(-batch_size // n_dev) * n_dev
        row_sharding = NamedSharding(mesh, P(axes))
    fn = _compiled(graphdef, inject_layer)
    outs = []
    for start in range(0, queries.num, batch_size):
        rows = np.arange(start, min(start + batch_size, queries.num))
        pad = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])
        qb = queries.take(pad)
        if qb.injection is not None and inject_layer is None:
            raise ValueError("queries carry an injection but no inject_layer was given")
        if row_sharding is not None:
            qb = jax.tree.map(lambda x: jax.device_put(x, row_sharding), qb)
        with _maybe_mesh(mesh):
            a, fi, fb = fn(state, qb, jnp.asarray(baseline), n_steps=jnp.int32(n_steps))
        outs.append((a[: len(rows)], fi[: len(rows)], fb[: len(rows)]))
    if not outs:
        raise ValueError("integrated_gradients: no queries")
    return IGResult(*(jnp.concatenate([o[i] for o in outs]) for i in range(3)))


def _maybe_mesh(mesh):
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
