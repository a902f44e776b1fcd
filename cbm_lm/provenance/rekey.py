"""Keys for packed rows with one checkpoint: the jitted keying function and re-keying.

``make_key_fn`` jits  params, batch -> (keys [B,M,d_p], valid [B,M],
source distribution [B,M,S] or None, mass update [C_pad,S], and with the corpus
tokenizer the word x source mass update [WORD_BUCKETS,S])  for one model;
the forward pass is the model's clean pass (no masking, no dropout).

``rekey_corpus`` recomputes the key of every training chunk with the given
checkpoint and writes them as a key store (cbm_lm/provenance/keystore.py),
plus the concept x source mass of that pass (and its word x source mass,
``word-mass-p<i>.npy``, when keys get whole-word features). Multi-host: process p keys the
documents p, p+P, ... and writes its own file set; every process runs the
same number of batches (short ones padded with empty batches) so the jitted
step's collectives line up.
"""

from __future__ import annotations

import io
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from cbm_lm.atomic_io import swap_dir_in, write_npy_atomic
from cbm_lm.config import ProvenanceConfig
from cbm_lm.data.corpus import Corpus
from cbm_lm.data.source import ShardedArrayRecordSource
from cbm_lm.model.lexical_keys import word_hashes, word_tables
from cbm_lm.model.provenance import ChunkProvenanceHead, placed_tables
from cbm_lm.provenance import keystore
from cbm_lm.provenance.packing import empty_batch, pack_batches, record_units
from cbm_lm.provenance.source_mass import (chunk_source_distribution, mass_update,
                                           word_mass_update)

DEVICE_FIELDS = ("tokens", "segment_ids", "positions", "chunk_segment_ids", "source_ids")
MASS_FILE = "mass-p{:05d}.npy"
WORD_MASS_FILE = "word-mass-p{:05d}.npy"


def make_head(prov: ProvenanceConfig, model) -> ChunkProvenanceHead:
    """The head for ``model``: its learned part if the model carries one, else fixed."""
    head = getattr(model, "provenance_head", None)
    if head is not None:
        return head
    return ChunkProvenanceHead(prov, model.config, rngs=nnx.Rngs(prov.seed))


def lexical_mode(prov: ProvenanceConfig, tokenizer) -> str:
    """The lexical features keys get: provenance.lexical where a tokenizer is at hand."""
    return prov.lexical if tokenizer is not None else "tokens"


