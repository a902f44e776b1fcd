"""Building provenance indexes: stores are replaced atomically, BM25 follows the corpus it
indexes, the re-keying flags act or are refused, and an index is labelled with the step
whose params keyed it."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath
from flax import nnx

from cbm_lm.config import ModelConfig
from cbm_lm.data.corpus import Corpus
from cbm_lm.model import ConceptBottleneckLM
from cbm_lm.provenance import build, gradient, keystore, rekey
from cbm_lm.provenance.chunks import ChunkLookup
from cbm_lm.provenance.open import open_query
from cbm_lm.train import checkpoint
from data_fixtures import build as build_corpus, fixture_docs
from provenance_fixtures import run_dir  # noqa: F401 - a fixture

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _fail_renaming_temporaries(monkeypatch, where):
    """Renaming a directory whose name holds '.tmp' (a finished temporary, swapped in) fails:
    the moment between removing the old directory and renaming the new one in."""
    cls = type(epath.Path(where))
    real = cls.rename

    def rename(self, target):
        if ".tmp" in self.name:
            raise OSError("rename failed")
        return real(self, target)
    monkeypatch.setattr(cls, "rename", rename)


def _small_store(store, ids):
    w = keystore.KeyStoreWriter(store, 0)
    w.add(np.asarray(ids), np.eye(len(ids), 8, dtype=np.float32), step=0)
    w.flush()
    return keystore.read_store(store)


def test_a_failed_rekey_swap_keeps_the_previous_store(run_dir, tmp_path, monkeypatch):
    _, model, config = run_dir
    store = tmp_path / "store"
    before = _small_store(store, [3, 1, 2])
    _fail_renaming_temporaries(monkeypatch, tmp_path)
    with pytest.raises(OSError, match="rename failed"):
        rekey.rekey_corpus(model, Corpus(config.data.dir),
                           build.provenance_config(config).for_rekeying(), config.data.seq_len,
                           store, log=lambda m: None)
    monkeypatch.undo()
    after = keystore.read_store(store)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    assert [p.name for p in tmp_path.iterdir()] == ["store"]     # no temporary left behind


def test_a_failed_gradient_store_swap_keeps_the_previous_store(run_dir, tmp_path, monkeypatch):
    _, _, config = run_dir
    store, _ = gradient.paths(tmp_path)
    before = _small_store(store, [5, 6])
    k = 16    # phi of every chunk: one fixed unit vector (the swap is under test, not phi)
    monkeypatch.setattr(gradient, "make_gradient_fn", lambda model, k, seed: (
        lambda toks, lens: np.full((len(toks), k), k ** -0.5, np.float32)))
    _fail_renaming_temporaries(monkeypatch, tmp_path)
    with pytest.raises(OSError, match="rename failed"):
        gradient.build_gradient_index(tmp_path, None, Corpus(config.data.dir),
                                      build.provenance_config(config), k=k, log=lambda m: None)
    monkeypatch.undo()
    after = keystore.read_store(store)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    assert [p.name for p in store.parent.iterdir()] == ["keys"]


def test_a_failed_bm25_save_keeps_the_previous_index(tmp_path, monkeypatch):
    from cbm_lm.provenance.bm25 import BM25Retriever
    d = tmp_path / "bm25"
    BM25Retriever.build(np.array([1, 2]), ["red apples", "green pears"]).save(d)
    _fail_renaming_temporaries(monkeypatch, tmp_path)
    with pytest.raises(OSError, match="rename failed"):
        BM25Retriever.build(np.array([7, 8]), ["blue sky", "grey sea"]).save(d)
    monkeypatch.undo()
    assert np.load(d / "ids.npy").tolist() == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["bm25"]


def test_bm25_follows_the_corpus_it_is_opened_with(run_dir, tmp_path):
    """BM25 built for corpus A, then opened with corpus B (another --corpus_dir, or A
    rebuilt): B's chunks answer, read back through B; chunk ids are positions in a corpus,
    so A's index would name B's chunks wrongly. Back on A, A's chunks answer again."""
    workdir, model, config = run_dir
    wd = tmp_path / "train"
    shutil.copytree(workdir, wd)
    zebra = "Zebras graze on the open savanna at dawn."
    docs = [dict(d, text=zebra) if d["id"] == "pets-0" else d for d in fixture_docs()]
    other = build_corpus(tmp_path / "b", docs=docs,
                         tokenizer=pathlib.Path(config.data.dir).parent / "tok")

    def top(corpus_dir, text):
        q = open_query(wd, model, config, method="bm25", corpus_dir=str(corpus_dir))
        _, ids = q.retriever.search_texts([text], 1)
        return ChunkLookup(q.corpus).text(int(ids[0, 0])) if ids[0, 0] >= 0 else None

    assert top(config.data.dir, "cat sat mat").startswith("The cat sat")     # built for A
    got = top(other, "zebras savanna dawn")          # a chunk of B's zebra text, read from B
    assert got is not None and got in zebra and "savanna" in got
    assert top(config.data.dir, "cat sat mat").startswith("The cat sat")     # A again


