"""Provenance quality on a corpus with planted facts (DESIGN.md section 7).

Each planted fact is stated in exactly one training chunk (its ``chunk_id`` in
CORPUS/planted_facts.json). A query is answered by the retriever; its rank is
the best rank of the true chunk over the query's chunks (1-based; misses
count as rank infinity):

  Recall@k = mean [rank <= k]      MRR = mean 1/rank   (ranks beyond ``depth`` count 0)

over the *verbatim* queries (the fact's statement) and the *paraphrased*
held-out queries. Source accuracy: the argmax of the source distribution of
held-out chunks equals their document's source.

``provenance_metrics`` is the entry point for the eval binary:

    from cbm_lm.provenance.evaluate import provenance_metrics
    m = provenance_metrics(workdir, model, config)
    m["recall@10"], m["mrr"], m["bm25_recall@10"], m["source_accuracy"]
"""

from __future__ import annotations

import json
import time

import numpy as np
from etils import epath

from cbm_lm.data.corpus import Corpus
from cbm_lm.provenance import build
from cbm_lm.provenance.open import make_retriever, open_query

PLANTED_FACTS = "planted_facts.json"


def planted_queries(corpus: Corpus) -> dict[str, tuple[list[str], list[int]]]:
    """{"verbatim": (texts, chunk ids), "paraphrased": (texts, chunk ids)}."""
    path = epath.Path(corpus.dir) / PLANTED_FACTS
    if not path.exists():
        raise FileNotFoundError(f"{path}: no planted facts; provenance recall needs a corpus "
                                "built with them (tools/build_demo_corpus.py)")
    raw = json.loads(path.read_text())
    facts = raw["facts"] if isinstance(raw, dict) else raw
    out = {"verbatim": ([], []), "paraphrased": ([], [])}
    for f in facts:
        if "chunk_id" not in f:
            raise ValueError(f"{path}: fact {f.get('id')} has no chunk_id")
        out["verbatim"][0].append(f["statement"])
        out["verbatim"][1].append(int(f["chunk_id"]))
        for q in f.get("queries", []):
            out["paraphrased"][0].append(q if isinstance(q, str) else q["text"])
            out["paraphrased"][1].append(int(f["chunk_id"]))
    return out


def ranks(query, retriever, texts: list[str], answers: list[int], depth: int = 100
          ) -> np.ndarray:
    """Rank of each answer (np.inf if not within ``depth``) for ``texts`` under ``retriever``."""
    chunks, per_text = query.encode(texts)
    _, ids = retriever.search(chunks, depth)
    out = np.full(len(texts), np.inf)
    for i, (rows, want) in enumerate(zip(per_text, answers)):
        for r in rows:
            hit = np.nonzero(ids[r] == want)[0]
            if len(hit):
                out[i] = min(out[i], hit[0] + 1)
    return out


def rank_summary(r: np.ndarray) -> dict[str, float]:
    return {"recall@1": float(np.mean(r <= 1)), "recall@10": float(np.mean(r <= 10)),
            "mrr": float(np.mean(np.where(np.isfinite(r), 1.0 / r, 0.0))), "n": int(len(r))}


def source_accuracy(query, corpus: Corpus, split: str = "heldout", max_chunks: int = 1000,
                    seed: int = 0) -> dict[str, float]:
    """Argmax-source accuracy over (a seeded sample of) the chunks of ``split``."""
    tok = corpus.tokenizer
    texts, truth = [], []
    for rec in corpus.documents(split):
        b = rec.chunk_bounds
        for j in range(rec.num_chunks):
            t = tok.decode(rec.tokens[b[j]:b[j + 1]])
            if t.strip():
                texts.append(t)
                truth.append(rec.source_id)
    if not texts:
        raise ValueError(f"{corpus.dir}: split {split!r} has no chunks with text")
    pick = np.random.default_rng(seed).permutation(len(texts))[:max_chunks]
    texts, truth = [texts[i] for i in pick], np.asarray(truth)[pick]
    chunks, per_text = query.encode(texts)
    # a chunk whose text re-splits into several query chunks: their mean distribution
    pred = np.asarray([chunks.sources[rows].mean(0).argmax() for rows in per_text])
    return {"source_accuracy": float(np.mean(pred == truth)), "source_n": int(len(texts))}


def evaluate_methods(workdir, model, config, methods=("provenance", "bm25"),
                     indexes=(None,), source_chunks: int = 1000, log=print) -> dict:
    """{method[/index]: {verbatim: summary, paraphrased: summary, query_seconds}} + sources."""
    q = open_query(workdir, model, config, method="provenance", index=indexes[0])
    planted = planted_queries(q.corpus)
    results = {}
    for method in methods:
        for index in (indexes if method == "provenance" else (None,)):
            name = method if index is None else f"{method}/{index}"
            # each key index is queried with keys made as its own were (width, lexical
            # features: a logged and a re-keyed index differ); the others take the first's
            qi = q if method != "provenance" or index == indexes[0] else open_query(
                workdir, model, config, method="provenance", index=index)
            retriever = (qi.retriever if method == "provenance"
                         else make_retriever(method, workdir, model, config, q.corpus, index))
            res = {}
            t0 = time.time()
            for kind, (texts, answers) in planted.items():
                res[kind] = rank_summary(ranks(qi, retriever, texts, answers))
            res["seconds"] = time.time() - t0
            results[name] = res
            log(f"{name}: " + "  ".join(
                f"{kind} R@1 {res[kind]['recall@1']:.3f} R@10 {res[kind]['recall@10']:.3f} "
                f"MRR {res[kind]['mrr']:.3f}" for kind in planted))
    results["sources"] = source_accuracy(q, q.corpus, max_chunks=source_chunks)
    for name in build.MASS_KINDS:      # each concept x source mass the build kept, side by side
        mass = build.load_mass(workdir, name)
        if mass is not None:
            q.mass = mass
            results[f"sources/{name}"] = source_accuracy(q, q.corpus, max_chunks=source_chunks)
    return results


def provenance_metrics(workdir, model, config, source_chunks: int = 500) -> dict[str, float]:
    """The eval binary's figures: paraphrased-query recall@10 / MRR of the provenance index,
    BM25's recall@10 on the same queries, and held-out source accuracy. Needs the index
    (tools/build_provenance_index.py) and CORPUS/planted_facts.json."""
    r = evaluate_methods(workdir, model, config, ("provenance", "bm25"),
                         source_chunks=source_chunks, log=lambda m: None)
    return {"recall@10": r["provenance"]["paraphrased"]["recall@10"],
            "mrr": r["provenance"]["paraphrased"]["mrr"],
            "bm25_recall@10": r["bm25"]["paraphrased"]["recall@10"],
            "source_accuracy": r["sources"]["source_accuracy"]}
