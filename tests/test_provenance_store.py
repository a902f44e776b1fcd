"""Key store, concept x source mass, packing and the faiss index (no model needed)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from cbm_lm.config import ProvenanceConfig
from cbm_lm.provenance import keystore
from cbm_lm.provenance.index import KeyIndex
from cbm_lm.provenance.packing import Unit, pack_batches
from cbm_lm.provenance.source_mass import chunk_source_distribution, mass_update


def test_keystore_truncate_after_keeps_exactly_the_rows_up_to_the_step(tmp_path):
    w = keystore.KeyStoreWriter(tmp_path, 0, flush_rows=5)
    for step in range(1, 8):                       # 3 rows per step, flushes every 2 steps
        w.add(np.arange(3) + 10 * step, np.full((3, 4), step, np.float32), step)
    w.flush()
    assert len(keystore.segments(keystore.process_dir(tmp_path, 0))) >= 3
    dropped = w.truncate_after(4)                  # resume from the checkpoint of step 4
    rows = keystore.read_store(tmp_path)
    assert dropped == 9
    assert sorted(rows["ids"].tolist()) == sorted(i + 10 * s for s in range(1, 5) for i in range(3))
    np.testing.assert_array_equal(rows["keys"][:, 0], rows["steps"])
    # Redoing steps 5..7 gives the same multiset as never stopping.
    for step in range(5, 8):
        w.add(np.arange(3) + 10 * step, np.full((3, 4), step, np.float32), step)
    w.flush()
    ids = keystore.read_store(tmp_path)["ids"]
    assert sorted(ids.tolist()) == sorted(i + 10 * s for s in range(1, 8) for i in range(3))


def test_equal_sized_flushes_at_one_step_all_read_back(tmp_path):
    """Re-keying and the gradient reference log every row at step 0, so auto-flushes of
    equal size carry the same steps and row count: each must be a segment of its own
    (they were one name, each overwriting the last). A second writer on the same
    directory (a resumed run, a second pass) appends after them."""
    rng = np.random.default_rng(0)
    ids = rng.permutation(1000)[:14].astype(np.int64)
    keys = rng.standard_normal((14, 4)).astype(np.float32)
    w = keystore.KeyStoreWriter(tmp_path, 0, flush_rows=4)
    for s in range(0, 12, 4):                          # three auto-flushes of 4 rows at step 0
        w.add(ids[s:s + 4], keys[s:s + 4], step=0)
    assert len(keystore.segments(keystore.process_dir(tmp_path, 0))) == 3
    again = keystore.KeyStoreWriter(tmp_path, 0, flush_rows=4)
    again.add(ids[12:], keys[12:], step=0)
    again.flush()
    rows = keystore.read_store(tmp_path)
    assert rows["ids"].tolist() == ids.tolist()        # every row, in the order written
    np.testing.assert_array_equal(rows["keys"], keys)
    assert keystore.row_count(keystore.process_dir(tmp_path, 0)) == 14
    got_ids, got_keys = keystore.latest_keys(rows)
    order = np.argsort(ids)
    np.testing.assert_array_equal(got_ids, ids[order])
    np.testing.assert_array_equal(got_keys, keys[order])


def test_a_store_with_old_style_segment_names_reads_truncates_and_appends(tmp_path):
    """Segments named before the sequence number (seg-<first>-<last>-<n>.npz) are read,
    counted and truncated as before, and new segments neither replace nor hide them."""
    import io
    d = keystore.process_dir(tmp_path, 0)
    d.mkdir(parents=True)
    for first, last, base in ((1, 2, 10), (3, 4, 20)):
        buf = io.BytesIO()
        np.savez(buf, ids=np.arange(base, base + 2), keys=np.full((2, 4), base, np.float32),
                 steps=np.array([first, last]))
        (d / f"seg-{first:010d}-{last:010d}-00000002.npz").write_bytes(buf.getvalue())
    w = keystore.KeyStoreWriter(tmp_path, 0)
    assert w.truncate_after(3) == 1                    # id 21 (step 4) goes
    w.add(np.array([30, 31]), np.full((2, 4), 30, np.float32), step=4)
    w.flush()
    rows = keystore.read_store(tmp_path)
    assert rows["ids"].tolist() == [10, 11, 20, 30, 31]
    assert rows["steps"].tolist() == [1, 2, 3, 4, 4]
    np.testing.assert_array_equal(rows["keys"][:, 0], [10, 10, 20, 30, 30])
    assert keystore.row_count(d) == 5


def test_keystore_rejects_a_corrupt_segment(tmp_path):
    d = keystore.process_dir(tmp_path, 0)
    d.mkdir(parents=True)
    (d / "seg-0000000001-0000000001-00000003.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="seg-0000000001.*unreadable"):
        keystore.read_store(tmp_path)


def test_latest_keys_keeps_the_last_logged_key_per_chunk():
    rows = {"ids": np.array([5, 7, 5, 9]), "keys": np.arange(8, dtype=np.float32).reshape(4, 2),
            "steps": np.array([1, 1, 3, 2])}
    ids, keys = keystore.latest_keys(rows)
    assert ids.tolist() == [5, 7, 9]
    np.testing.assert_array_equal(keys, [[4, 5], [2, 3], [6, 7]])


def test_pack_batches_maps_chunk_slots_to_ids():
    units = [Unit(np.array([1, 2, 3], np.int32), np.array([0, 0, 1], np.int32),
                  np.array([70, 71]), 2),
             Unit(np.array([4, 5], np.int32), np.array([0, 0], np.int32), np.array([72]), 1),
             Unit(np.array([6, 7, 8, 9], np.int32), np.zeros(4, np.int32), np.array([73]), 0)]
    b = list(pack_batches(units, batch=2, seq_len=6, max_chunks=4, pad_id=0))
    assert len(b) == 1
    b = b[0]
    np.testing.assert_array_equal(b["tokens"], [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0]])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]])
    np.testing.assert_array_equal(b["chunk_segment_ids"], [[1, 1, 2, 3, 3, 0], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(b["slot_ids"], [[70, 71, 72, -1], [73, -1, -1, -1]])
    np.testing.assert_array_equal(b["source_ids"][0], [2, 2, 2, 1, 1, -1])


def test_source_distribution_on_a_constructed_two_source_corpus():
    """Source A's tokens activate concepts 0 and 2, source B's activate 1 and 2.

    Training batch (one row, K=2 active concepts per token):
      t0 (A): c0 w=1.0, c2 w=0.5     t1 (A): c0 w=0.5, c2 w=0.5
      t2 (B): c1 w=1.0, c2 w=1.0     t3 pad
    Mass: c0 = (1.5, 0), c1 = (0, 1), c2 = (1.0, 1.0), c3 = (0, 0).
    """
    idx = jnp.asarray([[[0, 2], [0, 2], [1, 2], [3, 3]]])
    w = jnp.asarray([[[1.0, 0.5], [0.5, 0.5], [1.0, 1.0], [9.0, 9.0]]])
    src = jnp.asarray([[0, 0, 1, -1]])
    mass = mass_update(idx, w, src, n_rows=4, n_sources=2)
    np.testing.assert_allclose(np.asarray(mass), [[1.5, 0], [0, 1], [1, 1], [0, 0]])

    # P(c|A) = (0.6, 0, 0.4, 0), P(c|B) = (0, 0.5, 0.5, 0); p(s) = softmax_s sum_c share_c
    # log(P(c|s) + 1e-6). Slot 0: only c0 (A's); slot 1: c1 0.6 + c2 0.4; slot 2: only c3,
    # which no source shows (uniform); slot 3: no weight at all (the prior (2.5, 2) / 4.5).
    q_idx = jnp.asarray([[[0, 0], [1, 2], [3, 3], [0, 1]]])
    q_w = jnp.asarray([[[0.7, 0.0], [0.6, 0.4], [1.0, 1.0], [0.0, 0.0]]])
    seg = jnp.asarray([[1, 2, 3, 4]])
    p = np.asarray(chunk_source_distribution(q_idx, q_w, seg, mass, max_chunks=4))[0]
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
    e = 1e-6
    a, b = np.log(0.6 + e), np.log(e)
    np.testing.assert_allclose(p[0], [1 / (1 + np.exp(b - a)), 1 / (1 + np.exp(a - b))],
                               rtol=1e-4)
    sa, sb = 0.6 * np.log(e) + 0.4 * np.log(0.4 + e), np.log(0.5 + e)
    np.testing.assert_allclose(p[1], np.exp([sa, sb]) / np.exp([sa, sb]).sum(), rtol=1e-4)
    np.testing.assert_allclose(p[2], [0.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(p[3], [2.5 / 4.5, 2 / 4.5], atol=1e-6)
    assert p[:2].argmax(-1).tolist() == [0, 1]


def test_word_expert_decides_a_chunk_whose_concepts_both_sources_share():
    """Both sources activate only the shared concept c0 (the concepts cannot tell them
    apart); source A's words hash to bucket 5, B's to bucket 9. A chunk of A's word goes to
    A, one of B's to B, by the word x source mass alone."""
    from cbm_lm.provenance.source_mass import WORD_BUCKETS, word_mass_update
    idx = jnp.zeros((1, 4, 1), jnp.int32)
    w = jnp.ones((1, 4, 1))
    src = jnp.asarray([[0, 0, 1, 1]])
    mass = mass_update(idx, w, src, n_rows=2, n_sources=2)
    h = jnp.asarray([[5, 5, 9, 9]], jnp.uint32)
    counted = jnp.asarray([[True, True, True, False]])
    wmass = np.asarray(word_mass_update(h, counted, src, n_sources=2))
    assert wmass.shape == (WORD_BUCKETS, 2)
    assert wmass[5].tolist() == [2, 0] and wmass[9].tolist() == [0, 1] and wmass.sum() == 3
    seg = jnp.asarray([[1, 1, 2, 2]])
    q_h = jnp.asarray([[5, 5, 9, 9]], jnp.uint32)
    q_counted = jnp.asarray([[False, True, False, True]])
    without = np.asarray(chunk_source_distribution(idx, w, seg, mass, max_chunks=2))[0]
    np.testing.assert_allclose(without, 0.5, atol=1e-6)      # concepts alone: a tie
    p = np.asarray(chunk_source_distribution(idx, w, seg, mass, max_chunks=2,
                                             words=(q_h, q_counted, jnp.asarray(wmass))))[0]
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
    # log P(w|s) = log((W[w,s] + 1) / (sum_w W[w,s] + WORD_BUCKETS))
    la = np.log(np.array([3.0, 1.0]) / (np.array([2.0, 1.0]) + WORD_BUCKETS))
    lb = np.log(np.array([1.0, 2.0]) / (np.array([2.0, 1.0]) + WORD_BUCKETS))
    np.testing.assert_allclose(p[0], np.exp(la) / np.exp(la).sum(), rtol=1e-4)
    np.testing.assert_allclose(p[1], np.exp(lb) / np.exp(lb).sum(), rtol=1e-4)
    assert p.argmax(-1).tolist() == [0, 1]


