"""End to end on a small corpus: re-key, index, query (library and CLI)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from cbm_lm.data.corpus import Corpus
from cbm_lm.provenance import build, keystore
from cbm_lm.provenance.chunks import ChunkLookup
from cbm_lm.provenance.evaluate import evaluate_methods
from cbm_lm.provenance.index import KeyIndex
from cbm_lm.provenance.open import open_query
from provenance_fixtures import run_dir  # noqa: F401 - a fixture

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_training_chunk_is_keyed_once(run_dir):
    workdir, _, config = run_dir
    rows = keystore.read_store(build.store_path(workdir, build.REKEYED))
    corpus = Corpus(config.data.dir)
    want = sorted(int(c) for rec in corpus.documents("train") for c in rec.chunk_ids)
    assert sorted(rows["ids"].tolist()) == want


def test_verbatim_training_chunk_retrieves_itself_at_rank_1(run_dir):
    workdir, model, config = run_dir
    q = open_query(workdir, model, config)
    lookup = ChunkLookup(q.corpus)
    rows = keystore.read_store(build.store_path(workdir, build.REKEYED))
    texts = {}
    for cid in rows["ids"]:
        t = lookup.text(int(cid))
        if t.strip() and len(q.corpus.tokenizer.encode(t)) > 1:
            texts.setdefault(t, []).append(int(cid))
    chunks, _ = q.encode(list(texts))
    scores, ids = q.retriever.search(chunks, 1)
    for (text, cids), got, s in zip(texts.items(), ids[:, 0], scores[:, 0]):
        assert int(got) in cids, (text, got)      # identical texts tie; any of them is right
        assert s > 0.999


def test_answer_sources_sum_to_one_and_matches_carry_text(run_dir):
    workdir, model, config = run_dir
    q = open_query(workdir, model, config)
    ans = q.answer(["Rust borrows are checked at compile time.", "The cat sat."], k=3)
    assert [a["query"] for a in ans] == [0, 1]
    names = set(Corpus(config.data.dir).sources)
    for a in ans:
        for c in a["chunks"]:
            assert set(c["sources"]) == names
            assert abs(sum(c["sources"].values()) - 1) < 1e-5
            assert len(c["matches"]) == 3
            for m in c["matches"]:
                assert set(m) == {"chunk_id", "source", "score", "text"} and m["source"] in names
    assert ans[0]["chunks"][0]["matches"][0]["text"].startswith("Rust borrows")


@pytest.mark.slow
def test_query_cli_json_one_object_per_query(run_dir, tmp_path):
    workdir, _, _ = run_dir
    qfile = tmp_path / "q.txt"
    qfile.write_text('The cat sat on the mat.\n{"text": "A dog barked at the mailman."}\n')
    env = {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "provenance_query.py"),
                           "--workdir", str(workdir), "--queries", str(qfile), "--k", "2",
                           "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [a["query"] for a in answers] == [0, 1]
    assert answers[1]["text"] == "A dog barked at the mailman."
    top = answers[1]["chunks"][0]["matches"][0]
    assert top["text"].startswith("A dog barked") and top["source"] == "pets"
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "provenance_query.py"),
                          "--workdir", str(workdir), "--queries", str(tmp_path / "missing.txt")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode != 0 and "missing.txt" in bad.stderr


def test_training_chunk_view_for_the_explainer(run_dir, tmp_path):
    import types
    from cbm_lm.provenance.open import training_chunk_view
    workdir, model, config = run_dir
    view = training_chunk_view(workdir, model, config, k=2)
    got = view(None, None, types.SimpleNamespace(text="Rust borrows are checked at compile"))
    assert len(got) == 2 and got[0]["text"] == "Rust borrows are checked at compile"
    assert got[0]["score"] >= got[1]["score"] and got[0]["source"] == "code"
    assert training_chunk_view(tmp_path, model, config) is None     # no index: no view


def test_queries_draw_the_hashed_vectors_their_index_holds(run_dir, tmp_path):
    """An index records which hashed word / bigram vectors its keys hold; queries draw the
    same. One written before the field existed (no "hashed_vectors" in its meta, from a
    config.json without it) held gaussian vectors: a query keyed with signs would not find
    its own chunk."""
    import shutil
    workdir, model, config = run_dir
    meta = json.loads((build.index_path(workdir, build.REKEYED) / "meta.json").read_text())
    assert meta["hashed_vectors"] == config.provenance.hashed_vectors == "signs"
    text = "Rust borrows are checked at compile"

    def top(wd):
        q = open_query(wd, model, config)
        chunks, _ = q.encode([text])
        scores, _ = q.retriever.search(chunks, 1)
        return q.prov.hashed_vectors, float(scores[0, 0])

    assert top(workdir) == ("signs", pytest.approx(1.0, abs=1e-3))
    old = tmp_path / "train"
    shutil.copytree(workdir, old)
    m = old / "provenance" / "index" / build.REKEYED / "meta.json"
    m.write_text(json.dumps({k: v for k, v in json.loads(m.read_text()).items()
                             if k != "hashed_vectors"}))
    kind, score = top(old)       # the signs keys queried with gaussian vectors: no longer 1
    assert kind == "gaussian" and score < 0.99
    saved = config.copy_and_resolve_references()
    del saved.provenance["hashed_vectors"]
    assert build.provenance_config(saved).hashed_vectors == "gaussian"


def test_rekeying_wider_than_the_logged_keys(run_dir, tmp_path):
    """provenance.rekey_d_p keys the re-keyed index (and so its queries) wider than d_p: the
    store and index hold rekey_d_p-dim unit keys, a verbatim training chunk still finds
    itself at cosine 1, and the query follows the index's width, not the config's."""
    import shutil
    workdir, model, config = run_dir
    wide = tmp_path / "train"
    shutil.copytree(workdir, wide)
    cfg = config.copy_and_resolve_references()
    d_p = cfg.provenance.d_p
    cfg.provenance.rekey_d_p = 2 * d_p
    build.build_index(wide, model, cfg, 0, rekey=True, log=lambda m: None)
    rows = keystore.read_store(build.store_path(wide, build.REKEYED))
    assert rows["keys"].shape[1] == 2 * d_p
    np.testing.assert_allclose(np.linalg.norm(rows["keys"], axis=1), 1.0, rtol=1e-5)
    meta = json.loads((build.index_path(wide, build.REKEYED) / "meta.json").read_text())
    assert meta["d_p"] == 2 * d_p
    # queried with the run's own config (d_p unchanged): the index's width wins
    q = open_query(wide, model, config)
    assert q.prov.d_p == 2 * d_p
    chunks, _ = q.encode(["Rust borrows are checked at compile"])
    assert chunks.keys.shape == (1, 2 * d_p)
    scores, ids = q.retriever.search(chunks, 1)
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-3)
    assert ChunkLookup(q.corpus).text(int(ids[0, 0])) == "Rust borrows are checked at compile"


def test_building_again_reuses_the_rekeyed_index_of_the_same_checkpoint_and_config(
        run_dir, tmp_path, monkeypatch):
    """The index tool after the eval binary: the same step, corpus and re-keying config
    reuse the re-keyed index (no second pass), and the same DEFAULT and mass come out;
    another step or another re-keying config, or --rekey, keys the corpus again."""
    import shutil
    workdir, model, config = run_dir
    wd = tmp_path / "train"
    shutil.copytree(workdir, wd)
    passes = []
    real = build.rekey_corpus
    monkeypatch.setattr(build, "rekey_corpus", lambda *a, **k: passes.append(1) or real(*a, **k))
    mass = build.load_mass(wd)
    logs = []
    built = build.build_index(wd, model, config, 0, log=logs.append)
    assert passes == [] and any("reusing" in m for m in logs)
    assert built["rekeyed"]["rekeyed_with"]["checkpoint_step"] == 0
    assert build.default_index(wd) == "rekeyed"
    np.testing.assert_array_equal(build.load_mass(wd), mass)
    build.build_index(wd, model, config, 1, log=logs.append)             # another step
    assert passes == [1]
    build.build_index(wd, model, config, 1, log=logs.append)             # now that one
    assert passes == [1]
    cfg = config.copy_and_resolve_references()
    cfg.provenance.rekey_context = "document" if cfg.provenance.rekey_context == "chunk" else "chunk"
    build.build_index(wd, model, cfg, 1, log=logs.append)                # another config
    build.build_index(wd, model, cfg, 1, rekey=True, log=logs.append)    # asked for
    assert passes == [1, 1, 1]


def test_rekey_width_needs_the_fixed_head():
    from cbm_lm.config import ProvenanceConfig
    with pytest.raises(ValueError, match="rekey_d_p"):
        ProvenanceConfig(d_p=64, head="learned", rekey_d_p=128).validate()
    with pytest.raises(ValueError, match="rekey_d_p"):
        ProvenanceConfig(d_p=64, rekey_d_p=72, pq_m=16).validate()
    from cbm_lm.provenance.query import keying_like
    with pytest.raises(ValueError, match="128-dim keys"):
        keying_like(ProvenanceConfig(d_p=64, head="learned"), {"store": "rekeyed", "d_p": 128})
    assert keying_like(ProvenanceConfig(d_p=64), {"store": "rekeyed", "d_p": 128}).d_p == 128
    # the gradient reference's index (no store) keeps the run's width
    assert keying_like(ProvenanceConfig(d_p=64), {"method": "gradient", "d_p": 128}).d_p == 64


def test_a_logged_store_past_the_checkpoint_and_a_stale_rekeyed_index(run_dir, tmp_path,
                                                                       monkeypatch):
    """Rows logged after the checkpoint (a run killed after a flush) are keys of a model the
    index does not describe: the logged index leaves them out. A re-keyed index built for
    another step is not used, nor its masses. And each index is queried with keys made as
    its own were: the logged one at d_p, a re-keyed one at 2 d_p, side by side."""
    import shutil
    workdir, model, config = run_dir
    wd = tmp_path / "train"
    shutil.copytree(workdir, wd)
    corpus_dir = tmp_path / "corpus"
    shutil.copytree(config.data.dir, corpus_dir)
    cfg = config.copy_and_resolve_references()
    cfg.data.dir = str(corpus_dir)
    rows = keystore.read_store(build.store_path(wd, build.REKEYED))   # step-0 keys of every chunk
    writer = keystore.KeyStoreWriter(build.store_path(wd, build.LOGGED), 0)
    writer.add(rows["ids"], rows["keys"], step=1)
    writer.add(rows["ids"][:3], -rows["keys"][:3], step=5)             # after the checkpoint
    writer.flush()
    assert (build.root(wd) / "word-mass.npy").exists()
    logs = []
    built = build.build_index(wd, model, cfg, 2, log=logs.append)
    assert set(built) == {build.LOGGED} and build.default_index(wd) == build.LOGGED
    assert built[build.LOGGED]["rows"] == len(rows["ids"])
    assert any("leaving out 3 rows logged after step 2" in m for m in logs)
    assert any("not used" in m for m in logs)
    assert build.load_mass(wd, "word") is None and build.load_mass(wd, build.REKEYED) is None
    # the step-1 key, not the later one: a chunk's own step-0/1 key finds it at cosine 1
    idx = KeyIndex.load(build.index_path(wd, build.LOGGED))
    scores, ids = idx.search(rows["keys"][:3], 1)
    np.testing.assert_array_equal(ids[:, 0], rows["ids"][:3])
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-4)

    # a wider re-keyed index beside the logged one, both scored on planted facts
    cfg.provenance.rekey_d_p = 2 * cfg.provenance.d_p
    build.build_index(wd, model, cfg, 2, rekey=True, log=logs.append)
    lookup = ChunkLookup(Corpus(str(corpus_dir)))
    facts = [{"id": i, "statement": lookup.text(int(c)), "chunk_id": int(c),
              "queries": [lookup.text(int(c))]} for i, c in enumerate(rows["ids"][:4])]
    (corpus_dir / "planted_facts.json").write_text(json.dumps({"facts": facts}))
    from cbm_lm.provenance import evaluate
    monkeypatch.setattr(evaluate, "source_accuracy", lambda *a, **k: {})   # no held-out split
    res = evaluate_methods(wd, model, cfg, ("provenance",), indexes=(build.LOGGED, build.REKEYED),
                           source_chunks=4, log=lambda m: None)
    # the logged rows here are re-keyed keys under the logged index's keying (tokens lexical
    # features), so only that it was scored is checked; the re-keyed index, keyed at 2 d_p,
    # would be searched with d_p-wide queries if it took the first index's keying
    assert res[f"provenance/{build.LOGGED}"]["verbatim"]["n"] == 4
    assert res[f"provenance/{build.REKEYED}"]["verbatim"]["recall@1"] == 1.0


def test_the_padding_batch_of_a_process_with_fewer_batches_keys_nothing(run_dir):
    """Multi-host re-keying runs the collective key pass as often on every process; one
    with fewer batches (or none) keys padding batches, which must add no mass."""
    from cbm_lm.provenance.packing import empty_batch
    from cbm_lm.provenance.rekey import make_key_fn
    _, model, config = run_dir
    prov = build.provenance_config(config).for_rekeying()
    corpus = Corpus(config.data.dir)
    key_fn = make_key_fn(model, prov, None, tokenizer=corpus.tokenizer)
    batch = empty_batch(prov.rekey_batch_size, config.data.seq_len, prov.max_chunks_per_row,
                        corpus.tokenizer.pad_id)
    res = key_fn(batch)
    assert (batch["slot_ids"] < 0).all()
    assert float(np.abs(res["mass"]).sum()) == 0.0


def test_the_eval_reuses_an_index_of_its_checkpoint_whatever_its_keying(run_dir, tmp_path):
    """current_index: the default index of this step and corpus, built with any re-keying
    flags, is the eval's as it is; another step's, or another corpus's, is not."""
    import shutil
    workdir, model, config = run_dir
    wd = tmp_path / "train"
    shutil.copytree(workdir, wd)
    corpus = Corpus(config.data.dir)
    cfg = config.copy_and_resolve_references()
    cfg.provenance.rekey_d_p = 2 * cfg.provenance.d_p             # a user's own keying
    build.build_index(wd, model, cfg, 0, rekey=True, log=lambda m: None)
    assert build.current_index(wd, 0, corpus) == build.REKEYED
    assert build.current_index(wd, 1, corpus) is None
    other = tmp_path / "corpus"
    shutil.copytree(config.data.dir, other)
    (other / "manifest.json").write_text((other / "manifest.json").read_text() + " ")
    assert build.current_index(wd, 0, Corpus(str(other))) is None


