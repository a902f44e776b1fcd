"""Projected-gradient similarity (TRAK / TracIn style): the reference attribution for small models.

For a chunk x = x_1..x_n (keyed alone, as queries are) and the checkpoint's params theta:

  L(x)   = mean_{t<n} -log p(x_{t+1} | x_<=t)                            autoregressive
           mean_{t odd} -log p(x_t | x with its odd positions masked)     diffusion
  g(x)   = dL(x)/dtheta                                   every param, flattened  [P]
  phi(x) = n(S g(x))                                      [k], n(v) = v / |v|
  score(q, x) = <phi(q), phi(x)>                          TracIn's gradient cosine at one checkpoint

S [k, P] is a CountSketch: coordinate p adds s(p) g_p to bucket h(p), with h(p) in [0, k)
and s(p) = +-1 drawn per parameter leaf from jax.random with ``seed`` (deterministic for a
seed). E[<Sg, Sg'>] = <g, g'>, like TRAK's dense Gaussian projection, at O(P) per gradient
instead of a [P, k] table (1.2 GB for the demo model at k = 256). Per-chunk gradients are
one vmap of jax.grad over a batch of padded chunks.

Every training chunk's phi is stored as a key store at WORKDIR/provenance/gradient/keys
(cbm_lm/provenance/keystore.py) and searched with an exact faiss inner-product index at
WORKDIR/provenance/gradient/index (no centring). A query costs one backward pass per chunk.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from cbm_lm.atomic_io import replace_dir_atomically
from cbm_lm.data.corpus import Corpus
from cbm_lm.data.source import ShardedArrayRecordSource
from cbm_lm.provenance import keystore
from cbm_lm.provenance.index import KeyIndex

GRADIENT_DIR = "gradient"


def sketch_tables(params, k: int, seed: int):
    """Per leaf of ``params``: (bucket int32 [size], sign float32 [size]) of the CountSketch."""
    leaves, treedef = jax.tree.flatten(params)
    out = []
    for i, leaf in enumerate(leaves):
        key = jax.random.fold_in(jax.random.key(seed), i)
        kb, ks = jax.random.split(key)
        n = int(np.prod(leaf.shape))
        out.append((jax.random.randint(kb, (n,), 0, k, jnp.int32),
                    jnp.where(jax.random.bernoulli(ks, 0.5, (n,)), 1.0, -1.0)))
    return jax.tree.unflatten(treedef, out)


def sketch(grads, tables, k: int) -> jax.Array:
    """S g: the CountSketch [k] of one gradient pytree."""
    total = jnp.zeros((k,), jnp.float32)
    for g, (bucket, sign) in zip(jax.tree.leaves(grads), jax.tree.leaves(
            tables, is_leaf=lambda x: isinstance(x, tuple))):
        total = total + jax.ops.segment_sum(g.reshape(-1).astype(jnp.float32) * sign, bucket,
                                            num_segments=k)
    return total


def chunk_loss(model, tokens: jax.Array, length: jax.Array) -> jax.Array:
    """L(x) of one padded chunk tokens [L] with ``length`` real tokens (module docstring)."""
    cfg = model.config
    n = tokens.shape[0]
    pos = jnp.arange(n, dtype=jnp.int32)
    real = pos < length
    seg = real.astype(jnp.int32)
    if cfg.objective == "diffusion":
        masked = real & (pos % 2 == 1)
        inputs = jnp.where(masked, cfg.resolved_mask_token_id, tokens)
        targets, where = tokens, masked
    else:
        inputs, targets, where = tokens, jnp.roll(tokens, -1), real & (pos + 1 < length)
    out = model(inputs[None], positions=pos[None], segment_ids=seg[None])
    logp = jax.nn.log_softmax(out.logits[0].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
    w = where.astype(jnp.float32)
    return jnp.sum(nll * w) / jnp.maximum(w.sum(), 1.0)


def make_gradient_fn(model, k: int, seed: int):
    """Returns fn(tokens int32 [N,L], lengths int32 [N]) -> phi float32 [N,k] (numpy)."""
    graphdef, params = nnx.split(model, nnx.Param)
    tables = sketch_tables(params, k, seed)

    def one(params, tables, tokens, length):
        g = jax.grad(lambda p: chunk_loss(nnx.merge(graphdef, p), tokens, length))(params)
        v = sketch(g, tables, k)
        return v / jnp.maximum(jnp.linalg.norm(v), 1e-12)

    run = jax.jit(jax.vmap(one, in_axes=(None, None, 0, 0)))   # tables: arguments, not constants
    return lambda tokens, lengths: np.asarray(run(params, tables, jnp.asarray(tokens, jnp.int32),
                                                  jnp.asarray(lengths, jnp.int32)))


def pad_chunks(chunks: list[np.ndarray], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token arrays -> (tokens [N,length] padded / cut, lengths [N])."""
    out = np.full((len(chunks), length), pad_id, np.int32)
    lens = np.zeros(len(chunks), np.int32)
    for i, c in enumerate(chunks):
        c = np.asarray(c, np.int32)[:length]
        out[i, :len(c)], lens[i] = c, len(c)
    return out, lens