@pytest.mark.parametrize("n,exact_max", [(500, 1000), (4000, 1000)])
def test_index_finds_each_key_itself(tmp_path, n, exact_max):
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(n, 32)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64) * 7 + 3
    prov = ProvenanceConfig(d_p=32, exact_max_keys=exact_max, pq_m=8, nprobe=8, ivf_nlist=32)
    idx = KeyIndex.build(ids, keys, prov)
    idx.save(tmp_path / "ix")
    loaded = KeyIndex.load(tmp_path / "ix")
    assert loaded.meta["kind"].startswith("flat" if n <= exact_max else "ivfpq")
    scores, got = loaded.search(keys[:200], 5)
    top1 = np.mean(got[:, 0] == ids[:200])
    assert top1 == 1.0 if n <= exact_max else top1 > 0.9
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_index_build_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="cannot index 3 ids"):
        KeyIndex.build(np.arange(3), np.zeros((2, 4), np.float32), ProvenanceConfig(d_p=4, pq_m=4))


def test_bm25_ranks_the_chunk_sharing_the_rare_word_first(tmp_path):
    from cbm_lm.provenance.bm25 import BM25Retriever
    texts = ["The town of Glorand lies on the river Vesk.", "The cat sat on the mat.",
             "A river runs through the old town.", "Nothing relevant here."]
    r = BM25Retriever.build(np.array([11, 12, 13, 14]), texts)
    r.save(tmp_path / "bm25")
    scores, ids = r.search_texts(["Which river flows past Glorand?", "zzz qqq"], k=2)
    assert ids[0, 0] == 11 and scores[0, 0] > scores[0, 1] > 0
    assert (ids[1] == -1).all()                    # no shared term: no match, not a random one


