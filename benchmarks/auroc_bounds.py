"""What bounds a trained run's held-out chunk AUROC: the score, the head, or the text.

    python benchmarks/auroc_bounds.py RUN [OUT.json]

Eval only: restores RUN's newest checkpoint, draws the attribution-eval binary's 256
held-out windows (seed 0) and, for every concept counted by the headline (>= 5 positive
chunks), computes the chunk AUROC of

  sum        S_cj = sum softplus(z_tj) over the chunk's predicting positions (the headline)
  mean       S_cj / positions (length-normalized: chunks run from 2 to 64 positions)
  max        max_t softplus(z_tj)
  tfidf      the steering eval's independent detector: TF-IDF logistic regression trained
             on 20000 training chunks (cbm_lm.eval.concept_classifier), on the chunks' text
  probe_doc  a class-balanced logistic probe on the chunk's mean backbone output h,
             5-fold cross-validated on the held-out chunks with folds grouped by document
             (a fold never trains on another chunk of a test chunk's document); only for
             concepts whose positives lie in >= 2 documents (None otherwise), and the
             ``multi_document`` summary compares every score on those concepts alone

and prints the macro and per-group means, plus how many held-out documents carry each
concept's positives. Reading: sum < mean is the length confound of the score; head
(mean) < probe_doc means the head does not read what a linear map of h already holds;
tfidf bounds what the words of the text say about the label.
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.model_selection import StratifiedGroupKFold  # noqa: E402

from cbm_lm.eval.concept_classifier import train_classifier  # noqa: E402
from cbm_lm.eval.concept_detection import position_softplus, predicted_chunk_of  # noqa: E402
from cbm_lm.eval.forward import map_rows  # noqa: E402
from cbm_lm.eval.heldout import heldout_windows  # noqa: E402
from cbm_lm.eval.target import load_target  # noqa: E402

KEYS = ("sum", "mean", "max", "tfidf", "probe_doc")


@nnx.jit
def _hidden(model, tokens, positions, segment_ids):
    return {"h": model(tokens, positions=positions, segment_ids=segment_ids).hidden}


def _probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    out = np.zeros(len(y))
    for tr, te in StratifiedGroupKFold(5, shuffle=True, random_state=0).split(x, y, groups):
        if 0 < y[tr].sum() < len(tr):
            out[te] = LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000
                                         ).fit(x[tr], y[tr]).decision_function(x[te])
    return out


def main(workdir: str, out: str | None = None, num_examples: int = 256, seed: int = 0) -> None:
    t = load_target(workdir=workdir)
    model, corpus = t.model, t.corpus
    n_c = len(corpus.concepts)
    seq_len = min(int(t.config.data.seq_len), model.config.max_seq_len)
    w = heldout_windows(corpus, num_examples, seq_len, seed)
    sp = position_softplus(model, w, n_c)                                       # [N,T,C]
    h = map_rows(lambda r: _hidden(model, jnp.asarray(w.tokens[r]), jnp.asarray(w.positions[r]),
                                   jnp.asarray(w.segment_ids[r])), w.num_rows, 8)["h"]
    target = predicted_chunk_of(w.chunk_of, model.config.objective)
    real, n_ch = target >= 0, len(w.chunks)
    cnt = np.bincount(target[real], minlength=n_ch).astype(np.float64)
    s_sum = np.zeros((n_ch, n_c))
    np.add.at(s_sum, target[real], sp[real])
    s_max = np.full((n_ch, n_c), -np.inf)
    np.maximum.at(s_max, target[real], sp[real])
    h_mean = np.zeros((n_ch, h.shape[-1]))
    np.add.at(h_mean, target[real], h[real])
    ok = cnt > 0
    h_mean = h_mean[ok] / cnt[ok, None]
    h_mean = (h_mean - h_mean.mean(0)) / (h_mean.std(0) + 1e-6)
    scores = {"sum": s_sum[ok], "mean": s_sum[ok] / cnt[ok, None], "max": s_max[ok]}
    labels = w.labels(n_c)[ok]
    docs = np.array([c.row for c in w.chunks])[ok]
    ids = [j for j in range(n_c) if 5 <= labels[:, j].sum() < len(labels)]
    texts = [corpus.tokenizer.decode(w.tokens[c.row, c.start:c.end])
             for c, keep in zip(w.chunks, ok) if keep]
    clf = train_classifier(corpus, ids, max_chunks=20000, seed=seed)
    rows = []
    for j in ids:
        y = labels[:, j]
        r = {"id": j, "name": corpus.concepts.name(j), "positives": int(y.sum()),
             "documents": len(set(docs[y].tolist()))}
        r.update({k: float(roc_auc_score(y, s[:, j])) for k, s in scores.items()})
        r["tfidf"] = float(roc_auc_score(y, clf.probability(texts, j)))
        r["probe_doc"] = (float(roc_auc_score(y, _probe(h_mean, y, docs)))
                          if r["documents"] >= 2 else None)
        rows.append(r)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["name"].split(":")[0], []).append(r)
    def mean(rs, k):
        v = [r[k] for r in rs if r[k] is not None]
        return round(float(np.mean(v)), 3) if v else None

    multi = [r for r in rows if r["documents"] >= 2]
    summary = {"macro": {k: mean(rows, k) for k in KEYS}, "concepts": len(rows),
               "multi_document": dict(concepts=len(multi), **{k: mean(multi, k) for k in KEYS}),
               "by_group": {g: dict(concepts=len(rs), documents=mean(rs, "documents"),
                                    **{k: mean(rs, k) for k in KEYS})
                            for g, rs in sorted(groups.items())}}
    print(json.dumps(summary, indent=1))
    if out:
        with open(out, "w") as f:
            json.dump({"summary": summary, "per_concept": rows}, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
