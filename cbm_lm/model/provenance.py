"""ChunkProvenanceHead: one unit key per chunk, from what the model holds about it.

For one packed row with chunk segments c(t) in {0 (padding), 1..m}, the tokens
T_j of chunk j, and pooling weights pi_t (uniform, or the model's surprisal):

  pi_t        = -log p(x_t | x_<t)   from the same forward pass's logits (``surprisal``);
                a segment's first token, which has no prediction, gets its chunk's mean.
                Autoregressive models only: a diffusion model's clean pass predicts
                no token from its past, so it pools uniformly (pi_t = 1)
  mean_j(y)   = sum_{t in T_j} pi_t y_t / sum_{t in T_j} pi_t
  a_j^known   = mean_j( sum_s w^k_{t,s} R_k[i^k_{t,s}] )     pooled sparse known concepts
  a_j^unknown = mean_j( sum_s w^u_{t,s} R_u[i^u_{t,s}] )     pooled sparse unknown concepts
  a_j^hidden  = mean_j( h_t ) R_h                            pooled final hidden state
  a_j^lexical = mean_j( w(word(x_t)) )     with word tables (provenance.lexical "words")
              = mean_j( R_x[x_t] + g(x_{t-1}, x_t) )   without: pooled tokens and bigrams
  u_j = sum_p lambda_p n(a_j^p)                              p in (known, unknown, hidden, lexical)
  (a) fixed:   key_j = n(u_j)
  (b) learned: key_j = n(u_j + [n(a^k), n(a^u), n(a^h), n(a^x)] W)      W [4 d_p, d_p], init 0

n(x) = x / max(|x|, 1e-6). R_k [C_k, d_p], R_u [C_u, d_p], R_h [D, d_p] and
R_x [V, d_p] are Gaussian; g(a, b) is drawn per token from the key
fold_in(seed, a V + b) (zero for a segment's first token; ``hashed_vectors``: random
signs by default, provenance.hashed_vectors), all from
``provenance.seed`` (the same for every
checkpoint and every sharding: threefry is partitionable), so the fixed key
is a Johnson-Lindenstrauss sketch of the concatenated normalized parts: its
inner products approximate the lambda-weighted sum of the parts' cosines.
The lexical part is the embedding layer's input with a fixed random table
in place of the learned one (learned sub-word embeddings of different rare
names are too alike to tell facts apart); with surprisal weights it is a
sketch of the chunk's token and bigram bag weighted by how much each token
told the model, so names and numbers dominate it (bigrams keep a name that
spans several sub-word tokens together).

Whole words in place of tokens and bigrams, and the hashed vectors g and w: model/lexical_keys.py.
The train step has no tokenizer and logs token + bigram keys; each index records which
features its keys hold (meta "lexical") and queries key alike. The learned map starts at the
fixed key (W = 0) and is trained with ``contrastive_loss`` between two views of each
chunk from the train step's own pass (objectives/key_contrastive.py).

Shapes: w, i [B,T,S] (the heads' active sets, never [B,T,C]); h [B,T,D];
x, segment ids [B,T]; logits [B,T,V]; chunk slots M = ``max_chunks_per_row``:
chunk j of a row fills slot j-1, chunks past M get no key (``valid`` False).
Pooling is a one-hot [B,T,M] contraction, which shards over the batch like
the rest of the model; the concept parts pool in concept space first ([B,M,C],
``pooled_sparse_project``), the hidden part before its projection.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core.spmd import get_logical_axis_rules

from cbm_lm.config import ModelConfig, ProvenanceConfig
from cbm_lm.model.layers import param
from cbm_lm.model.lexical_keys import WordTables, bigram_project, word_project
from cbm_lm.parallel.sharding import constrain, logical_sharding

_EPS = 1e-6
N_PARTS = 4   # known, unknown, hidden, lexical


class ChunkKeys(NamedTuple):
    keys: jax.Array     # [B,M,d_p] unit keys (zeros where not valid)
    valid: jax.Array    # [B,M] bool: the row has a chunk in this slot
    tokens: jax.Array   # [B,M] int32 tokens pooled into the slot


def trains_key_head(cfg: ProvenanceConfig | None) -> bool:
    """Whether training learns the key head's W (head "learned", contrastive_weight > 0):
    then the model carries the head (model/lm.py) and the loss has the contrastive term."""
    return cfg is not None and cfg.head == "learned" and cfg.contrastive_weight > 0


def normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / max(|x|, eps) along ``axis``, as x / sqrt(max(|x|^2, eps^2)): the same value, and a
    finite gradient at x = 0 (a key slot with no chunk), where d|x|/dx = x/|x| is 0/0."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x / jnp.sqrt(jnp.maximum(sq, _EPS * _EPS))


def chunk_onehot(chunk_segment_ids: jax.Array, max_chunks: int) -> jax.Array:
    """[B,T] chunk segment ids (0 = padding) -> [B,T,M] float32 one-hot of slot id - 1."""
    slots = jnp.arange(1, max_chunks + 1, dtype=jnp.int32)
    return (chunk_segment_ids[..., None].astype(jnp.int32) == slots).astype(jnp.float32)


def pool_mean(onehot: jax.Array, x: jax.Array, weights: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array]:
    """pi-weighted mean of x [B,T,F] over each chunk slot -> ([B,M,F], token counts [B,M]).

    A segment sum over (row, slot), B T F adds; the one-hot contraction it replaces
    cost B T M F multiply-adds (M = 64 slots: 4x slower at the tiny config)."""
    b, t, f = x.shape
    m = onehot.shape[-1]
    counts = onehot.sum(axis=1)
    w = onehot.sum(axis=-1) if weights is None else onehot.sum(axis=-1) * weights    # [B,T]
    slot = jnp.where(onehot.sum(axis=-1) > 0, jnp.argmax(onehot, axis=-1), m)       # pad -> m
    rows = (jnp.arange(b, dtype=jnp.int32)[:, None] * (m + 1) + slot).reshape(-1)
    n = b * (m + 1)
    total = jax.ops.segment_sum((x.astype(jnp.float32) * w[..., None]).reshape(-1, f), rows, n)
    mass = jax.ops.segment_sum(w.reshape(-1), rows, n)
    total = total.reshape(b, m + 1, f)[:, :m]
    return total / jnp.maximum(mass.reshape(b, m + 1)[:, :m], 1e-6)[..., None], counts


def surprisal(logits: jax.Array, tokens: jax.Array, segment_ids: jax.Array,
              onehot: jax.Array) -> jax.Array:
    """pi [B,T]: -log p(x_t | x_<t) from logits [B,T,V] (position t-1 predicts t).

    A token without a prediction (first of its segment) gets the mean pi of
    the predicted tokens of its chunk (1 if none); padding gets 0.
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    return surprisal_from_nll(nll, segment_ids, onehot)