def test_rank_summary_by_hand():
    from cbm_lm.provenance.evaluate import rank_summary
    s = rank_summary(np.array([1, 3, 12, np.inf]))
    assert s == {"recall@1": 0.25, "recall@10": 0.5, "mrr": (1 + 1 / 3 + 1 / 12) / 4, "n": 4}


def test_rebuilding_replaces_the_saved_arrays(tmp_path):
    """A second index build over a workdir (e.g. after the eval binary built one) replaces
    mass.npy instead of failing on the existing file."""
    from etils import epath

    from cbm_lm.atomic_io import write_npy_atomic
    path = epath.Path(tmp_path) / "mass.npy"
    write_npy_atomic(path, np.ones((2, 3), np.float32))
    write_npy_atomic(path, np.full((2, 3), 7.0, np.float32))
    np.testing.assert_array_equal(np.load(path), np.full((2, 3), 7.0, np.float32))
    assert [p.name for p in epath.Path(tmp_path).iterdir()] == ["mass.npy"]


def test_a_failed_index_save_leaves_the_previous_index_whole(tmp_path, monkeypatch):
    """Saving writes a sibling directory and swaps it in once complete: an error while
    writing leaves the saved index loadable and no partial directory beside it."""
    import faiss

    from cbm_lm.provenance import index as index_mod
    keys = np.eye(8, dtype=np.float32)
    prov = ProvenanceConfig(d_p=8, pq_m=8)
    KeyIndex.build(np.arange(8), keys, prov).save(tmp_path / "ix")

    def broken(_):
        raise OSError("disk full")
    monkeypatch.setattr(index_mod.faiss, "serialize_index", broken)
    with pytest.raises(OSError, match="disk full"):
        KeyIndex.build(np.arange(8) + 100, keys, prov).save(tmp_path / "ix")
    monkeypatch.setattr(index_mod.faiss, "serialize_index", faiss.serialize_index)
    assert [p.name for p in tmp_path.iterdir()] == ["ix"]
    _, ids = KeyIndex.load(tmp_path / "ix").search(keys, 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(8))


