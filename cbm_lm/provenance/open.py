"""Opening a workdir's provenance for queries: model + index (or a reference) + mass.

  q = open_query(workdir, model, config, method="provenance" | "bm25" | "gradient")
  answers = q.answer(["some generated text"], k=10)

The model comes from the caller (tools/ restore it with cbm_lm.train.checkpoint;
the library never reads the training loop).
"""

from __future__ import annotations

from cbm_lm.data.corpus import Corpus
from cbm_lm.provenance import build
from cbm_lm.provenance.index import KeyIndex
from cbm_lm.provenance.query import IndexRetriever, ProvenanceQuery

METHODS = ("provenance", "bm25", "gradient")


def make_retriever(method: str, workdir, model, config, corpus: Corpus, index: str | None = None):
    if method == "provenance":
        name = index or build.default_index(workdir)
        return IndexRetriever(KeyIndex.load(build.index_path(workdir, name)))
    if method == "bm25":
        from cbm_lm.provenance.bm25 import BM25Retriever
        return BM25Retriever.open(workdir, corpus)
    if method == "gradient":
        from cbm_lm.provenance.gradient import GradientRetriever
        return GradientRetriever.open(workdir, model, config)
    raise ValueError(f"unknown provenance method {method!r}; expected one of {METHODS}")


def open_query(workdir, model, config, method: str = "provenance", index: str | None = None,
               corpus_dir: str | None = None) -> ProvenanceQuery:
    prov = build.provenance_config(config)
    corpus = Corpus(build.corpus_dir(config, workdir, corpus_dir))
    retriever = make_retriever(method, workdir, model, config, corpus, index)
    return ProvenanceQuery(model, prov, corpus, retriever, build.load_mass(workdir),
                           config.data.seq_len)
