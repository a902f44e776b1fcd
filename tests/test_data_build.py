"""build_corpus under Beam's DirectRunner: records, labels, determinism, bad input."""

import json
import pathlib

import numpy as np
import pytest

from cbm_lm.data import records
from cbm_lm.data.corpus import Corpus
from cbm_lm.data.errors import DataError
from cbm_lm.data.source import ShardedArrayRecordSource

from data_fixtures import CHUNKED_SPANS, CHUNKED_TEXT, PETS, build, fixture_docs, make_tokenizer
from data_fixtures import small_corpus  # noqa: F401 (pytest fixture)


def _docs_by_key(corpus):
    return {r.doc_key: r for split in ("train", "heldout") for r in corpus.documents(split)}


def test_records_decode_to_input_and_labels_land_on_their_chunk(small_corpus):
    c = Corpus(small_corpus)
    tok, vocab = c.tokenizer, c.concepts
    docs = _docs_by_key(c)
    inputs = {d["id"]: d for d in fixture_docs()}
    assert set(docs) == set(inputs)
    for key, rec in docs.items():
        assert tok.decode(rec.tokens) == inputs[key]["text"]
        assert np.all(np.diff(rec.chunk_bounds) <= 16)  # max_chunk_tokens
    # The chunk-labelled doc: each labelled character span is exactly a run of chunks.
    rec = docs["chunked"]
    spans = CHUNKED_SPANS + [(46, len(CHUNKED_TEXT), [])]
    covered = []
    for s, e, names in spans:
        want = sorted(vocab.id(n) for n in names)
        text = "".join(tok.decode(rec.tokens[a:b]) for a, b, cc in _chunks(rec)
                       if sorted(x for x in cc if x >= 0) == want and (a, b) not in covered
                       and not covered.append((a, b)))
        assert text == CHUNKED_TEXT[s:e]
    assert sorted(covered) == [(a, b) for a, b, _ in _chunks(rec)]
    # Document-level labels land on every chunk of the doc.
    cat = docs["pets-0"]
    assert all(list(cc[cc >= 0]) == [vocab.id("topic:cats")] for _, _, cc in _chunks(cat))


def _chunks(rec):
    return [(int(rec.chunk_bounds[i]), int(rec.chunk_bounds[i + 1]), rec.chunk_concepts[i])
            for i in range(rec.num_chunks)]


def test_manifest_counts_ids_and_vocab(small_corpus):
    c = Corpus(small_corpus)
    m = c.manifest
    assert c.sources == ["code", "filler", "pets"]
    assert m["sources"]["pets"]["documents"] == len(PETS) + 1
    assert m["sources"]["code"]["documents"] == 2
    names = [x.name for x in c.concepts.concepts]
    assert names == sorted(names) and "topic:birds" in names and len(names) == m["num_concepts"]
    # topic:cats labels every chunk of exactly one document
    cat = _docs_by_key(c)["pets-0"]
    assert m["concepts"]["topic:cats"]["chunks"] == cat.num_chunks
    # chunk ids are unique and decode to (split, shard, position in shard)
    seen = []
    for split_code, split in enumerate(records.SPLITS):
        for shard, (path, n) in enumerate(c.shards(split)):
            src = ShardedArrayRecordSource([(path, n)])
            ids = np.concatenate([src[i].chunk_ids for i in range(n)] or [np.zeros(0, np.int64)])
            for pos, i in enumerate(ids):
                assert records.split_id(i) == (split_code, shard, pos)
            seen += ids.tolist()
    assert len(seen) == len(set(seen)) == m["splits"]["train"]["chunks"] + m["splits"]["heldout"]["chunks"]


def test_deterministic_and_heldout_split(tmp_path):
    docs = fixture_docs()
    docs[0]["split"] = "heldout"
    tok = make_tokenizer(tmp_path)
    a = build(tmp_path / "a", docs, tokenizer=tok, heldout_fraction=0.2)
    b = build(tmp_path / "b", list(reversed(docs)), tokenizer=tok, heldout_fraction=0.2)
    ma, mb = (json.loads((x / "manifest.json").read_text()) for x in (a, b))
    assert ma["content_hash"] == mb["content_hash"]
    for f in sorted(a.iterdir()):
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    held = {r.doc_key for r in Corpus(a).documents("heldout")}
    assert "pets-0" in held and 0 < len(held) < len(docs)


