"""Opening a workdir's provenance for queries: model + index (or a reference) + mass.

  q = open_query(workdir, model, config, method="provenance" | "bm25")
  answers = q.answer(["some generated text"], k=10)

The model comes from the caller (tools/ restore it with cbm_lm.train.checkpoint;
the library never reads the training loop).
"""

from __future__ import annotations

from cbm_lm.data.corpus import Corpus
from cbm_lm.provenance import build
from cbm_lm.provenance.index import KeyIndex
from cbm_lm.provenance.query import IndexRetriever, ProvenanceQuery

# provenance: the key index; bm25: the lexical baseline; gradient: the projected-gradient
# reference (TRAK/TracIn style, cbm_lm/provenance/gradient.py; built with --gradient).
METHODS = ("provenance", "bm25", "gradient")
# the key indexes a provenance query may read (build.LOGGED, build.REKEYED)
INDEXES = (build.LOGGED, build.REKEYED)


def check_index(method: str, index: str | None) -> None:
    """``index`` is read by method "provenance" only: ValueError for an unknown index, or
    for one given with another method (it would be silently ignored)."""
    if index is not None and index not in INDEXES:
        raise ValueError(f"unknown provenance index {index!r}; expected one of {INDEXES}")
    if index is not None and method != "provenance":
        raise ValueError(f"index={index!r} picks the key index of method 'provenance'; "
                         f"method {method!r} reads none")


def make_retriever(method: str, workdir, model, config, corpus: Corpus, index: str | None = None):
    """``index`` (one of INDEXES, default: the last build's): see check_index."""
    check_index(method, index)
    if method == "provenance":
        name = index or build.default_index(workdir)
        return IndexRetriever(KeyIndex.load(build.index_path(workdir, name)))
    if method == "bm25":
        from cbm_lm.provenance.bm25 import BM25Retriever
        return BM25Retriever.open(workdir, corpus)
    if method == "gradient":
        from cbm_lm.provenance.gradient import GradientRetriever
        return GradientRetriever.open(workdir, model, corpus)
    raise ValueError(f"unknown provenance method {method!r}; expected one of {METHODS}")


def open_query(workdir, model, config, method: str = "provenance", index: str | None = None,
               corpus_dir: str | None = None) -> ProvenanceQuery:
    prov = build.provenance_config(config)
    check_index(method, index)      # before the corpus is opened
    corpus = Corpus(build.corpus_dir(config, workdir, corpus_dir))
    retriever = make_retriever(method, workdir, model, config, corpus, index)
    return ProvenanceQuery(model, prov, corpus, retriever, build.load_mass(workdir),
                           config.data.seq_len, word_mass=build.load_mass(workdir, "word"))


def training_chunk_view(workdir, model, config, k: int = 10, corpus_dir: str | None = None):
    """The training-chunk view of cbm_lm.api.Explainer.explain, or None without an index.

    Returns provenance(explainer, generation, chunk) -> the top-k training chunks of the
    chunk's text, best first: [{"chunk_id", "source", "score", "text"}]. The index and
    model pass are opened on first use.
    """
    try:
        build.default_index(workdir)
    except FileNotFoundError:
        return None
    state = {}

    def provenance(explainer, generation, chunk) -> list[dict]:
        del explainer, generation
        if "query" not in state:
            state["query"] = open_query(workdir, model, config, corpus_dir=corpus_dir)
        if not chunk.text or not chunk.text.strip():
            return []
        parts = state["query"].answer([chunk.text], k=k)[0]["chunks"]
        matches = sorted((m for c in parts for m in c["matches"]), key=lambda m: -m["score"])
        return matches[:k]

    return provenance
