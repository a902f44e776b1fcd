"""Per-chunk concept attribution (Steerling's chunk_attribution) and labelled export.

For an output chunk [start, end) of sequence b and its committed tokens t, with
per-token contributions C_t[i] (known and unknown concepts) and epsilon e_t
(cbm_lm/attribution/concept_attribution.py):

  Z_t        = sum_i |C_t[i]| + |e_t|                 (floored at 1e-8)
  score[i]   = (1 / (end - start)) sum_t C_t[i] / Z_t  signed; every token votes equally
  eps_share  = mean_t e_t / Z_t                       Steerling's eps_pct / 100

Concepts are ranked by |score|. Known concepts take their name and group from
the corpus's concepts.json; unknown (discovered) concepts are labelled
``u<id>`` in group "unknown".
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cbm_lm.attribution.concept_attribution import ConceptAttribution


class ConceptLabels:
    """Names and groups of concept ids. vocab: a cbm_lm.data.concepts.ConceptVocab or None."""

    def __init__(self, vocab=None):
        self.vocab = vocab

    @classmethod
    def load(cls, path) -> "ConceptLabels":
        """From a concepts.json (cbm_lm.data.concepts format)."""
        from cbm_lm.data.concepts import ConceptVocab  # data is only needed for names
        return cls(ConceptVocab.load(path))

    def label(self, cid: int, kind: str = "known") -> tuple[str, str]:
        """(name, group) of concept ``cid`` of head ``kind`` ("known" | "unknown")."""
        if kind == "unknown":
            return f"u{cid}", "unknown"
        if self.vocab is not None and 0 <= cid < len(self.vocab):
            c = self.vocab.concepts[cid]
            return c.name, c.group
        return f"k{cid}", "known"


@dataclasses.dataclass(frozen=True)
class ChunkConcepts:
    """Concept attribution of one chunk: ranked entries and the epsilon share.

    entries: [{"id", "type" ("known"|"unknown"), "name", "group", "score"}], by |score|.
    """
    entries: list[dict]
    epsilon_share: float
    n_tokens: int          # committed tokens of the chunk that were attributed

    def top(self, k: int) -> list[dict]:
        return self.entries[:k]


def token_totals(attr: ConceptAttribution) -> np.ndarray:
    """Z_t [N] = sum |C_known| + sum |C_unknown| + |eps|, floored at 1e-8."""
    z = (np.abs(attr.known_contrib).sum(-1) + np.abs(attr.unknown_contrib).sum(-1)
         + np.abs(attr.epsilon))
    return np.maximum(z, 1e-8)


def _mass(ids: np.ndarray, contrib: np.ndarray) -> dict[int, float]:
    flat_ids, flat_c = ids.reshape(-1), contrib.reshape(-1)
    uniq, inv = np.unique(flat_ids, return_inverse=True)
    mass = np.zeros(len(uniq), np.float64)
    np.add.at(mass, inv, flat_c)
    # Slots with weight 0 (padding, overridden top-k) add exactly 0; a concept
    # that only ever sat in such slots is not reported.
    seen = np.zeros(len(uniq), bool)
    np.logical_or.at(seen, inv, flat_c != 0)
    return {int(u): float(m) for u, m, s in zip(uniq, mass, seen) if s}


def chunk_concepts(attr: ConceptAttribution, b: int, start: int, end: int,
                   labels: ConceptLabels | None = None) -> ChunkConcepts:
    """Concept scores of the chunk [start, end) of sequence b (see the module docstring)."""
    if end <= start:
        return ChunkConcepts([], 0.0, 0)
    labels = labels or ConceptLabels()
    sel = (attr.batch == b) & (attr.position >= start) & (attr.position < end)
    a = attr.select(sel)
    if len(a.batch) == 0:
        return ChunkConcepts([], 0.0, 0)
    z = token_totals(a)[:, None]
    length = end - start
    entries = []
    for kind, ids, contrib in (("known", a.known_ids, a.known_contrib),
                               ("unknown", a.unknown_ids, a.unknown_contrib)):
        for cid, m in _mass(ids, contrib / z).items():
            name, group = labels.label(cid, kind)
            entries.append({"id": cid, "type": kind, "name": name, "group": group,
                            "score": m / length})
    entries.sort(key=lambda e: -abs(e["score"]))
    return ChunkConcepts(entries, float(np.mean(a.epsilon / z[:, 0])), int(len(a.batch)))


def concept_rows(attr: ConceptAttribution, labels: ConceptLabels | None = None,
                 min_abs: float = 0.0) -> list[dict]:
    """The per-token table as JSON rows: one row per (token, active concept) with
    batch, position, step, token_id, logit, type, concept_id, name, group, weight,
    contribution, epsilon. Rows with |contribution| <= min_abs are left out."""
    labels = labels or ConceptLabels()
    rows = []
    for n in range(len(attr.batch)):
        common = {"batch": int(attr.batch[n]), "position": int(attr.position[n]),
                  "step": int(attr.step[n]), "token_id": int(attr.token[n]),
                  "logit": float(attr.logit[n]), "epsilon": float(attr.epsilon[n])}
        for kind, ids, contrib, weights in (
                ("known", attr.known_ids, attr.known_contrib, attr.known_weights),
                ("unknown", attr.unknown_ids, attr.unknown_contrib, attr.unknown_weights)):
            for s in range(ids.shape[1]):
                c = float(contrib[n, s])
                if abs(c) <= min_abs or (weights is not None and weights[n, s] == 0):
                    continue
                name, group = labels.label(int(ids[n, s]), kind)
                rows.append({**common, "type": kind, "concept_id": int(ids[n, s]), "name": name,
                             "group": group,
                             "weight": None if weights is None else float(weights[n, s]),
                             "contribution": c})
    return rows
