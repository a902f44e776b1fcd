"""What bounds a trained run's held-out chunk AUROC: the score, the head, the backbone, or the text.

    python benchmarks/auroc_bounds.py RUN [OUT.json]

Eval only: restores RUN's newest checkpoint, draws the attribution-eval binary's 256
held-out windows (seed 0) and, for every concept counted by the headline (>= 5 positive
chunks), computes the chunk AUROC of

  sum          S_cj = sum softplus(z_tj) over the chunk's predicting positions (the headline)
  mean         S_cj / positions (length-normalized: chunks run from 2 to 64 positions)
  max          max_t softplus(z_tj)
  probe_train  the best linear read-out of the backbone: a class-balanced logistic
               regression on the chunk's mean backbone output h, trained on the chunks of
               3000 training-split windows and scored on the held-out chunks
  probe_doc    the same probe 5-fold cross-validated on the held-out chunks, folds grouped
               by document; only for concepts whose positives lie in >= 2 documents
  tfidf        the steering eval's independent detector: word TF-IDF logistic regression
               trained on 20000 training chunks (cbm_lm.eval.concept_classifier)
  tfidf_char   character 2-4-gram TF-IDF logistic regression trained on every training
               chunk, on the chunk's text alone
  tfidf_prefix the same on the document's text from its start to the chunk's end (what a
               causal model's last position of the chunk has read), trained likewise on
               the training chunks' prefixes of at most seq_len tokens

and prints the macro and per-group means, plus how many held-out documents carry each
concept's positives; the ``multi_document`` summary compares every score on the concepts
with positives in >= 2 documents. Reading: sum < mean is the length confound of the
score; head (mean) < probe_train means the head does not read what h holds; probe_train <
tfidf_prefix means the text says more than the backbone has learned to encode.
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from sklearn.feature_extraction.text import TfidfVectorizer  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.model_selection import StratifiedGroupKFold  # noqa: E402

from cbm_lm.eval.concept_classifier import train_classifier  # noqa: E402
from cbm_lm.eval.concept_detection import (chunk_positions, chunk_scores,  # noqa: E402
                                           position_softplus, predicted_chunk_of)
from cbm_lm.eval.forward import map_rows  # noqa: E402
from cbm_lm.eval.heldout import heldout_windows  # noqa: E402
from cbm_lm.eval.target import load_target  # noqa: E402

KEYS = ("sum", "mean", "max", "probe_train", "probe_doc", "tfidf", "tfidf_char", "tfidf_prefix")
TRAIN_WINDOWS = 3000


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


def _chunk_mean_h(model, w) -> tuple[np.ndarray, np.ndarray]:
    """([n_chunks, D] mean backbone output over each chunk's predicting positions, [n_chunks]
    whether the chunk has any)."""
    h = map_rows(lambda r: _hidden(model, jnp.asarray(w.tokens[r]), jnp.asarray(w.positions[r]),
                                   jnp.asarray(w.segment_ids[r])), w.num_rows, 8)["h"]
    target = predicted_chunk_of(w.chunk_of, model.config.objective)
    real = target >= 0
    cnt = chunk_positions(w, model.config.objective)
    total = np.zeros((len(w.chunks), h.shape[-1]))
    np.add.at(total, target[real], h[real])
    return total / np.maximum(cnt, 1)[:, None], cnt > 0


def _training_chunks(corpus, seq_len: int, prefix: bool) -> tuple[list[str], np.ndarray]:
    """Decoded text of every training chunk (or of the <= seq_len tokens ending with it) and
    its labels [n, n_concepts]."""
    tok, texts, labels = corpus.tokenizer, [], []
    for doc in corpus.documents("train"):
        for c in range(doc.num_chunks):
            start, end = int(doc.chunk_bounds[c]), int(doc.chunk_bounds[c + 1])
            texts.append(tok.decode(doc.tokens[max(0, end - seq_len) if prefix else start:end]))
            labels.append([int(j) for j in doc.chunk_concepts[c] if j >= 0])
    y = np.zeros((len(texts), len(corpus.concepts)), bool)
    for i, ids in enumerate(labels):
        y[i, ids] = True
    return texts, y


def _char_detector(train_texts, train_y, test_texts, ids) -> dict[int, np.ndarray]:
    """Per concept id: decision values of a class-balanced logistic regression on character
    2-4-gram TF-IDF (fit on the training texts) for the test texts."""
    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), lowercase=True, min_df=2,
                          max_features=100000, sublinear_tf=True)
    x, xt = vec.fit_transform(train_texts), vec.transform(test_texts)
    return {j: LogisticRegression(C=4.0, class_weight="balanced", max_iter=2000)
            .fit(x, train_y[:, j]).decision_function(xt)
            for j in ids if train_y[:, j].any()}


def main(workdir: str, out: str | None = None, num_examples: int = 256, seed: int = 0) -> None:
    t = load_target(workdir=workdir)
    model, corpus = t.model, t.corpus
    n_c = len(corpus.concepts)
    seq_len = min(int(t.config.data.seq_len), model.config.max_seq_len)
    w = heldout_windows(corpus, num_examples, seq_len, seed)
    sp = position_softplus(model, w, n_c)                                       # [N,T,C]
    target = predicted_chunk_of(w.chunk_of, model.config.objective)
    real, n_ch = target >= 0, len(w.chunks)
    cnt = chunk_positions(w, model.config.objective)
    s_sum = chunk_scores(model, w, n_c, sp=sp)                                 # the headline S
    s_max = np.full((n_ch, n_c), -np.inf)
    np.maximum.at(s_max, target[real], sp[real])
    h_mean, ok = _chunk_mean_h(model, w)
    h_mean = h_mean[ok]
    scores = {"sum": s_sum[ok], "mean": s_sum[ok] / cnt[ok, None], "max": s_max[ok]}
    labels = w.labels(n_c)[ok]
    docs = np.array([c.row for c in w.chunks])[ok]
    ids = [j for j in range(n_c) if 5 <= labels[:, j].sum() < len(labels)]
    kept = [c for c, keep in zip(w.chunks, ok) if keep]
    texts = [corpus.tokenizer.decode(w.tokens[c.row, c.start:c.end]) for c in kept]
    prefixes = [corpus.tokenizer.decode(w.tokens[c.row, :c.end]) for c in kept]

    # the backbone's best linear read-out, trained on training-split chunks
    w_train = heldout_windows(corpus, TRAIN_WINDOWS, seq_len, seed + 1, split="train")
    h_train, ok_train = _chunk_mean_h(model, w_train)
    y_train = w_train.labels(n_c)[ok_train]
    mu, sd = h_train[ok_train].mean(0), h_train[ok_train].std(0) + 1e-6
    x_train, x_test = (h_train[ok_train] - mu) / sd, (h_mean - mu) / sd
    probe_train = {j: LogisticRegression(C=1.0, class_weight="balanced", max_iter=3000)
                   .fit(x_train, y_train[:, j]).decision_function(x_test)
                   for j in ids if y_train[:, j].any()}
    h_std = (h_mean - h_mean.mean(0)) / (h_mean.std(0) + 1e-6)

    clf = train_classifier(corpus, ids, max_chunks=20000, seed=seed)
    char_chunk = _char_detector(*_training_chunks(corpus, seq_len, prefix=False), texts, ids)
    char_prefix = _char_detector(*_training_chunks(corpus, seq_len, prefix=True), prefixes, ids)
    rows = []
    for j in ids:
        y = labels[:, j]
        r = {"id": j, "name": corpus.concepts.name(j), "positives": int(y.sum()),
             "documents": len(set(docs[y].tolist()))}
        r.update({k: float(roc_auc_score(y, s[:, j])) for k, s in scores.items()})
        for key, found in (("probe_train", probe_train), ("tfidf_char", char_chunk),
                           ("tfidf_prefix", char_prefix)):
            r[key] = float(roc_auc_score(y, found[j])) if j in found else None
        r["tfidf"] = (float(roc_auc_score(y, clf.probability(texts, j)))
                      if j in clf.models else None)     # no detector: one class in its sample
        r["probe_doc"] = (float(roc_auc_score(y, _probe(h_std, y, docs)))
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
