"""Source weights that give each source the tokens its documents' first windows hold.

The natural token stream lets long documents decide what the model sees: on the demo
corpus Shakespeare's plays are 48% of the training tokens in 11% of the documents, so
its genre/play concepts are learned first and the short WordNet glosses and fortunes
(whose lexfile and topic concepts are most of the held-out concept AUROC) get a quarter
of the steps each. A document-level view (the attribution eval reads the first
``seq_len`` tokens of held-out documents) weighs documents, not tokens. With
``data.source_weighting = "windows"`` each source s gets the token share that one
window of W tokens per document would give it,

    share_s = sum_{d in s} min(n_d, W) / sum_d min(n_d, W)
    (W = data.window_tokens, or data.seq_len when 0)

and since the pipeline mixes whole documents (grain.MapDataset.mix draws documents by
weight), its per-document weight divides that share by the source's mean length
L_s = (sum_{d in s} n_d) / D_s:

    w_s ∝ share_s / L_s

Long documents are still read whole when drawn, only less often.
"""

from __future__ import annotations

import numpy as np

WEIGHTINGS = ("natural", "windows")


def _per_source(source_ids: np.ndarray, num_tokens: np.ndarray, n_sources: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [S], documents [S]) per source, float64, from per-document rows [D]."""
    ids = np.asarray(source_ids, np.int64)
    tokens = np.bincount(ids, weights=np.asarray(num_tokens, np.float64), minlength=n_sources)
    return tokens, np.bincount(ids, minlength=n_sources).astype(np.float64)


def window_mixture(source_ids: np.ndarray, num_tokens: np.ndarray, names: list[str],
                   window: int) -> dict[str, float]:
    """{source name: per-document weight} (summing to 1) over the sources with tokens.

    source_ids, num_tokens [D]: per document of the split (Corpus.source_index).
    """
    if window < 1:
        raise ValueError(f"data.window_tokens: a window of {window} tokens holds nothing")
    tokens, docs = _per_source(source_ids, num_tokens, len(names))
    windows = _per_source(source_ids, np.minimum(num_tokens, window), len(names))[0]
    have = tokens > 0
    weight = np.where(have, windows / np.where(have, tokens, 1.0) * docs, 0.0)
    weight = weight / weight.sum() if weight.sum() > 0 else weight
    return {names[s]: float(weight[s]) for s in np.flatnonzero(have)}


def token_shares(mixture: dict[str, float], source_ids: np.ndarray, num_tokens: np.ndarray,
                 names: list[str]) -> dict[str, float]:
    """Each source's expected share of the tokens when documents are drawn by ``mixture``."""
    tokens, docs = _per_source(source_ids, num_tokens, len(names))
    mass = {s: w * tokens[names.index(s)] / docs[names.index(s)] for s, w in mixture.items()}
    total = sum(mass.values())
    return {s: m / total for s, m in mass.items()}