def surprisal_from_nll(nll: jax.Array, segment_ids: jax.Array, onehot: jax.Array) -> jax.Array:
    """pi [B,T] from the next-token losses nll [B,T-1] (nll[:, t] = -log p(x_{t+1} | x_<=t)),
    e.g. the training step's per-token cross-entropy; filled as in ``surprisal``."""
    s = jnp.pad(nll.astype(jnp.float32), ((0, 0), (1, 0)))
    has = jnp.pad((segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0),
                  ((0, 0), (1, 0)))
    hf = has.astype(jnp.float32)
    mean = (jnp.einsum("btm,bt->bm", onehot, s * hf)
            / jnp.maximum(jnp.einsum("btm,bt->bm", onehot, hf), 1.0))
    mean = jnp.where(jnp.einsum("btm,bt->bm", onehot, hf) > 0, mean, 1.0)
    fill = jnp.einsum("btm,bm->bt", onehot, mean)
    return jax.lax.stop_gradient(jnp.where(has, s, fill) * (segment_ids > 0))


def projection(seed: int, part: int, rows: int, d_p: int, axes) -> jax.Array:
    """The fixed Gaussian table R [rows, d_p] of one part (0 known, 1 unknown, 2 hidden,
    3 vocabulary)."""
    key = jax.random.fold_in(jax.random.key(seed), part)
    r = jax.random.normal(key, (rows, d_p), jnp.float32) / jnp.sqrt(jnp.float32(d_p))
    return constrain(r, axes)


class ProjectionTables(NamedTuple):
    """The fixed tables R_k [C_k,d_p], R_u [C_u,d_p] (None without an unknown head),
    R_h [D,d_p], R_x [V,d_p] of one (seed, model shape)."""
    known: jax.Array
    unknown: jax.Array | None
    hidden: jax.Array
    vocab: jax.Array


# Logical axes of each table (shard the rows like the matrices they index).
TABLE_AXES = ProjectionTables(("known_concepts", "keys"), ("unknown_concepts", "keys"),
                              ("embed", "keys"), ("vocab", "keys"))


