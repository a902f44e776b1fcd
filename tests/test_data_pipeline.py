"""The grain pipeline: round trip, labels per token, packing, state, processes, mixture."""

import numpy as np
import pytest

from cbm_lm.data.corpus import Corpus
from cbm_lm.data.pipeline import make_pipeline

from data_fixtures import CHUNKED_SPANS, CHUNKED_TEXT, fixture_docs
from data_fixtures import small_corpus  # noqa: F401 (pytest fixture)

KEYS = ("tokens", "segment_ids", "positions", "concept_ids", "chunk_ids", "chunk_segment_ids",
        "source_ids")


def _segments(batch):
    """Yields (row, segment id, mask) of every document segment in a batch."""
    for r in range(batch["tokens"].shape[0]):
        for s in np.unique(batch["segment_ids"][r]):
            if s:
                yield r, int(s), batch["segment_ids"][r] == s


def _epoch(corpus, seq_len=128, **kw):
    kw = dict(dict(seed=0, num_epochs=1, drop_remainder=False, max_chunk_concepts=4), **kw)
    return list(make_pipeline(str(corpus), "train", 4, seq_len, **kw))


def test_batch_contract(small_corpus):
    b = next(make_pipeline(str(small_corpus), "train", 4, 64, seed=3, max_chunk_concepts=4))
    want = {"tokens": (np.int32, (4, 64)), "segment_ids": (np.int32, (4, 64)),
            "positions": (np.int32, (4, 64)), "concept_ids": (np.int32, (4, 64, 4)),
            "chunk_ids": (np.int64, (4, 64)), "chunk_segment_ids": (np.int32, (4, 64)),
            "source_ids": (np.int32, (4, 64))}
    assert {k: (v.dtype, v.shape) for k, v in b.items()} == want
    pad = b["segment_ids"] == 0
    assert np.all(b["chunk_ids"][pad] == -1) and np.all(b["source_ids"][pad] == -1)
    assert np.all(b["concept_ids"][pad] == -1) and np.all(b["chunk_segment_ids"][pad] == 0)
    assert np.all(b["tokens"][pad] == Corpus(small_corpus).tokenizer.pad_id)


def test_round_trip_text_and_one_document_per_segment(small_corpus):
    c = Corpus(small_corpus)
    texts, docs_of_chunk = [], {}
    for rec in c.documents("train"):
        for cid in rec.chunk_ids:
            docs_of_chunk[int(cid)] = rec.doc_id
    for b in _epoch(small_corpus):
        for r, s, m in _segments(b):
            texts.append(c.tokenizer.decode(b["tokens"][r][m]))
            # positions restart at 0 and count up inside each document
            assert b["positions"][r][m].tolist() == list(range(m.sum()))
            # a segment never crosses documents (all its chunks belong to one doc)
            assert len({docs_of_chunk[int(x)] for x in b["chunk_ids"][r][m]}) == 1
            assert np.all(np.diff(np.nonzero(m)[0]) == 1)  # contiguous
    assert sorted(texts) == sorted(d["text"] for d in fixture_docs())


def test_labels_broadcast_to_exactly_their_chunk_tokens(small_corpus):
    c = Corpus(small_corpus)
    tok, vocab = c.tokenizer, c.concepts
    found = False
    for b in _epoch(small_corpus):
        for r, s, m in _segments(b):
            toks = b["tokens"][r][m]
            if tok.decode(toks) != CHUNKED_TEXT:
                continue
            found = True
            labels = b["concept_ids"][r][m]
            # rebuild each concept's text from the tokens carrying it
            for start, end, names in CHUNKED_SPANS:
                cid = vocab.id(names[0])
                has = np.any(labels == cid, axis=1)
                assert tok.decode(toks[has]) == CHUNKED_TEXT[start:end]
            tail = np.all(labels == -1, axis=1)
            assert tok.decode(toks[tail]) == CHUNKED_TEXT[46:]
            # chunk segments: consecutive numbering, one chunk id per chunk segment
            cs = b["chunk_segment_ids"][r][m]
            for v in np.unique(cs):
                assert len(np.unique(b["chunk_ids"][r][m][cs == v])) == 1
    assert found


def test_state_restore_reproduces_next_batches(small_corpus):
    it = make_pipeline(str(small_corpus), "train", 2, 32, seed=7, max_chunk_concepts=4)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(10)]
    it2 = make_pipeline(str(small_corpus), "train", 2, 32, seed=7, max_chunk_concepts=4)
    it2.set_state(state)
    for a, b in zip(expected, [next(it2) for _ in range(10)]):
        for k in KEYS:
            np.testing.assert_array_equal(a[k], b[k])


