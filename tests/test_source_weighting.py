"""data.source_weighting='windows': source weights by hand, and the pipeline drawing by them."""

from __future__ import annotations

import numpy as np
import pytest

from cbm_lm.data.corpus import Corpus
from cbm_lm.data.pipeline import make_pipeline
from cbm_lm.data.source_weighting import token_shares, window_mixture
from data_fixtures import build, small_corpus  # noqa: F401  (fixture)


def test_window_weights_by_hand():
    """Source a: two 1000-token documents (windows of 100: 200 tokens); source b: four
    50-token documents (200). Equal window tokens -> equal token shares; a's documents are
    20x longer, so each is drawn 20x less often: weights 1/21 and 20/21."""
    ids = np.array([0, 0, 1, 1, 1, 1])
    n = np.array([1000, 1000, 50, 50, 50, 50])
    m = window_mixture(ids, n, ["a", "b", "empty"], window=100)
    assert set(m) == {"a", "b"}
    assert m["a"] == pytest.approx(1 / 21) and m["b"] == pytest.approx(20 / 21)
    shares = token_shares(m, ids, n, ["a", "b", "empty"])
    assert shares["a"] == pytest.approx(0.5) and shares["b"] == pytest.approx(0.5)
    # documents no longer than a window: the natural token shares
    short = window_mixture(ids, np.array([80, 80, 50, 50, 50, 50]), ["a", "b"], window=100)
    nat = token_shares(short, ids, np.array([80, 80, 50, 50, 50, 50]), ["a", "b"])
    assert nat["a"] == pytest.approx(160 / 360)


def test_the_pipeline_draws_sources_by_the_window_weights(tmp_path):
    """4 long documents (source "long") and 30 short ones ("short"): naturally most tokens
    are long's; by windows of 16 tokens most are short's. The batches follow the weights."""
    docs = [{"text": f"Dogs bark at night number {i}. " * 30, "source": "long", "id": f"l{i}",
             "concepts": ["topic:dogs"]} for i in range(4)]
    docs += [{"text": f"Filler document number {i}.", "source": "short", "id": f"s{i}",
              "concepts": ["topic:filler"]} for i in range(30)]
    corpus = Corpus(build(tmp_path, docs))
    idx = corpus.source_index("train")
    names = corpus.sources
    natural = np.bincount(idx["source_id"], weights=idx["num_tokens"]) / idx["num_tokens"].sum()
    want = token_shares(window_mixture(idx["source_id"], idx["num_tokens"], names, 16),
                        idx["source_id"], idx["num_tokens"], names)
    assert natural[names.index("long")] > 0.6 and want["long"] < 0.3

    def long_share(**kw):
        it = make_pipeline(str(corpus.dir), "train", 8, 16, seed=0, max_chunk_concepts=4,
                           source_weighting="windows", **kw)
        seen = np.zeros(len(names))
        for _ in range(100):
            s = next(it)["source_ids"]
            seen += np.bincount(s[s >= 0], minlength=len(names))
        return seen[names.index("long")] / seen.sum()

    assert long_share() == pytest.approx(want["long"], abs=0.07)
    # a window longer than every document (data.window_tokens) gives the natural shares
    assert long_share(window_tokens=10_000) == pytest.approx(natural[names.index("long")],
                                                             abs=0.07)


def test_an_explicit_mixture_and_window_weighting_are_refused_together(small_corpus):
    with pytest.raises(ValueError, match="both set the source weights"):
        make_pipeline(str(small_corpus), "train", 2, 64, seed=0, max_chunk_concepts=4,
                      mixture={"pets": 1.0}, source_weighting="windows")
    with pytest.raises(ValueError, match="source_weighting must be one of"):
        make_pipeline(str(small_corpus), "train", 2, 64, seed=0, max_chunk_concepts=4,
                      source_weighting="tokens")