def make_key_fn(model, prov: ProvenanceConfig, batch_sharding=None, tokenizer=None,
                lexical: str | None = None) -> Callable:
    """Returns key_fn(batch: dict of numpy [B,T], mass or None) -> dict of numpy.

    tokenizer: the corpus tokenizer; with it (and provenance.lexical "words", or ``lexical``
    when given) the lexical part of the key is the chunk's whole words (model/provenance.py
    ``word_project``), else its tokens and bigrams (what the train step logs)."""
    head = make_head(prov, model)
    graphdef, state = nnx.split((model, head))
    n_rows = model.config.concepts.n_known_padded
    tables = placed_tables(head.cfg, model.config,
                           None if batch_sharding is None else batch_sharding.mesh)
    mode = lexical or lexical_mode(prov, tokenizer)
    words = (word_tables(tokenizer, model.config.vocab_size)
             if mode == "words" and tokenizer is not None else None)

    @jax.jit
    def run(state, batch, mass, tables, words, word_mass):
        lm, hd = nnx.merge(graphdef, state)
        out = lm(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
        # each token's whole-word hash, once: the key's lexical part, the word x source mass
        # and the word expert of the source distributions all read it
        wh = counted = None
        if words is not None:
            wh, counted = word_hashes(batch["tokens"], batch["segment_ids"], words)
        ck = hd(out, batch["tokens"], batch["segment_ids"], batch["chunk_segment_ids"],
                tables=tables, words=words,
                word_hash=None if words is None else (wh, counted))
        delta = mass_update(out.known.indices, out.known.weights, batch["source_ids"], n_rows,
                            prov.max_sources)
        res = {"keys": ck.keys, "valid": ck.valid, "mass": delta}
        wexp = None
        if words is not None:
            res["word_mass"] = word_mass_update(wh, counted, batch["source_ids"],
                                                prov.max_sources)
            if word_mass is not None:
                wexp = (wh, counted, word_mass)
        if mass is not None:
            res["sources"] = chunk_source_distribution(
                out.known.indices, out.known.weights, batch["chunk_segment_ids"], mass,
                prov.max_chunks_per_row, wexp)
        return res

    def key_fn(batch, mass=None, word_mass=None):
        """word_mass: the word x source mass [WORD_BUCKETS,S] (source distributions with the
        word expert; used when keys get whole-word features)."""
        dev = {k: np.asarray(batch[k]) for k in DEVICE_FIELDS}
        if batch_sharding is not None:
            dev = {k: jax.make_array_from_process_local_data(batch_sharding, v)
                   for k, v in dev.items()}
        res = run(state, dev, None if mass is None else jnp.asarray(mass, jnp.float32), tables,
                  words, None if word_mass is None or words is None
                  else jnp.asarray(word_mass, jnp.float32))
        if batch_sharding is not None and jax.process_count() > 1:
            from jax.experimental import multihost_utils
            local = {k: multihost_utils.global_array_to_host_local_array(
                res[k], batch_sharding.mesh, batch_sharding.spec) for k in ("keys", "valid")}
            res = dict(res, **local)
        return jax.tree.map(np.asarray, res)

    return key_fn


def _process_records(corpus: Corpus, split: str):
    """This process's documents (p, p+P, ...) in shard order."""
    p, n = jax.process_index(), jax.process_count()
    src = ShardedArrayRecordSource(corpus.shards(split))
    for i in range(p, len(src), n):
        yield src[i]
    src.close()


def rekey_corpus(model, corpus: Corpus, prov: ProvenanceConfig, seq_len: int, store,
                 split: str = "train", batch_sharding=None, log=print) -> dict:
    """Keys every chunk of ``split`` with ``model`` into the key store ``store``.

    Replaces any earlier store at that path: every process writes its files into
    ``store``.tmp, then process 0 swaps it in (atomic_io.swap_dir_in: the old store
    is renamed aside and removed only once the new one is in place), so a failed
    re-key leaves the previous store intact. Returns {"chunks", "batches",
    "seconds"} of this process; writes the pass's mass beside the segments
    (``mass-p<i>.npy``).
    """
    store = epath.Path(store)
    tmp = store.parent / (store.name + ".tmp")
    if tmp.exists() and jax.process_index() == 0:
        tmp.rmtree()
    key_fn = make_key_fn(model, prov, batch_sharding, tokenizer=corpus.tokenizer)
    pad_id = corpus.tokenizer.pad_id
    units = (u for rec in _process_records(corpus, split)
             for u in record_units(rec, prov.rekey_context, seq_len))
    batches = pack_batches(units, prov.rekey_batch_size, seq_len, prov.max_chunks_per_row, pad_id)
    n_rows = model.config.concepts.n_known_padded
    mass = np.zeros((n_rows, prov.max_sources), np.float64)
    word_mass = None
    writer = keystore.KeyStoreWriter(tmp, jax.process_index())
    t0, n_chunks, n_batches = time.time(), 0, 0
    for batch in batches:
        res = key_fn(batch)
        valid = batch["slot_ids"] >= 0
        writer.add(batch["slot_ids"][valid], res["keys"][valid], step=0)
        mass += res["mass"]
        if "word_mass" in res:
            word_mass = res["word_mass"] + (0.0 if word_mass is None else word_mass)
        n_chunks += int(valid.sum())
        n_batches += 1
        if n_batches % 50 == 0:
            log(f"re-keyed {n_chunks} chunks ({n_chunks / (time.time() - t0):.0f}/s)")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        most = int(np.max(multihost_utils.process_allgather(np.int64(n_batches))))
        # the collective key pass runs as often on every process; one with fewer (or no)
        # batches keys empty ones (no chunk slots: nothing written, no mass)
        empty = empty_batch(prov.rekey_batch_size, seq_len, prov.max_chunks_per_row, pad_id)
        for _ in range(most - n_batches):
            key_fn(empty)
    writer.flush()
    pdir = keystore.process_dir(tmp, jax.process_index())
    pdir.mkdir(parents=True, exist_ok=True)
    write_npy_atomic(tmp / MASS_FILE.format(jax.process_index()), mass.astype(np.float32))
    if word_mass is not None:
        write_npy_atomic(tmp / WORD_MASS_FILE.format(jax.process_index()),
                         word_mass.astype(np.float32))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("cbm_lm_rekey_written")
    if jax.process_index() == 0:
        swap_dir_in(tmp, store)
    return {"chunks": n_chunks, "batches": n_batches, "seconds": time.time() - t0}


def read_mass(store, pattern: str = "mass-p*.npy") -> np.ndarray | None:
    """The summed mass files of a store (None when it has none); pattern "word-mass-p*.npy":
    the word x source mass."""
    parts = sorted(epath.Path(store).glob(pattern)) if epath.Path(store).exists() else []
    if not parts:
        return None
    return sum(np.load(io.BytesIO(p.read_bytes()), allow_pickle=False).astype(np.float64)
               for p in parts)