def test_rekeying_flags_act_with_rekey_and_are_refused_without(run_dir, tmp_path, monkeypatch):
    """--rekey_d_p / --context (rekey_overrides) key the re-keyed index when it is built:
    on a run without logged keys, or with rekey. On a run with logged keys, without
    rekey and with no index keyed with them, they would only set the re-keyed index
    aside: refused before anything is written. An index keyed with them is reused."""
    workdir, model, config = run_dir
    wd = tmp_path / "train"
    shutil.copytree(workdir, wd)
    d_p = build.provenance_config(config).d_p
    wide = {"rekey_d_p": 2 * d_p}
    built = build.build_index(wd, model, config, 0, rekey_overrides=wide, log=lambda m: None)
    assert built[build.REKEYED]["d_p"] == 2 * d_p                  # no logged keys: re-keyed
    rows = keystore.read_store(build.store_path(wd, build.REKEYED))
    writer = keystore.KeyStoreWriter(build.store_path(wd, build.LOGGED), 0)
    narrow = rows["keys"][:, :d_p]
    writer.add(rows["ids"], narrow / np.linalg.norm(narrow, axis=1, keepdims=True), step=0)
    writer.flush()

    prov_dir = build.root(wd)
    snapshot = {p: p.read_bytes() for p in sorted(pathlib.Path(prov_dir).rglob("*"))
                if p.is_file()}
    other = "document" if config.provenance.rekey_context == "chunk" else "chunk"
    with pytest.raises(build.UnusedRekeyOverrides,
                       match=rf"--context={other}, --rekey_d_p={2 * d_p} set how .*/"
                             r"keys/logged holds training-time keys .* pass --rekey"):
        build.build_index(wd, model, config, 0, rekey_overrides=dict(wide, rekey_context=other),
                          log=lambda m: None)
    assert {p: p.read_bytes() for p in sorted(pathlib.Path(prov_dir).rglob("*"))
            if p.is_file()} == snapshot

    passes = []
    monkeypatch.setattr(build, "rekey_corpus", lambda *a, **k: passes.append(1))
    built = build.build_index(wd, model, config, 0, rekey_overrides=wide, log=lambda m: None)
    assert passes == [] and built[build.REKEYED]["d_p"] == 2 * d_p   # reused, still default
    assert build.default_index(wd) == build.REKEYED
    assert build.load_mass(wd, build.REKEYED) is not None


@pytest.mark.slow
def test_index_tool_refuses_rekeying_flags_without_rekey(run_dir, tmp_path):
    """The same through tools/build_provenance_index.py: a usage error naming the flag,
    and the re-keyed index and its masses stay as they were."""
    workdir, _, config = run_dir
    wd = tmp_path / "train"
    shutil.copytree(workdir, wd)
    rows = keystore.read_store(build.store_path(wd, build.REKEYED))
    writer = keystore.KeyStoreWriter(build.store_path(wd, build.LOGGED), 0)
    writer.add(rows["ids"], rows["keys"], step=0)
    writer.flush()
    meta = (build.index_path(wd, build.REKEYED) / "meta.json").read_text()
    env = {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "build_provenance_index.py"),
                           f"--workdir={wd}", "--rekey_d_p=64"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "--rekey_d_p=64 set how chunks are re-keyed" in proc.stderr, proc.stderr[-3000:]
    assert (build.index_path(wd, build.REKEYED) / "meta.json").read_text() == meta
    assert build.default_index(wd) == build.REKEYED
    assert build.load_mass(wd, build.REKEYED) is not None
    assert json.loads(meta)["d_p"] == build.provenance_config(config).d_p


def test_the_step_returned_is_the_one_whose_params_were_loaded(run_dir, tmp_path, monkeypatch):
    """Building during training: a checkpoint commits while the index tool loads the
    latest. The step it labels the index with is the one whose params it restored (asking
    the manager for the latest again names the new one)."""
    workdir, _, config = run_dir
    wd = tmp_path / "train"
    shutil.copytree(workdir, wd)
    newer = ConceptBottleneckLM(ModelConfig.from_config(config.model), rngs=nnx.Rngs(1))
    real = checkpoint.restore_params

    def restore_then_commit(*a, **kw):
        out = real(*a, **kw)
        if not (wd / checkpoint.CHECKPOINTS / "1").exists():
            checkpoint.save_params(wd, config, newer, step=1)    # the trainer's next save
        return out
    monkeypatch.setattr(checkpoint, "restore_params", restore_then_commit)
    model, _, step = checkpoint.load_model_and_step(wd)
    monkeypatch.undo()
    with checkpoint.params_manager(wd, read_only=True) as mngr:
        assert mngr.latest_step() == 1                           # the race did happen
    assert step == 0

    def flat(m):
        return np.concatenate([np.ravel(x) for x in jax.tree.leaves(nnx.state(m, nnx.Param))])
    want, _ = checkpoint.load_model(wd, step=0)
    np.testing.assert_array_equal(flat(model), flat(want))
    assert not np.array_equal(flat(model), flat(checkpoint.load_model(wd, step=1)[0]))
