"""ChunkProvenanceHead: determinism, packing invariance, sharding, contrastive loss."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from cbm_lm.config import ProvenanceConfig
from cbm_lm.default_config import DEFAULT_RULES
from cbm_lm.model.provenance import ChunkProvenanceHead, contrastive_loss, normalize
from cbm_lm.parallel.mesh import make_mesh
from cbm_lm.parallel.sharding import state_shardings
from cbm_lm.config import MeshConfig
from cbm_lm.provenance.packing import Unit, pack_batches
from model_fixtures import make_model, tiny_config

PROV = ProvenanceConfig(d_p=16, max_chunks_per_row=6, pq_m=4)


def _keys(model, head, batch):
    return _jit_keys(model, head, {k: jnp.asarray(v) for k, v in batch.items() if k != "slot_ids"})


@nnx.jit
def _jit_keys(model, head, batch):
    return _eager_keys(model, head, batch)


def _eager_keys(model, head, batch):
    out = model(jnp.asarray(batch["tokens"]), positions=jnp.asarray(batch["positions"]),
                segment_ids=jnp.asarray(batch["segment_ids"]))
    return head(out, batch["tokens"], batch["segment_ids"], batch["chunk_segment_ids"])


def _units(cfg, n=5, seed=0):
    """n single-chunk units of 3..8 random tokens, chunk ids 100, 101, ..."""
    rng = np.random.default_rng(seed)
    toks = [rng.integers(0, cfg.vocab_size - 1, size=int(rng.integers(3, 9))).astype(np.int32)
            for _ in range(n)]
    return [Unit(t, np.zeros(len(t), np.int32), np.asarray([100 + i]), 0)
            for i, t in enumerate(toks)]


def _by_id(batch, ck):
    keys = np.asarray(ck.keys)
    return {int(i): keys[b, m] for (b, m), i in np.ndenumerate(batch["slot_ids"]) if i >= 0}


def test_keys_are_unit_deterministic_and_independent_of_packing():
    cfg = tiny_config(max_seq_len=32, objective="autoregressive", attention="causal")
    model = make_model(cfg)
    head = ChunkProvenanceHead(PROV, cfg, rngs=nnx.Rngs(0))
    units = (_units(cfg))
    packed = next(pack_batches(units, 2, 32, 6, pad_id=0))           # several chunks per row
    alone = [next(pack_batches([u], 1, 32, 6, pad_id=0)) for u in units]
    k_packed = _by_id(packed, _keys(model, head, packed))
    k_again = _by_id(packed, _keys(model, head, packed))
    for b in alone:
        (cid, key), = _by_id(b, _keys(model, head, b)).items()
        np.testing.assert_allclose(key, k_packed[cid], atol=2e-5)     # same chunk, other rows
        np.testing.assert_array_equal(k_again[cid], k_packed[cid])   # same call, same bits
        assert abs(np.linalg.norm(key) - 1) < 1e-5
    # A fresh head with the same seed (a new process) gives the same keys.
    head2 = ChunkProvenanceHead(PROV, cfg, rngs=nnx.Rngs(123))
    k2 = _by_id(packed, _keys(model, head2, packed))
    for cid in k2:
        np.testing.assert_array_equal(k2[cid], k_packed[cid])


def _bigram_vector(prov, code: int) -> np.ndarray:
    """The hashed vector of one bigram code, from the threefry stream the docstring names:
    normal draws, or the stream's bits unpacked little-endian as signs."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(prov.seed), 4), code)
    if prov.hashed_vectors == "gaussian":
        v = np.asarray(jax.random.normal(key, (prov.d_p,)))
    else:
        words = np.asarray(jax.random.bits(key, (-(-prov.d_p // 32),), jnp.uint32))
        bits = np.unpackbits(words.astype("<u4").view(np.uint8), bitorder="little")
        v = 2.0 * bits[:prov.d_p] - 1.0
    return v / np.sqrt(prov.d_p)


@pytest.mark.parametrize("hashed", ["signs", "gaussian"])
def test_fixed_key_is_the_weighted_sum_of_normalized_projected_parts(hashed):
    """Independent numpy reference of the module docstring's equations (surprisal pooling)."""
    cfg = tiny_config(max_seq_len=16, objective="autoregressive", attention="causal")
    model = make_model(cfg)
    prov = dataclasses.replace(PROV, known_weight=1.0, unknown_weight=0.5, hidden_weight=2.0,
                               lexical_weight=0.7, hashed_vectors=hashed)
    head = ChunkProvenanceHead(prov, cfg, rngs=nnx.Rngs(0))
    toks = np.arange(1, 9, dtype=np.int32)[None]
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0]], np.int32)      # two documents + padding
    chunk = np.array([[1, 1, 2, 2, 3, 3, 3, 0]], np.int32)    # chunk 3 starts document 2
    out = model(jnp.asarray(toks), segment_ids=jnp.asarray(seg))
    ck = head(out, jnp.asarray(toks), jnp.asarray(seg), jnp.asarray(chunk))
    d_p = prov.d_p
    tables = [np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(prov.seed), p),
                                           (rows, d_p))) / np.sqrt(d_p)
              for p, rows in enumerate((cfg.concepts.n_known_padded,
                                        cfg.concepts.n_unknown_padded, cfg.d_model,
                                        cfg.vocab_size))]
    logits = np.asarray(out.logits, np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                             keepdims=True)) \
        - logits.max(-1, keepdims=True)
    pi = np.array([-logp[t - 1, toks[0, t]] if t and seg[0, t] == seg[0, t - 1] else np.nan
                   for t in range(8)])
    unit = lambda x: x / np.linalg.norm(x)  # noqa: E731
    for slot in range(3):
        sel = chunk[0] == slot + 1
        w = pi[sel]
        w = np.where(np.isnan(w), np.nanmean(w) if np.isfinite(w).any() else 1.0, w)
        mean = lambda y: (w[:, None] * y).sum(0) / w.sum()  # noqa: E731
        parts = []
        for acts, table in ((out.known, tables[0]), (out.unknown, tables[1])):
            idx, wt = np.asarray(acts.indices)[0][sel], np.asarray(acts.weights)[0][sel]
            parts.append(unit(mean(np.einsum("ts,tsd->td", wt, table[idx]))))
        parts.append(unit(mean(np.asarray(out.hidden)[0][sel]) @ tables[2]))
        bigram = [_bigram_vector(prov, int(toks[0, t - 1]) * cfg.vocab_size + int(toks[0, t]))
                  if t and seg[0, t] == seg[0, t - 1] else np.zeros(d_p) for t in range(8)]
        lex = tables[3][toks[0]] + np.asarray(bigram)
        parts.append(unit(mean(lex[sel])))
        want = unit(1.0 * parts[0] + 0.5 * parts[1] + 2.0 * parts[2] + 0.7 * parts[3])
        np.testing.assert_allclose(np.asarray(ck.keys)[0, slot], want, atol=2e-5)
    assert np.asarray(ck.valid)[0].tolist() == [True] * 3 + [False] * 3
    assert not np.asarray(ck.keys)[0, 3:].any()