def projection_tables(cfg: ProvenanceConfig, model_cfg: ModelConfig) -> ProjectionTables:
    """The fixed tables for ``cfg.seed`` and the model's shapes (about (C_k + C_u + D + V)
    d_p Gaussian draws). A step that keys every batch takes them as an argument,
    computed once (``placed_tables``), instead of drawing them anew per
    step: at the tiny config the draws cost about as much as the rest of the key head."""
    mc, d_p = model_cfg.concepts, cfg.d_p
    unknown = (projection(cfg.seed, 1, mc.n_unknown_padded, d_p, TABLE_AXES.unknown)
               if model_cfg.concepts.n_unknown else None)
    return ProjectionTables(
        projection(cfg.seed, 0, mc.n_known_padded, d_p, TABLE_AXES.known), unknown,
        projection(cfg.seed, 2, model_cfg.d_model, d_p, TABLE_AXES.hidden),
        projection(cfg.seed, 3, model_cfg.vocab_size, d_p, TABLE_AXES.vocab))


def placed_tables(cfg: ProvenanceConfig, model_cfg: ModelConfig, mesh=None) -> ProjectionTables:
    """``projection_tables`` drawn once (jitted); on ``mesh`` laid out by their logical axes
    under the active ``nnx.logical_axis_rules`` (replicated without rules)."""
    shardings = None
    if mesh is not None:
        rules = tuple(get_logical_axis_rules())
        shardings = ProjectionTables(*(logical_sharding(mesh, axes, rules) for axes in TABLE_AXES))
        if not model_cfg.concepts.n_unknown:
            shardings = shardings._replace(unknown=None)
    return jax.jit(lambda: projection_tables(cfg, model_cfg), out_shardings=shardings)()


def pooled_sparse_project(onehot: jax.Array, indices: jax.Array, weights: jax.Array,
                          table: jax.Array, pi: jax.Array | None = None) -> jax.Array:
    """mean_j( sum_s w_{t,s} R[i_{t,s}] ) [B,M,d_p], pooled in concept space first:

      A_{j,c} = sum_{t in T_j} pi_t sum_s w_{t,s} [i_{t,s} = c] / sum_{t in T_j} pi_t   [B,M,C]
      mean_j  = A_j R

    (both maps are linear, so this is the per-token projection pooled). A is a scatter-add
    of the [B,T,S] active sets, and A R costs B M C d_p: gathering the [B,T,S,d_p] rows
    instead costs S d_p floats of memory traffic per token and was the key head's largest
    cost (at the tiny config it took as long as the rest of the step's key logging).
    onehot [B,T,M] chunk slots; indices, weights [B,T,S]; table R [C,d_p]; pi [B,T] or None.
    """
    b, t, k = indices.shape
    m, c = onehot.shape[-1], table.shape[0]
    w_tok = onehot if pi is None else onehot * pi[..., None]                   # [B,T,M]
    slot = jnp.argmax(onehot, axis=-1)                                         # [B,T]
    tok_w = w_tok.sum(axis=-1)                                                 # [B,T] (0 pad)
    row = jnp.arange(b, dtype=jnp.int32)[:, None, None] * m + slot[..., None]  # [B,T,1]
    flat = (row * c + indices.astype(jnp.int32)).reshape(-1)
    vals = (weights.astype(jnp.float32) * tok_w[..., None]).reshape(-1)
    a = jnp.zeros((b * m * c,), jnp.float32).at[flat].add(vals).reshape(b, m, c)
    denom = jnp.maximum(w_tok.sum(axis=1), 1e-6)[..., None]                   # [B,M,1]
    return jnp.einsum("bmc,cd->bmd", a, table) / denom



