"""Corpus baselines for judging a language model's loss.

unigram_entropy: H = -sum_v p(v) log p(v) in nats over the real tokens of a
split, the loss of the best context-free predictor; a trained LM's held-out
per-token loss should fall well below it.
"""

from __future__ import annotations

import numpy as np

from cbm_lm.data.corpus import Corpus


def token_counts(data_dir: str, split: str = "train") -> np.ndarray:
    corpus = Corpus(data_dir)
    counts = np.zeros(corpus.tokenizer.vocab_size, np.int64)
    for doc in corpus.documents(split):
        np.add.at(counts, np.asarray(doc.tokens, np.int64), 1)
    return counts


def unigram_entropy(data_dir: str, split: str = "train") -> float:
    counts = token_counts(data_dir, split).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