def test_sharded_keys_equal_single_device_keys():
    cfg = tiny_config(vocab_size=96, max_seq_len=32, objective="autoregressive",
                      attention="causal", concepts=dict(n_known=64, n_unknown=64))
    units = (_units(cfg, n=16, seed=3))
    batch = next(pack_batches(units, 8, 32, 6, pad_id=0))
    model = make_model(cfg)
    head = ChunkProvenanceHead(PROV, cfg, rngs=nnx.Rngs(0))
    single = np.asarray(_keys(model, head, batch).keys)

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = tuple((k, v) for k, v in DEFAULT_RULES)
    params = nnx.state(model, nnx.Param)
    graphdef = nnx.graphdef(model)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        # the same params placed by their logical axes (creation under a mesh: test_sharding)
        sharded_params = jax.device_put(params, state_shardings(params, mesh, rules))
        emb = sharded_params["backbone"]["embedding"][...]          # [vocab/tensor, embed/fsdp]
        assert emb.addressable_shards[0].data.shape == (96 // 2, 32 // 2)
        bs = NamedSharding(mesh, P(("data", "fsdp")))
        dev = {k: jax.device_put(jnp.asarray(v), bs) for k, v in batch.items()
               if k != "slot_ids"}

        @jax.jit
        def run(state, dev):
            m = nnx.merge(graphdef, state)
            return _eager_keys(m, head, dev).keys

        sharded = run(sharded_params, dev)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(sharded), single, atol=2e-5)


