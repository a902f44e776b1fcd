"""An independent concept detector: bag-of-words logistic regression on the corpus's chunk labels.

The steering test must not ask the steered model whether it expressed a
concept, so detection is a separate model: TF-IDF over the words of a chunk's
text, and per concept j a logistic regression (class-balanced, so the 0.5
threshold means "more likely than the base rate")

  P_j(text) = sigmoid(w_j . tfidf(text) + b_j)

trained on (decoded text, label) of training chunks, and scored for AUROC on
the held-out split's chunks, so the report says how far the detector can be
trusted.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from cbm_lm.data.corpus import Corpus


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

    def probability(self, texts: list[str], concept: int) -> np.ndarray:
        """P_concept(text) for each text [N]."""
        return self.models[concept].predict_proba(self.vectorizer.transform(texts))[:, 1]


def train_classifier(corpus: Corpus, concepts: list[int], *, max_chunks: int = 20000,
                     seed: int = 0) -> ConceptClassifier:
    texts, labels = chunk_texts(corpus, "train", max_chunks, seed)
    vec = TfidfVectorizer(lowercase=True, token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]+\b",
                          min_df=2, max_features=50000, sublinear_tf=True)
    x = vec.fit_transform(texts)
    try:
        h_texts, h_labels = chunk_texts(corpus, "heldout", max_chunks, seed)
    except KeyError:                      # a corpus without a held-out split
        h_texts, h_labels = [], []
    hx = vec.transform(h_texts) if h_texts else None
    models, auroc, positives = {}, {}, {}
    for j in concepts:
        y = np.array([j in ids for ids in labels])
        positives[j] = int(y.sum())
        if y.all() or not y.any():
            raise ValueError(f"concept {j}: {positives[j]} of {len(y)} training chunks are "
                             f"positive; a classifier needs both classes")
        models[j] = LogisticRegression(class_weight="balanced", max_iter=500).fit(x, y)
        hy = np.array([j in ids for ids in h_labels])
        auroc[j] = (float(roc_auc_score(hy, models[j].predict_proba(hx)[:, 1]))
                    if hx is not None and 0 < hy.sum() < len(hy) else None)
    return ConceptClassifier(vec, models, auroc, positives)


def trainable_concepts(corpus: Corpus, min_positives: int) -> list[int]:
    """Concepts with at least ``min_positives`` training chunks (from the manifest's counts)."""
    counts = corpus.manifest.get("concepts", {})
    return [i for i in range(len(corpus.concepts))
            if counts.get(corpus.concepts.name(i), {}).get("chunks", 0) >= min_positives]
