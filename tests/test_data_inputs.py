"""Parquet concept-atlas input, the seqio guard, and the build_corpus CLI."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cbm_lm.data import tokenizer as tokenizer_lib
from cbm_lm.data.corpus import Corpus
from cbm_lm.data.corpus_build import BuildConfig, build_corpus
from cbm_lm.data.errors import DataError

from data_fixtures import fixture_docs, make_tokenizer

TEXT = "Alpha beta gamma. Delta epsilon zeta. Eta theta iota."


def _atlas(tmp_path, tok, concept_ids=((0,), (1, 2), ())):
    d = tmp_path / "atlas"
    d.mkdir()
    ids = tok.encode(TEXT)
    starts = [0, len(tok.encode("Alpha beta gamma.")),
              len(tok.encode("Alpha beta gamma. Delta epsilon zeta."))]
    assert tok.encode("Alpha beta gamma.") == ids[: starts[1]]  # prefix-stable here
    pq.write_table(pa.table({"document_id": [7], "text": [TEXT], "source": ["atlas"],
                             "chunk_token_starts": [starts]}), d / "documents-0.parquet")
    pq.write_table(pa.table({"document_id": [7, 7, 7], "chunk_index": [0, 1, 2],
                             "concept_ids": [list(c) for c in concept_ids]}), d / "chunks-0.parquet")
    pq.write_table(pa.table({"concept_id": [0, 1, 2], "name": ["greek:first", "greek:mid", "x:y"],
                             "description": ["first letters", "middle letters", ""]}),
                   d / "concepts-0.parquet")
    return d, starts


def test_parquet_atlas_chunks_and_concepts(tmp_path):
    tok_path = make_tokenizer(tmp_path)
    tok = tokenizer_lib.load(tok_path)
    atlas, starts = _atlas(tmp_path, tok)
    build_corpus(BuildConfig(out=str(tmp_path / "c"), atlas=str(atlas), tokenizer=str(tok_path),
                             heldout_fraction=0.0, num_shards=1, max_chunk_tokens=64))
    c = Corpus(tmp_path / "c")
    assert [x.name for x in c.concepts.concepts] == ["greek:first", "greek:mid", "x:y"]
    assert c.concepts.concepts[0].description == "first letters"
    (rec,) = list(c.documents("train"))
    assert tok.decode(rec.tokens) == TEXT and rec.doc_key == "7"
    assert rec.chunk_bounds.tolist() == [*starts, len(rec.tokens)]
    assert [sorted(x for x in row if x >= 0) for row in rec.chunk_concepts] == [[0], [1, 2], []]


def test_parquet_atlas_concept_id_out_of_range(tmp_path):
    tok_path = make_tokenizer(tmp_path)
    atlas, _ = _atlas(tmp_path, tokenizer_lib.load(tok_path), concept_ids=((0,), (9,), ()))
    with pytest.raises(DataError) as e:
        build_corpus(BuildConfig(out=str(tmp_path / "c"), atlas=str(atlas),
                                 tokenizer=str(tok_path)))
    msg = str(e.value)
    assert "chunks-0.parquet" in msg and "row 1" in msg and "concept id 9 out of range" in msg
    assert "expected 0..2" in msg


def test_seqio_input_is_guarded():
    from cbm_lm.data import seqio_input
    try:
        import seqio  # noqa: F401
        pytest.skip("seqio installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="optional seqio extra"):
        seqio_input.seqio_to_jsonl("some_task", "train", "/tmp/x")


def test_cli_reports_bad_input_and_exit_status(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(fixture_docs()[0]) + "\n" + '{"text": 5}\n')
    cmd = [sys.executable, "tools/build_corpus.py", "--out", str(tmp_path / "o"),
           "--jsonl", str(src), "--vocab_size", "300"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 1
    assert f"{src}:2: field 'text' must be a string" in r.stderr
    r = subprocess.run(cmd + ["--skip_bad_records"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "skipped 1 bad records" in r.stderr
    assert json.loads(r.stdout)["splits"]["train"]["records"] + \
        json.loads(r.stdout)["splits"]["heldout"]["records"] == 1
    assert np.load(tmp_path / "o" / "train-00000-of-00008.index.npy").dtype.names[0] == "source_id"