def test_contrastive_loss_prefers_matched_views():
    rng = np.random.default_rng(0)
    a = normalize(jnp.asarray(rng.normal(size=(2, 4, 16)), jnp.float32))
    b = normalize(a + 0.3 * jnp.asarray(rng.normal(size=(2, 4, 16)), jnp.float32))
    valid = jnp.ones((2, 4), bool).at[1, 3].set(False)
    matched = float(contrastive_loss(a, b, valid, 0.1))
    perm = rng.permutation(8)
    shuffled_b = b.reshape(8, 16)[perm].reshape(2, 4, 16)
    shuffled = float(contrastive_loss(a, shuffled_b, valid, 0.1))
    assert matched < shuffled
    # Hand check on two chunks: logits = K K^T / tau, loss = mean CE to the diagonal.
    k = jnp.asarray([[[1.0, 0.0], [0.0, 1.0]]])
    want = np.log(1 + np.exp(-1 / 0.5))
    np.testing.assert_allclose(float(contrastive_loss(k, k, jnp.ones((1, 2), bool), 0.5)),
                               want, rtol=1e-5)


def test_learned_head_starts_at_the_fixed_key():
    cfg = tiny_config(max_seq_len=32)
    model = make_model(cfg)
    units = (_units(cfg))
    batch = next(pack_batches(units, 2, 32, 6, pad_id=0))
    fixed = ChunkProvenanceHead(PROV, cfg, rngs=nnx.Rngs(0))
    learned = ChunkProvenanceHead(dataclasses.replace(PROV, head="learned"), cfg,
                                  rngs=nnx.Rngs(0))
    assert learned.mix[...].shape == (4 * PROV.d_p, PROV.d_p)
    np.testing.assert_allclose(np.asarray(_keys(model, learned, batch).keys),
                               np.asarray(_keys(model, fixed, batch).keys), atol=1e-6)


class _FakeTokenizer:
    """Token strings as a BPE might split one name two ways (line start vs mid-sentence)."""
    strings = ["Tis", "end", " T", "is", " worked", " who", ",", " Tisend", "\n"]
    vocab_size = len(strings)

    def decode(self, ids):
        return "".join(self.strings[i] for i in ids)


def test_word_features_match_a_word_however_bpe_split_it():
    from cbm_lm.model.lexical_keys import word_project, word_tables
    tables = word_tables(_FakeTokenizer(), 12)      # ids past the tokenizer carry no word
    # row 0: "Tisend worked"; row 1: " who, Tisend" as " who" "," " T" "is" "end";
    # row 2: " Tisend" as one token, then "\n" (no word) and a padding token
    x = jnp.asarray([[0, 1, 4, 0, 0], [5, 6, 2, 3, 1], [7, 8, 0, 0, 0]], jnp.int32)
    seg = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], jnp.int32)
    g = np.asarray(word_project(0, x, seg, tables, 64))
    u = g / np.maximum(np.linalg.norm(g, axis=-1, keepdims=True), 1e-6)
    tisend = u[0, 0]
    for r, t in ((0, 1), (1, 2), (1, 3), (1, 4), (2, 0)):
        np.testing.assert_allclose(u[r, t], tisend, atol=1e-5)
    assert abs(float(u[0, 2] @ tisend)) < 0.6          # " worked" is another word
    assert abs(float(u[1, 0] @ tisend)) < 0.6          # " who"
    assert not g[1, 1].any() and not g[2, 1].any()     # "," and "\n": no word
    assert not g[0, 3:].any() and not g[2, 2:].any()   # padding


def test_word_tables_hash_each_tokens_letters_and_are_cached():
    """The vectorized tables equal the per-token definition: H(s) = sum_i s_i B^(n-1-i) and
    B^n mod 2^32 over the lowercased alphanumeric bytes s; one tokenizer's tables are computed
    once."""
    from cbm_lm.model import lexical_keys as prov_lib

    tok = _FakeTokenizer()
    tables = prov_lib.word_tables(tok, 12)
    for i in range(12):
        s = tok.decode([i]) if i < tok.vocab_size else ""
        norm = "".join(ch for ch in s.lower() if ch.isalnum()).encode()
        h, m = 0, 1
        for b in norm:
            h, m = (h * prov_lib._WORD_BASE + b) % 2**32, (m * prov_lib._WORD_BASE) % 2**32
        assert int(tables.hash[i]) == h and int(tables.mult[i]) == m, i
        assert bool(tables.has[i]) == bool(norm)
        assert bool(tables.start[i]) == (i >= tok.vocab_size or not s[:1].isalnum())
    calls = []
    tok.decode = lambda ids: calls.append(ids) or _FakeTokenizer.decode(tok, ids)
    again = prov_lib.word_tables(tok, 12)
    assert not calls
    assert all((np.asarray(a) == np.asarray(b)).all() for a, b in zip(tables, again))
