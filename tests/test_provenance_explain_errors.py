"""Bad paths and flag combinations of the provenance and explain tools: one-line errors
('<tool>: error: ...', non-zero exit, no traceback), and the library checks behind them
(token-id files, key index names, an explicit corpus). An untrained tiny checkpoint, no
training run."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest
from flax import nnx

from cbm_lm.config import ModelConfig
from cbm_lm.inference.prompts import load_prompt_ids, random_prompt_ids, single_prompt_ids
from cbm_lm.model import ConceptBottleneckLM
from cbm_lm.provenance import build
from cbm_lm.provenance.open import check_index, make_retriever
from cbm_lm.train.checkpoint import save_params
from data_fixtures import build as build_corpus
from provenance_fixtures import small_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """tmp/corpus, tmp/train (its untrained checkpoint, no provenance index), and
    lone/train, whose config names a corpus that exists nowhere."""
    tmp = tmp_path_factory.mktemp("tools")
    corpus = build_corpus(tmp)
    config = small_config(corpus)
    model = ConceptBottleneckLM(ModelConfig.from_config(config.model), rngs=nnx.Rngs(0))
    save_params(tmp / "train", config, model)
    lone = tmp_path_factory.mktemp("lone")
    config.data.dir = str(lone / "gone" / "corpus_gone")
    save_params(lone / "train", config, model)
    return types.SimpleNamespace(tmp=tmp, corpus=corpus, workdir=tmp / "train",
                                 lone=lone / "train")


def _tool(name, *args):
    env = {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "")}
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def _fails(proc, tool, *needles):
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if tool:
        assert f"{tool}: error: " in proc.stderr, proc.stderr[-3000:]
    for n in needles:
        assert n in proc.stderr, (n, proc.stderr[-3000:])


# ---- the library ----------------------------------------------------------------------

def test_load_prompt_ids_checks_and_names_the_file(tmp_path):
    def save(name, arr):
        np.save(tmp_path / name, arr)
        return str(tmp_path / name)

    ok = load_prompt_ids(save("ok.npy", np.arange(5, dtype=np.int64)))
    assert ok.dtype == np.int32 and ok.tolist() == [0, 1, 2, 3, 4]
    assert load_prompt_ids(save("b.npy", np.ones((2, 3), np.int16))).shape == (2, 3)
    cases = {"f.npy": (np.ones(4, np.float32), "ids must be integers, got dtype float32"),
             "e.npy": (np.zeros((1, 0), np.int32), "ids are empty (shape [1, 0])"),
             "r3.npy": (np.zeros((1, 2, 3), np.int32), "shape [T] or [B,T], got [1, 2, 3]"),
             "neg.npy": (np.array([[1, 2], [3, -1]]), "id -1 at [b,t]=[1, 1] is outside"),
             "big.npy": (np.array([1, 2**40]), "id 1099511627776 at [t]=[1] is outside")}
    for name, (arr, msg) in cases.items():
        with pytest.raises(ValueError) as e:
            load_prompt_ids(save(name, arr))
        assert str(e.value).startswith(str(tmp_path / name)) and msg in str(e.value), e.value
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 4\)"):
        load_prompt_ids(save("v.npy", np.array([1, 4])), vocab_size=4)
    with pytest.raises(ValueError, match=r"shape \[B,T\], got \[5\] \(a single sequence"):
        load_prompt_ids(str(tmp_path / "ok.npy"), ndims=(2,))
    np.savez(tmp_path / "z.npz", a=np.arange(3))
    with pytest.raises(ValueError, match="npz archive"):
        load_prompt_ids(str(tmp_path / "z.npz"))
    (tmp_path / "t.npy").write_text("1 2 3\n")
    with pytest.raises(ValueError, match="not a readable .npy array"):
        load_prompt_ids(str(tmp_path / "t.npy"))
    with pytest.raises(FileNotFoundError, match="missing.npy: no such file"):
        load_prompt_ids(str(tmp_path / "missing.npy"))


def test_single_prompt_ids_refuses_a_batch_naming_file_and_shape():
    assert single_prompt_ids(np.zeros((1, 4), np.int32), "x.npy").shape == (4,)
    assert single_prompt_ids(np.zeros(4, np.int32), "x.npy").shape == (4,)
    with pytest.raises(ValueError, match=r"x.npy: expected one sequence .* shape \[2, 4\]"):
        single_prompt_ids(np.zeros((2, 4), np.int32), "x.npy")
    assert random_prompt_ids(10, 24).shape == (24,)


def test_an_index_is_only_for_the_provenance_method():
    check_index("provenance", "logged")
    check_index("bm25", None)
    with pytest.raises(ValueError, match="method 'bm25' reads none"):
        check_index("bm25", "rekeyed")
    with pytest.raises(ValueError, match="unknown provenance index 'rekeyd'"):
        check_index("provenance", "rekeyd")
    with pytest.raises(ValueError, match="method 'gradient' reads none"):   # before any I/O
        make_retriever("gradient", "/nonexistent", None, None, None, index="logged")


def test_an_explicit_corpus_dir_is_strict(dirs):
    config = small_config(dirs.corpus)
    typo = dirs.tmp / "elsewhere" / "corpus"      # same basename as the corpus beside the run
    config.data.dir = str(typo)
    assert build.corpus_dir(config, dirs.workdir) == str(dirs.tmp / "corpus")   # the fallback
    with pytest.raises(FileNotFoundError, match=f"corpus_dir {typo}: no such directory"):
        build.corpus_dir(config, dirs.workdir, str(typo))
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        build.corpus_dir(config, dirs.workdir, str(dirs.tmp))
    assert build.corpus_dir(config, dirs.workdir, str(dirs.corpus)) == str(dirs.corpus)


# ---- tools/provenance_query.py --------------------------------------------------------

def test_provenance_query_bad_paths(dirs, tmp_path):
    q = "provenance_query.py"
    _fails(_tool(q, "--workdir", tmp_path / "nope", "--text", "hi"), "provenance_query",
           "nope/config.json")
    _fails(_tool(q, "--workdir", dirs.workdir, "--queries", tmp_path / "missing.txt"),
           "provenance_query", f"--queries={tmp_path / 'missing.txt'}: no such file")
    (tmp_path / "empty.txt").write_text("\n  \n")
    _fails(_tool(q, "--workdir", dirs.workdir, "--queries", tmp_path / "empty.txt"),
           "provenance_query", "empty.txt: no queries")
    _fails(_tool(q, "--workdir", dirs.workdir, "--text", "hi"), "provenance_query",
           "no provenance index", "tools/build_provenance_index.py")
    _fails(_tool(q, "--workdir", dirs.workdir, "--text", "hi", "--corpus_dir",
                 tmp_path / "corpus"), "provenance_query", f"corpus_dir {tmp_path / 'corpus'}")


def test_provenance_query_index_flag(dirs):
    _fails(_tool("provenance_query.py", "--workdir", dirs.workdir, "--text", "hi",
                 "--method", "bm25", "--index", "logged"), None,
           "--index=logged picks the key index of --method provenance")
    _fails(_tool("provenance_query.py", "--workdir", dirs.workdir, "--text", "hi",
                 "--index", "rekeyd"), None, "--index")


# ---- tools/build_provenance_index.py --------------------------------------------------

def test_build_provenance_index_bad_paths(dirs, tmp_path):
    b = "build_provenance_index.py"
    _fails(_tool(b, "--workdir", tmp_path / "nope"), "build_provenance_index", "config.json")
    _fails(_tool(b, "--workdir", dirs.lone), "build_provenance_index", "no corpus at",
           "corpus_gone")
    # a typo'd --corpus_dir with the basename of the corpus beside the run: refused, not
    # silently replaced by that corpus
    typo = tmp_path / "typo" / "corpus"
    _fails(_tool(b, "--workdir", dirs.workdir, "--corpus_dir", typo), "build_provenance_index",
           f"corpus_dir {typo}: no such directory")
    assert not (dirs.workdir / build.PROVENANCE_DIR).exists()


# ---- tools/explain.py -----------------------------------------------------------------

def test_explain_bad_paths_and_inputs(dirs, tmp_path):
    out = tmp_path / "r.md"
    _fails(_tool("explain.py", "--checkpoint", tmp_path / "nope", "--out", out), "explain",
           "nope/config.json")
    _fails(_tool("explain.py", "--checkpoint", dirs.workdir, "--corpus_dir", tmp_path / "nc",
                 "--out", out), "explain", f"{tmp_path / 'nc'}: no manifest.json")
    np.save(tmp_path / "ids.npy", np.ones((2, 5), np.int32))
    _fails(_tool("explain.py", "--checkpoint", dirs.workdir, "--text", "the cat", "--input_ids",
                 tmp_path / "ids.npy", "--out", out), None, "at most one of --text and --input_ids")
    _fails(_tool("explain.py", "--checkpoint", dirs.workdir, "--input_ids", tmp_path / "ids.npy",
                 "--out", out), None, f"{tmp_path / 'ids.npy'}: expected one sequence",
           "shape [2, 5]")
    np.save(tmp_path / "f.npy", np.ones((1, 5), np.float32))
    _fails(_tool("explain.py", "--checkpoint", dirs.workdir, "--input_ids", tmp_path / "f.npy",
                 "--out", out), None, "--input_ids: ", "must be integers")
    assert not out.exists()


def test_explain_random_prompt_follows_max_tokens(dirs, tmp_path):
    """No corpus anywhere: random ids, as many as --max_tokens allows (was always 16)."""
    out = tmp_path / "r.md"
    r = _tool("explain.py", "--checkpoint", dirs.lone, "--max_tokens", "24", "--positions", "2",
              "--n_steps", "0", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Input: random ids (24 tokens)" in out.read_text()