def test_source_accuracy_reads_every_query_chunk_of_a_text():
    """A held-out chunk whose text re-splits into several query chunks is scored by their
    mean source distribution (it read the first alone). Fakes: two texts of source 1; the
    first splits into a piece leaning to source 0 and two leaning to source 1."""
    import types

    from cbm_lm.provenance.evaluate import source_accuracy
    rec = types.SimpleNamespace(chunk_bounds=np.array([0, 2, 4]), num_chunks=2,
                                tokens=np.array([1, 2, 3, 4]), source_id=1)
    corpus = types.SimpleNamespace(tokenizer=types.SimpleNamespace(decode=lambda t: f"t{t[0]}"),
                                   documents=lambda split: [rec], dir="fake")
    sources = np.array([[0.9, 0.1], [0.2, 0.8], [0.2, 0.8], [0.2, 0.8]])

    class Query:
        def encode(self, texts):
            rows = {"t1": [0, 1, 2], "t3": [3]}
            return types.SimpleNamespace(sources=sources), [rows[t] for t in texts]
    assert source_accuracy(Query(), corpus)["source_accuracy"] == 1.0


def test_a_failed_directory_swap_puts_the_previous_one_back(tmp_path, monkeypatch):
    """replace_dir_atomically: the old directory is renamed aside before the new one is
    renamed in; when that second rename fails the old one returns and no temporary stays."""
    from etils import epath

    from cbm_lm.atomic_io import replace_dir_atomically
    out = epath.Path(tmp_path) / "ix"

    def write(text):
        def go(d):
            epath.Path(d).mkdir()
            (epath.Path(d) / "f").write_text(text)
        return go
    replace_dir_atomically(out, write("old"))
    real = type(out).rename

    def rename(self, target):
        if ".tmp-" in self.name:
            raise OSError("rename failed")
        return real(self, target)
    monkeypatch.setattr(type(out), "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        replace_dir_atomically(out, write("new"))
    assert (out / "f").read_text() == "old"
    assert [p.name for p in epath.Path(tmp_path).iterdir()] == ["ix"]