def gradient_features(fn, chunks: list[np.ndarray], length: int, pad_id: int, k: int,
                      batch: int) -> np.ndarray:
    """phi [N,k] of token arrays, in fixed-shape batches (one compile)."""
    out = np.zeros((len(chunks), k), np.float32)
    for s in range(0, len(chunks), batch):
        part = chunks[s:s + batch]
        toks, lens = pad_chunks(part + [part[0]] * (batch - len(part)), length, pad_id)
        out[s:s + len(part)] = fn(toks, lens)[:len(part)]
    return out


def paths(workdir) -> tuple[epath.Path, epath.Path]:
    """(key store, index) of the gradient reference of ``workdir``."""
    root = epath.Path(workdir) / "provenance" / GRADIENT_DIR
    return root / "keys", root / "index"


def build_gradient_index(workdir, model, corpus: Corpus, prov, *, k: int = 1024,
                         length: int = 64, batch: int = 16, split: str = "train",
                         log=print) -> KeyIndex:
    """phi of every training chunk (cut at ``length`` tokens) -> store + exact index."""
    store, index_dir = paths(workdir)
    fn = make_gradient_fn(model, k, prov.seed)
    src = ShardedArrayRecordSource(corpus.shards(split))
    ids, chunks = [], []
    for i in range(len(src)):
        rec = src[i]
        b = rec.chunk_bounds
        for j in range(rec.num_chunks):
            ids.append(int(rec.chunk_ids[j]))
            chunks.append(np.asarray(rec.tokens[b[j]:b[j + 1]], np.int32))
    src.close()
    t0 = time.time()

    def write(tmp):
        writer = keystore.KeyStoreWriter(tmp, 0)
        step = batch * 64
        for s in range(0, len(chunks), step):
            phi = gradient_features(fn, chunks[s:s + step], length, corpus.tokenizer.pad_id, k,
                                    batch)
            writer.add(np.asarray(ids[s:s + step], np.int64), phi, step=0)
            log(f"gradient reference: {min(s + step, len(chunks))}/{len(chunks)} chunks "
                f"({(time.time() - t0):.0f}s)")
        writer.flush()

    # the store is replaced only once the new one is whole: a failed pass keeps the old
    replace_dir_atomically(store, write)
    rows = keystore.read_store(store)
    idx = KeyIndex.build(rows["ids"], rows["keys"], _exact(prov), center=False,
                         meta={"method": "gradient", "k": k, "seed": prov.seed, "length": length,
                               "batch": batch})
    idx.save(index_dir)
    log(f"gradient reference: {len(rows['ids'])} chunks, k={k}, "
        f"{time.time() - t0:.0f}s -> {index_dir}")
    return idx


def _exact(prov):
    import dataclasses
    return dataclasses.replace(prov, exact_max_keys=1 << 62)


class GradientRetriever:
    """The projected-gradient reference: phi of each query chunk, then the exact index."""

    def __init__(self, model, index: KeyIndex, pad_id: int):
        m = index.meta
        self.index, self.pad_id = index, pad_id
        self.k, self.length, self.batch = int(m["k"]), int(m["length"]), int(m["batch"])
        self.fn = make_gradient_fn(model, self.k, int(m["seed"]))

    @classmethod
    def open(cls, workdir, model, corpus: Corpus) -> "GradientRetriever":
        _, index_dir = paths(workdir)
        if not (index_dir / "meta.json").exists():
            raise FileNotFoundError(f"{index_dir}: no gradient reference index; run "
                                    f"tools/build_provenance_index.py --workdir {workdir} "
                                    "--gradient")
        return cls(model, KeyIndex.load(index_dir), corpus.tokenizer.pad_id)

    def search(self, chunks, k):
        phi = gradient_features(self.fn, list(chunks.tokens), self.length, self.pad_id, self.k,
                                self.batch)
        return self.index.search(phi, k)
