"""An independent concept detector: bag-of-words logistic regression on the corpus's chunk labels.

The steering test must not ask the steered model whether it expressed a
concept, so detection is a separate model: TF-IDF over the words of a chunk's
text, and per concept j a logistic regression (class-balanced, so the 0.5
threshold means "more likely than the base rate")

  P_j(text) = sigmoid(w_j . tfidf(text) + b_j)

trained on (decoded text, label) of a seeded sample of at most ``max_chunks``
training chunks, and scored for AUROC on the held-out split's chunks, so the
report says how far the detector can be trusted. Which concepts can be trained
is counted on that same sample (``trainable_concepts``), never on the
manifest's per-concept counts, which add the held-out split; a concept whose
sample is all one class is skipped (``ConceptClassifier.skipped``), not fatal.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from cbm_lm.data.corpus import Corpus
from cbm_lm.eval.report import MetricUnavailable


def chunk_texts(corpus: Corpus, split: str, max_chunks: int, seed: int
                ) -> tuple[list[str], list[tuple[int, ...]]]:
    """Decoded text and concept ids of up to ``max_chunks`` chunks of a split (seeded sample)."""
    tok = corpus.tokenizer
    spans = []
    for doc in corpus.documents(split):
        for c in range(doc.num_chunks):
            ids = tuple(int(j) for j in doc.chunk_concepts[c] if j >= 0)
            spans.append((doc.tokens[doc.chunk_bounds[c]:doc.chunk_bounds[c + 1]], ids))
    if len(spans) > max_chunks:
        keep = np.random.default_rng(seed).choice(len(spans), max_chunks, replace=False)
        spans = [spans[i] for i in sorted(keep)]
    return [tok.decode(t) for t, _ in spans], [ids for _, ids in spans]


@dataclasses.dataclass
class ConceptClassifier:
    vectorizer: TfidfVectorizer
    models: dict[int, LogisticRegression]
    heldout_auroc: dict[int, float | None]
    train_positives: dict[int, int]
    skipped: dict[int, str] = dataclasses.field(default_factory=dict)   # concept -> why

    def probability(self, texts: list[str], concept: int) -> np.ndarray:
        """P_concept(text) for each text [N]."""
        if concept not in self.models:
            why = self.skipped.get(concept, "it was not among the concepts trained")
            raise KeyError(f"concept {concept}: no detector ({why})")
        return self.models[concept].predict_proba(self.vectorizer.transform(texts))[:, 1]


def sample_positives(labels: list[tuple[int, ...]]) -> collections.Counter:
    """{concept id: chunks of ``labels`` (chunk_texts' concept ids) that carry it}."""
    return collections.Counter(j for ids in labels for j in set(ids))


def trainable_concepts(labels: list[tuple[int, ...]], min_positives: int) -> list[int]:
    """Concepts with at least ``min_positives`` positive chunks, and one negative, among
    ``labels``: the very training chunks a classifier is fit on (chunk_texts' sample of the
    train split; the manifest's counts add the held-out split and ignore the sample)."""
    return sorted(j for j, n in sample_positives(labels).items()
                  if n >= min_positives and n < len(labels))


def train_classifier(corpus: Corpus, concepts: list[int], *, max_chunks: int = 20000,
                     seed: int = 0, sample: tuple[list[str], list] | None = None
                     ) -> ConceptClassifier:
    """One detector per concept, fit on ``sample`` (default chunk_texts(corpus, "train",
    max_chunks, seed)). A concept whose training chunks are all positive or all negative
    gets no detector: it is left out of ``models`` with the reason in ``skipped``. Raises
    MetricUnavailable when the sample has no chunk or no word to fit on."""
    texts, labels = sample if sample is not None else chunk_texts(corpus, "train", max_chunks,
                                                                  seed)
    if not texts:
        raise MetricUnavailable(f"{corpus.dir}: the 'train' split has no chunk to train the "
                                f"bag-of-words detector on")
    vec = TfidfVectorizer(lowercase=True, token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]+\b",
                          min_df=2, max_features=50000, sublinear_tf=True)
    try:
        x = vec.fit_transform(texts)
    except ValueError as e:               # no word in 2+ chunks: an empty vocabulary
        raise MetricUnavailable(f"{corpus.dir}: the {len(texts)} sampled training chunks give "
                                f"the bag-of-words detector no vocabulary ({e})") from e
    try:
        h_texts, h_labels = chunk_texts(corpus, "heldout", max_chunks, seed)
    except KeyError:                      # a corpus without a held-out split
        h_texts, h_labels = [], []
    hx = vec.transform(h_texts) if h_texts else None
    models, auroc, positives, skipped = {}, {}, {}, {}
    for j in concepts:
        y = np.array([j in ids for ids in labels])
        positives[j] = int(y.sum())
        if y.all() or not y.any():
            skipped[j] = (f"{positives[j]} of the {len(y)} sampled training chunks are "
                          f"positive; a classifier needs both classes")
            continue
        models[j] = LogisticRegression(class_weight="balanced", max_iter=500).fit(x, y)
        hy = np.array([j in ids for ids in h_labels])
        auroc[j] = (float(roc_auc_score(hy, models[j].predict_proba(hx)[:, 1]))
                    if hx is not None and 0 < hy.sum() < len(hy) else None)
    return ConceptClassifier(vec, models, auroc, positives, skipped)