def test_two_processes_see_disjoint_documents_covering_the_split(small_corpus):
    def doc_chunks(pi):
        seen = set()
        for b in _epoch(small_corpus, process_index=pi, process_count=2):
            for r, s, m in _segments(b):
                seen.add(int(b["chunk_ids"][r][m][0]))  # first chunk id names the document
        return seen
    a, b = doc_chunks(0), doc_chunks(1)
    all_docs = {int(r.chunk_ids[0]) for r in Corpus(small_corpus).documents("train")}
    assert a and b and not (a & b) and (a | b) == all_docs


def test_long_documents_split_into_pieces_at_chunk_bounds(small_corpus):
    c = Corpus(small_corpus)
    longest = max(c.documents("train"), key=lambda r: len(r.tokens))
    T = 24
    assert len(longest.tokens) > T
    pieces = []
    for b in _epoch(small_corpus, seq_len=T):
        for r, s, m in _segments(b):
            ids = set(b["chunk_ids"][r][m].tolist())
            if ids <= set(longest.chunk_ids.tolist()):
                pieces.append(b["tokens"][r][m])
    assert sum(len(p) for p in pieces) == len(longest.tokens)
    assert all(len(p) <= T for p in pieces)


def test_mixture_weights_select_sources(small_corpus):
    c = Corpus(small_corpus)
    code, pets = c.sources.index("code"), c.sources.index("pets")
    it = make_pipeline(str(small_corpus), "train", 2, 64, seed=0, max_chunk_concepts=4,
                       mixture={"code": 1.0, "pets": 3.0, "filler": 0.0})
    counts = {code: 0, pets: 0}
    for _ in range(40):
        b = next(it)
        for r, s, m in _segments(b):
            counts[int(b["source_ids"][r][m][0])] += 1  # KeyError if filler leaks in
    assert counts[pets] > 2 * counts[code] > 0
    with pytest.raises(ValueError, match="not in .*sources.json"):
        make_pipeline(str(small_corpus), "train", 2, 64, mixture={"nope": 1.0})


def test_multiprocess_workers_and_state(small_corpus):
    kw = dict(seed=1, max_chunk_concepts=4, worker_count=2)
    it = make_pipeline(str(small_corpus), "train", 2, 32, **kw)
    next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    it.close()
    it2 = make_pipeline(str(small_corpus), "train", 2, 32, **kw)
    it2.set_state(state)
    got = [next(it2) for _ in range(3)]
    it2.close()
    for a, b in zip(want, got):
        for k in KEYS:
            np.testing.assert_array_equal(a[k], b[k])


def test_eval_batches_cover_every_source_whatever_the_training_mixture(small_corpus):
    """The training mixture (here one source weighted 0) must not decide what eval scores:
    a mixture stops at its first exhausted source, so eval would see a weighted subset."""
    from cbm_lm.default_config import base_config
    from cbm_lm.train.data_feed import process_pipeline
    c = base_config()
    c.data.dir, c.data.seq_len, c.data.max_chunk_concepts = str(small_corpus), 64, 4
    c.data.mixture = {"code": 1.0, "pets": 3.0, "filler": 0.0}
    seen = set()
    for b in process_pipeline(c, "train", 2, eval_mode=True):
        seen |= {int(b["source_ids"][r][m][0]) for r, _, m in _segments(b)}
    assert seen == set(range(len(Corpus(small_corpus).sources)))


def test_more_processes_than_documents_is_refused_naming_the_corpus_and_the_way_out(small_corpus):
    n = len(list(Corpus(small_corpus).documents("train")))
    with pytest.raises(ValueError, match=r"process_split=rows") as e:
        next(make_pipeline(str(small_corpus), "train", 1, 64, seed=0, max_chunk_concepts=4,
                           process_index=n, process_count=n + 1))
    assert str(small_corpus) in str(e.value)


def test_a_mixture_source_short_of_processes_is_named_with_its_own_count(small_corpus):
    corpus = Corpus(small_corpus)
    src = corpus.source_index("train")["source_id"]
    n_pets = int((src == corpus.sources.index("pets")).sum())
    with pytest.raises(ValueError, match=rf"mixture source 'pets' in split 'train' "
                                         rf"\({n_pets} in all"):
        next(make_pipeline(str(small_corpus), "train", 1, 64, seed=0, max_chunk_concepts=4,
                           mixture={"pets": 1.0}, process_index=n_pets,
                           process_count=n_pets + 1))