def test_lexicon_labels_land_on_the_right_words(tmp_path):
    lex = tmp_path / "lex.tsv"
    lex.write_text("cat\tss:animal\nbowl\tss:artifact\n")
    out = build(tmp_path, labelers=["imported", f"lexicon:{lex}"])
    c = Corpus(out)
    tok = c.tokenizer
    found = {}
    for rec in c.documents("train"):
        for s, e, cid in rec.token_spans:
            found.setdefault(c.concepts.name(cid), []).append(tok.decode(rec.tokens[s:e]).strip())
    # "cat" once in PETS[0]; "bowls" (inflected) once in PETS[2]; no other word
    assert found == {"ss:animal": ["cat"], "ss:artifact": ["bowls"]}


def _bad(tmp_path, lines: list[bytes], **kw):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    tok = make_tokenizer(tmp_path)
    with pytest.raises(DataError) as e:
        build(tmp_path, docs=[], tokenizer=tok, jsonl=[str(path)], **kw)
    assert not (tmp_path / "corpus").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # nothing half-written
    return str(e.value), str(path)


GOOD = json.dumps({"text": "fine", "source": "s", "concepts": ["a"]}).encode()


@pytest.mark.parametrize("line,expect", [
    (b'{"text": "broken', ["malformed JSON", "expected one JSON object per line"]),
    (b'{"source": "s"}', ["missing field 'text'", "expected a non-empty string"]),
    (b'{"text": "   ", "source": "s"}', ["empty document", "expected non-empty text"]),
    (b'{"text": "caf\xe9", "source": "s"}', ["not valid UTF-8", "expected UTF-8"]),
    (b'{"text": "x", "chunks": [{"start": 0, "end": 9}]}', ["chunks[0]", "<= 1"]),
])
def test_bad_lines_name_file_line_and_expectation(tmp_path, line, expect):
    msg, path = _bad(tmp_path, [GOOD, line])
    assert f"{path}:2:" in msg
    for part in expect:
        assert part in msg, msg


def test_unknown_concept_and_id_out_of_range(tmp_path):
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps(["a", "b"]))
    line = json.dumps({"text": "hello", "source": "s", "concepts": ["zebra"]}).encode()
    msg, path = _bad(tmp_path, [GOOD, GOOD, line], concepts=str(vocab))
    assert f"{path}:3:" in msg and "unknown concept name 'zebra'" in msg and str(vocab) in msg
    line = json.dumps({"text": "hello", "source": "s", "concepts": [1, 7]}).encode()
    msg, path = _bad(tmp_path, [line], concepts=str(vocab))
    assert f"{path}:1:" in msg and "concept id 7 out of range" in msg and "expected 0..1" in msg


