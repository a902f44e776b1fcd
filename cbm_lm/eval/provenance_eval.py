"""Provenance figures and panels of the report, from the workdir's provenance index.

  provenance_recall_at_10, provenance_mrr   paraphrased planted-fact queries answered by the
                                            provenance index (the fact's single source chunk
                                            within the top 10; mean reciprocal rank)
  bm25_recall_at_10                         the same queries answered by BM25 (lexical baseline)
  source_accuracy                           held-out chunks whose most likely training source
                                            is their own

all computed by cbm_lm.provenance.evaluate. A run without an index gets one
built first (cbm_lm.provenance.build: re-keys every training chunk with the
checkpoint into WORKDIR/provenance, as tools/build_provenance_index.py does).
A corpus without planted facts cannot be scored and says so.
"""

from __future__ import annotations

import os

from etils import epath

from cbm_lm.eval.report import MetricUnavailable
from cbm_lm.provenance import build
from cbm_lm.provenance.evaluate import PLANTED_FACTS, provenance_metrics
from cbm_lm.provenance.open import open_query

KEYS = {"provenance_recall_at_10": "recall@10", "provenance_mrr": "mrr",
        "bm25_recall_at_10": "bm25_recall@10", "source_accuracy": "source_accuracy"}


class ProvenanceUnavailable(MetricUnavailable):
    """The run or corpus cannot support the provenance figures (reported, not fatal)."""


def _config_for(config, corpus_dir: str):
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.data.dir = os.fspath(corpus_dir)
    return cfg


def provenance_eval(workdir: str, model, config, corpus, step: int, *, source_chunks: int = 500,
                    log=print):
    """(metrics {report key: value}, answer(text) -> panel dict) for a workdir."""
    if not (epath.Path(corpus.dir) / PLANTED_FACTS).exists():
        raise ProvenanceUnavailable(f"{corpus.dir} has no {PLANTED_FACTS} (planted facts with "
                                    f"known source chunks) to score provenance against")
    cfg = _config_for(config, corpus.dir)
    # An index of this checkpoint (and corpus) is used as it is, however it was keyed; any
    # other (none, or one left by an earlier step) is built for this step, so the figures
    # never come from another checkpoint's keys.
    if build.current_index(workdir, step, corpus) is None:
        log(f"no provenance index of step {step} in {workdir}: building one")
        build.build_index(workdir, model, cfg, step, corpus=corpus, log=log)
    m = provenance_metrics(workdir, model, cfg, source_chunks=source_chunks)
    query = open_query(workdir, model, cfg, corpus_dir=os.fspath(corpus.dir))

    def answer(text: str, k: int = 5) -> dict:
        chunks = query.answer([text], k=k)[0]["chunks"]
        matches = sorted((mm for c in chunks for mm in c["matches"]), key=lambda x: -x["score"])
        sources = {}
        for c in chunks:
            for name, p in c["sources"].items():
                sources[name] = sources.get(name, 0.0) + p / max(len(chunks), 1)
        return {"snippets": [{"text": x["text"], "source": x["source"], "score": x["score"]}
                             for x in matches[:k]],
                "sources": dict(sorted(sources.items(), key=lambda kv: -kv[1]))}

    return {key: m[src] for key, src in KEYS.items()}, answer
