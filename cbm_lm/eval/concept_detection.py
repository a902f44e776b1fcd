"""Chunk-level concept detection by the known head: macro AUROC and PR-AUC.

For chunk c and concept j the head's soft-OR detection score is

  P(j in c) = 1 - prod_{t in c} (1 - sigmoid(z_tj)) = 1 - exp(-S_cj),
  S_cj      = sum_{t in c} softplus(z_tj),

z_tj the known head's clipped logit at token t (the training concept loss,
cbm_lm.objectives.concept_loss). Only the corpus's concepts are scored, as
logits of those ids ([N,T,M] with M the corpus concept count, never the
head's full width). Ranking chunks by S_cj is ranking by P, so AUROC and
average precision (PR-AUC) are computed on S.

Macro averages run over concepts with at least ``min_positives`` positive
and one negative chunk in the held-out windows; how many qualified is
reported.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from sklearn.metrics import average_precision_score, roc_auc_score

from cbm_lm.eval.forward import map_rows
from cbm_lm.eval.heldout import HeldoutWindows
from cbm_lm.model import ConceptBottleneckLM


@dataclasses.dataclass(frozen=True)
class ConceptDetection:
    auroc_macro: float | None
    prauc_macro: float | None
    num_concepts: int          # concepts that qualified
    num_chunks: int
    per_concept: list[dict]    # {id, auroc, prauc, positives}


@nnx.jit
def _token_softplus(model, tokens, positions, segment_ids, concept_ids):
    """softplus(z_tj) for the given concept ids [M] -> [B,T,M]."""
    out = model(tokens, positions=positions, segment_ids=segment_ids)
    head = model.rewrite.known_head
    b, t, d = out.hidden.shape
    q = head.query(out.hidden.reshape(b * t, d))                                    # [BT,Q]
    keys = jnp.take(head.keys(), concept_ids, axis=0).astype(jnp.float32)           # [M,Q]
    z = jnp.clip(q @ keys.T, -head.clip, head.clip)
    return {"sp": jax.nn.softplus(z).reshape(b, t, -1)}


def chunk_scores(model: ConceptBottleneckLM, windows: HeldoutWindows, n_concepts: int,
                 batch: int = 8) -> np.ndarray:
    """S [n_chunks, n_concepts]: per chunk, sum over its tokens of softplus(z_tj)."""
    w = windows
    ids = jnp.arange(n_concepts, dtype=jnp.int32)
    sp = map_rows(lambda r: _token_softplus(model, jnp.asarray(w.tokens[r]),
                                            jnp.asarray(w.positions[r]),
                                            jnp.asarray(w.segment_ids[r]), ids),
                  w.num_rows, batch)["sp"]
    scores = np.zeros((len(w.chunks), n_concepts), np.float64)
    real = w.chunk_of >= 0
    np.add.at(scores, w.chunk_of[real], sp[real])
    return scores


def macro_detection(scores: np.ndarray, labels: np.ndarray, min_positives: int = 5
                    ) -> ConceptDetection:
    """Macro AUROC / average precision over the columns with enough positives and a negative.

    scores, labels [n_chunks, n_concepts].
    """
    per = []
    for j in range(labels.shape[1]):
        y = labels[:, j]
        pos = int(y.sum())
        if pos < min_positives or pos == len(y):
            continue
        per.append({"id": j, "positives": pos,
                    "auroc": float(roc_auc_score(y, scores[:, j])),
                    "prauc": float(average_precision_score(y, scores[:, j]))})
    if not per:
        return ConceptDetection(None, None, 0, labels.shape[0], [])
    return ConceptDetection(float(np.mean([p["auroc"] for p in per])),
                            float(np.mean([p["prauc"] for p in per])), len(per), labels.shape[0],
                            per)


def concept_detection(model: ConceptBottleneckLM, windows: HeldoutWindows, n_concepts: int, *,
                      min_positives: int = 5, batch: int = 8) -> ConceptDetection:
    scores = chunk_scores(model, windows, n_concepts, batch)
    return macro_detection(scores, windows.labels(n_concepts), min_positives)