def test_skip_bad_records_counts_and_reports(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(GOOD + b"\n{oops\n" + GOOD.replace(b"fine", b"also fine") + b"\n{}\n")
    out = build(tmp_path, docs=[], jsonl=[str(path)], skip_bad_records=True)
    m = Corpus(out).manifest
    assert m["bad_records"]["count"] == 2
    assert m["splits"]["train"]["records"] == 2
    assert any(f"{path}:2:" in x for x in m["bad_records"]["examples"])
    assert any(f"{path}:4:" in x and "missing field 'text'" in x for x in m["bad_records"]["examples"])


def test_truncated_shard_is_reported(small_corpus, tmp_path):
    c = Corpus(small_corpus)
    path, n = max(c.shards("train"), key=lambda s: s[1])
    cut = tmp_path / "cut.array_record"
    data = open(path, "rb").read()
    cut.write_bytes(data[: len(data) // 3])
    src = ShardedArrayRecordSource([(str(cut), n)])
    with pytest.raises(ValueError) as e:
        src[n - 1]
    assert str(cut) in str(e.value) and "truncated" in str(e.value)


def test_the_tokenizer_sample_holds_only_training_documents(tmp_path):
    """The corpus build trains its BPE on the training split alone (the held-out documents
    are what perplexity and detection are scored on); unparsable lines are skipped."""
    from cbm_lm.data.corpus_build import _sample_texts
    f = tmp_path / "in.jsonl"
    f.write_text("\n".join([json.dumps({"text": "alpha train text", "split": "train"}),
                            json.dumps({"text": "omega heldout text", "split": "heldout"}),
                            "{not json",
                            json.dumps({"text": "beta train text"})]) + "\n")
    got = list(_sample_texts([str(f)], 1 << 20, heldout_fraction=0.0))
    assert got == ["alpha train text", "beta train text"]


def test_a_bare_glob_matches_in_the_working_directory(tmp_path, monkeypatch):
    from cbm_lm.data.corpus_build import expand
    (tmp_path / "sub").mkdir()
    for name in ("a.jsonl", "b.jsonl", "c.txt", "sub/d.jsonl"):
        (tmp_path / name).write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    assert [pathlib.Path(p).name for p in expand(["*.jsonl"])] == ["a.jsonl", "b.jsonl"]
    assert [pathlib.Path(p).name for p in expand(["sub/*.jsonl"])] == ["d.jsonl"]
    assert [pathlib.Path(p).name for p in expand([str(tmp_path) + "/?.jsonl"])] == [
        "a.jsonl", "b.jsonl"]


def test_publishing_over_an_old_corpus_keeps_it_when_the_swap_fails(tmp_path, monkeypatch):
    from etils import epath

    from cbm_lm.data import corpus_finalize
    out, new = epath.Path(tmp_path) / "corpus", epath.Path(tmp_path) / ".corpus.tmp-1"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    new.mkdir()
    (new / "manifest.json").write_text("new")
    real = type(new).rename

    def rename(self, target):
        if self.name == new.name:
            raise OSError("cross-device link")
        return real(self, target)
    monkeypatch.setattr(type(new), "rename", rename)
    with pytest.raises(OSError, match="cross-device"):
        corpus_finalize.publish(new, out)
    assert (out / "manifest.json").read_text() == "old"
    monkeypatch.setattr(type(new), "rename", real)
    corpus_finalize.publish(new, out)
    assert (out / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in epath.Path(tmp_path).iterdir()) == ["corpus"]


def test_concurrent_reads_with_few_open_readers_equal_serial_reads(small_corpus):
    """grain reads from several threads: with max_open 1 every read evicts another shard's
    reader, which must never be closed under a read in flight (nor opened twice)."""
    import concurrent.futures
    corpus = Corpus(small_corpus)
    shard_list = corpus.shards("train")
    assert len(shard_list) > 1
    serial = ShardedArrayRecordSource(shard_list)
    n = len(serial)
    want = [serial[i].doc_key for i in range(n)]
    src = ShardedArrayRecordSource(shard_list, max_open=1)
    order = np.random.default_rng(0).integers(0, n, size=(8, 200))

    def reads(row):
        return [src[int(i)].doc_key for i in row]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(reads, order))
    for row, keys in zip(order, got):
        assert keys == [want[int(i)] for i in row]
    assert len(src._readers) <= 1


def test_a_mistyped_build_flag_is_refused_not_handed_to_beam(tmp_path):
    """Flags the tool does not know go to Beam, which only logs "Discarding unparseable
    args": a mistyped --skip-bad-records would build without skipping. Refused before any
    output, naming the flag; real Beam options pass."""
    from cbm_lm.data.corpus_build import BuildConfig, build_corpus, unknown_pipeline_args
    assert unknown_pipeline_args(["--runner", "DirectRunner", "--direct_num_workers=2"]) == []
    assert unknown_pipeline_args(["--skip-bad-records", "--runner=DirectRunner",
                                  "--vocab-size=100"]) == ["--skip-bad-records",
                                                           "--vocab-size=100"]
    # a positional word is no flag's value: a forgotten --jsonl is refused, not dropped
    assert unknown_pipeline_args(["--runner", "DirectRunner", "docs.jsonl"]) == ["docs.jsonl"]
    assert unknown_pipeline_args(["docs.jsonl", "--runner=DirectRunner"]) == ["docs.jsonl"]
    assert unknown_pipeline_args(["--runner", "X", "X"]) == ["X"]
    # after a switch a word is no value either; a typed value (int) is one
    assert unknown_pipeline_args(["--save_main_session", "docs.jsonl"]) == ["docs.jsonl"]
    assert unknown_pipeline_args(["--direct_num_workers", "2", "--experiments", "a"]) == []
    with pytest.raises(ValueError, match="--skip-bad-records"):
        build_corpus(BuildConfig(out=str(tmp_path / "c"), jsonl=["x.jsonl"]),
                     ["--skip-bad-records"])
    assert not (tmp_path / "c").exists()