class ChunkProvenanceHead(nnx.Module):
    """LM outputs + chunk segment ids -> ChunkKeys (see the module docstring)."""

    def __init__(self, cfg: ProvenanceConfig, model_cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg, self.model_cfg = cfg, model_cfg
        if cfg.head == "learned":
            self.mix = param(rngs, nnx.initializers.zeros, (N_PARTS * cfg.d_p, cfg.d_p),
                             (None, "keys"), jnp.dtype(model_cfg.param_dtype))

    def parts(self, out, tokens: jax.Array, segment_ids: jax.Array,
              chunk_segment_ids: jax.Array, nll: jax.Array | None = None,
              tables: ProjectionTables | None = None, words: WordTables | None = None,
              word_hash: tuple[jax.Array, jax.Array] | None = None
              ) -> tuple[jax.Array, jax.Array]:
        """Normalized pooled parts [B,M,4,d_p] (known, unknown, hidden, lexical), counts [B,M].

        nll [B,T-1]: next-token losses to pool by in place of ``out.logits`` (the train step
        has them without a [B,T,V] tensor); tables: ``projection_tables`` computed once by the
        caller (drawn here when None); words: ``word_tables`` of the tokenizer: the lexical
        part is then the chunk's whole words (``word_project``), else its tokens + bigrams;
        word_hash: ``word_hashes`` of these tokens with ``words``, when the caller has them."""
        c = self.cfg
        r = projection_tables(c, self.model_cfg) if tables is None else tables
        onehot = chunk_onehot(chunk_segment_ids, c.max_chunks_per_row)
        pi = None
        if c.pool_weights == "surprisal" and self.model_cfg.objective == "autoregressive":
            if nll is not None:
                pi = surprisal_from_nll(nll, segment_ids, onehot)
            elif out.logits is not None:
                pi = surprisal(out.logits, tokens, segment_ids, onehot)
        known = pooled_sparse_project(onehot, out.known.indices, out.known.weights, r.known, pi)
        unknown = (jnp.zeros_like(known) if out.unknown is None else pooled_sparse_project(
            onehot, out.unknown.indices, out.unknown.weights, r.unknown, pi))
        if words is not None:
            lexical = word_project(c.seed, tokens, segment_ids, words, c.d_p, word_hash,
                                   c.hashed_vectors)
        else:
            lexical = (jnp.take(r.vocab, tokens.astype(jnp.int32), axis=0) + bigram_project(
                c.seed, tokens, segment_ids, self.model_cfg.vocab_size, c.d_p,
                c.hashed_vectors))
        b, t = tokens.shape
        x = jnp.concatenate([out.hidden.astype(jnp.float32), lexical], axis=-1)  # [B,T,D+d_p]
        pooled_x, counts = pool_mean(onehot, x, pi)
        d = out.hidden.shape[-1]
        hidden = pooled_x[..., :d] @ r.hidden            # pool, then project: the same, linear
        pooled = normalize(jnp.stack([known, unknown, hidden, pooled_x[..., d:]], axis=2))
        return constrain(pooled, ("batch", None, None, "keys")), counts

    def __call__(self, out, tokens: jax.Array, segment_ids: jax.Array,
                 chunk_segment_ids: jax.Array, nll: jax.Array | None = None,
                 tables: ProjectionTables | None = None, words: WordTables | None = None,
                 word_hash: tuple[jax.Array, jax.Array] | None = None) -> ChunkKeys:
        """out: the LMOutput of ``tokens`` [B,T] (logits may be None: uniform pooling);
        nll, tables, words, word_hash: see ``parts``."""
        c = self.cfg
        parts, counts = self.parts(out, tokens, segment_ids, chunk_segment_ids, nll, tables,
                                   words, word_hash)
        lam = jnp.asarray([c.known_weight, c.unknown_weight, c.hidden_weight, c.lexical_weight],
                          jnp.float32)
        u = jnp.einsum("bmpd,p->bmd", parts, lam)
        if c.head == "learned":
            b, m = parts.shape[:2]
            u = u + parts.reshape(b, m, -1) @ self.mix[...].astype(jnp.float32)
        valid = counts > 0
        keys = jnp.where(valid[..., None], normalize(u), 0.0)
        return ChunkKeys(constrain(keys, ("batch", None, "keys")), valid,
                         counts.astype(jnp.int32))


def contrastive_loss(keys_a: jax.Array, keys_b: jax.Array, valid: jax.Array,
                     temperature: float) -> jax.Array:
    """Symmetric in-batch InfoNCE between two views' keys of the same chunks.

    keys_* [B,M,d_p] unit keys, valid [B,M]. With the N valid slots flattened,
    logits = K_a K_b^T / tau [N,N] and
      L = 1/2 (CE(logits, diag) + CE(logits^T, diag)),
    averaged over valid chunks; every other chunk of the batch is a negative.
    """
    a = keys_a.reshape(-1, keys_a.shape[-1])
    b = keys_b.reshape(-1, keys_b.shape[-1])
    v = valid.reshape(-1)
    logits = (a @ b.T) / temperature
    mask = v[None, :] & v[:, None]
    logits = jnp.where(mask, logits, -1e9)
    diag = jnp.diagonal(logits)
    row = jax.nn.logsumexp(logits, axis=1) - diag
    col = jax.nn.logsumexp(logits, axis=0) - diag
    vf = v.astype(jnp.float32)
    return 0.5 * jnp.sum((row + col) * vf) / jnp.maximum(vf.sum(), 1.0)