def test_a_store_logged_only_after_the_checkpoint_is_refused_naming_it(tmp_path):
    """Key logging switched on after the indexed checkpoint: every row is from a later
    model. The build says so, naming the store and the steps, before writing an index."""
    from cbm_lm.config import ProvenanceConfig
    writer = keystore.KeyStoreWriter(build.store_path(tmp_path, build.LOGGED), 0)
    writer.add(np.arange(4), np.ones((4, 8), np.float32), step=7)
    writer.flush()
    with pytest.raises(ValueError, match=r"keys/logged.*after checkpoint step 2 "
                                         r"\(earliest step 7\)"):
        build.index_store(tmp_path, build.LOGGED, ProvenanceConfig(d_p=8), 2, log=lambda m: None)
    assert not build.index_path(tmp_path, build.LOGGED).exists()


def test_a_process_with_fewer_batches_runs_the_key_pass_as_often_as_the_busiest(run_dir,
                                                                                tmp_path,
                                                                                monkeypatch):
    """rekey_corpus as process 0 of 2 whose peer has 2 more batches: it keys 2 padding
    batches after its own (the collective pass must run as often everywhere), and they add
    no key and no mass: the store equals a one-process pass over the same documents."""
    import jax
    from jax.experimental import multihost_utils
    from cbm_lm.provenance import rekey
    _, model, config = run_dir
    prov = build.provenance_config(config).for_rekeying()
    corpus = Corpus(config.data.dir)
    calls = []
    real_make = rekey.make_key_fn

    def counting_make(*a, **kw):
        fn = real_make(*a, **kw)

        def key_fn(batch):
            calls.append(int((batch["slot_ids"] >= 0).sum()))
            return fn(batch)
        return key_fn

    monkeypatch.setattr(rekey, "make_key_fn", counting_make)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda x: np.array([int(x), int(x) + 2]))
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: None)
    res = rekey.rekey_corpus(model, corpus, prov, config.data.seq_len, tmp_path / "p0",
                             log=lambda m: None)
    assert len(calls) == res["batches"] + 2 and calls[-2:] == [0, 0] and min(calls[:-2]) > 0
    rows = keystore.read_store(tmp_path / "p0")
    assert len(rows["ids"]) == res["chunks"] > 0
    # the same documents keyed without padding passes give the same mass
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.array([int(x)] * 2))
    rekey.rekey_corpus(model, corpus, prov, config.data.seq_len, tmp_path / "same",
                       log=lambda m: None)
    np.testing.assert_array_equal(rekey.read_mass(tmp_path / "p0"),
                                  rekey.read_mass(tmp_path / "same"))
