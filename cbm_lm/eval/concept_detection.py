"""Chunk-level concept detection by the known head: macro AUROC and PR-AUC.

For chunk c and concept j the head's soft-OR detection score is

  P(j in c) = 1 - prod_{t in c} (1 - sigmoid(z_tj)) = 1 - exp(-S_cj),
  S_cj      = sum_{t in c} softplus(z_tj),

z_tj the known head's capped logit (``head.cap``) at position t, and t running
over the positions that PREDICT the chunk's tokens, as in training
(cbm_lm.objectives.label_alignment): the chunk's own positions for diffusion,
shifted one back for an autoregressive model (position t predicts token t+1,
so a document's first chunk loses its first token and the position before a
chunk's first token belongs to it). Only the corpus's concepts are scored, as
logits of those ids, M the corpus concept count, never the head's full width;
the per-position softplus [B,T,M] of one row batch is folded into the chunk
sums S [chunks,M] and dropped, so host memory is O(chunks x M + N x T x M_tok)
(M_tok the token-level concepts, whose positions token_detection ranks), never
the dense [N,T,M] (``position_softplus``, kept for small callers: ~138 GB for
33k concepts x 256 windows x 4096 tokens). Ranking chunks by S_cj is ranking
by P, so AUROC and average precision (PR-AUC) are computed on S.

Macro averages run over concepts with at least ``min_positives`` positive
and one negative chunk in the held-out windows; how many qualified is
reported, and per concept group (the name's prefix before ':') in ``by_group``.
A token-level concept (a lexicon label, e.g. ``supersense:noun.animal``) has no
chunk labels, so it never qualifies here.

Token-level concepts are scored per position instead (``token_detection``):
for each real position t whose predicted token u(t) is real (u = t for
diffusion, t+1 for autoregressive) and each token-level concept j,

  y_tj = [token u(t) lies inside a token label of j],   score_tj = softplus(z_tj)

(monotone in z, so the ranking is the logit's), AUROC per concept over the
positions of the windows, macro over those with ``min_positives`` positives.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from sklearn.metrics import average_precision_score, roc_auc_score

from cbm_lm.eval.forward import iter_rows
from cbm_lm.eval.heldout import HeldoutWindows
from cbm_lm.model import ConceptBottleneckLM


@dataclasses.dataclass(frozen=True)
class ConceptDetection:
    auroc_macro: float | None
    prauc_macro: float | None
    num_concepts: int          # concepts that qualified
    num_chunks: int
    per_concept: list[dict]    # {id, auroc, prauc, positives}
    # diagnostic: the same macro with S_cj / (positions predicting chunk c), the mean
    # softplus; chunks run from 2 to 64 positions, and S grows with length for every
    # concept while the labels are the document's (docs/fidelity.md "Fidelity: trained
    # top-k, concept-balanced positives, and what bounds AUROC")
    mean_pooled_auroc_macro: float | None = None

    def by_group(self, name_of) -> dict[str, dict]:
        """{group: {concepts, auroc, prauc}} means over the counted concepts of each group."""
        groups: dict[str, list[dict]] = {}
        for p in self.per_concept:
            groups.setdefault(str(name_of(p["id"])).split(":")[0], []).append(p)
        return {g: {"concepts": len(ps), "auroc": float(np.mean([p["auroc"] for p in ps])),
                    "prauc": float(np.mean([p["prauc"] for p in ps]))}
                for g, ps in sorted(groups.items())}


@nnx.jit
def _token_softplus(model, tokens, positions, segment_ids, concept_ids):
    """softplus(z_tj) for the given concept ids [M] -> [B,T,M]."""
    out = model(tokens, positions=positions, segment_ids=segment_ids)
    head = model.rewrite.known_head
    b, t, d = out.hidden.shape
    q = head.query(out.hidden.reshape(b * t, d))                                    # [BT,Q]
    keys = jnp.take(head.keys(), concept_ids, axis=0).astype(jnp.float32)           # [M,Q]
    z = head.cap(q @ keys.T)
    return {"sp": jax.nn.softplus(z).reshape(b, t, -1)}


def predicted_chunk_of(chunk_of: np.ndarray, objective: str) -> np.ndarray:
    """[N,T] chunk index of the token each position predicts (-1: none).

    Diffusion: the position's own token. Autoregressive: token t+1 (the last
    position of a row predicts nothing inside the window).
    """
    if objective == "diffusion":
        return chunk_of
    if objective != "autoregressive":
        raise ValueError(f"objective must be 'diffusion' or 'autoregressive', got {objective!r}")
    out = np.full_like(chunk_of, -1)
    out[:, :-1] = chunk_of[:, 1:]
    return out


def _softplus_batches(model: ConceptBottleneckLM, windows: HeldoutWindows, n_concepts: int,
                      batch: int):
    """Yields (first row, softplus(z_tj) [k,T,n_concepts]) per row batch of the windows."""
    w = windows
    ids = jnp.arange(n_concepts, dtype=jnp.int32)
    for start, out in iter_rows(lambda r: _token_softplus(model, jnp.asarray(w.tokens[r]),
                                                          jnp.asarray(w.positions[r]),
                                                          jnp.asarray(w.segment_ids[r]), ids),
                                w.num_rows, batch):
        yield start, out["sp"]


def position_softplus(model: ConceptBottleneckLM, windows: HeldoutWindows, n_concepts: int,
                      batch: int = 8) -> np.ndarray:
    """softplus(z_tj) [N,T,n_concepts] over the windows: dense, N x T x n_concepts floats on
    the host, so for small corpora and probes only (concept_detection never builds it)."""
    return np.concatenate([sp for _, sp in _softplus_batches(model, windows, n_concepts, batch)])


def _add_chunk_sums(scores: np.ndarray, target: np.ndarray, sp: np.ndarray) -> None:
    """scores[c] += sp[t] for every position t with target[t] = c >= 0 (in row-major
    order; float64 accumulation). target [k,T], sp [k,T,M]."""
    real = target >= 0
    np.add.at(scores, target[real], sp[real])


def chunk_scores(model: ConceptBottleneckLM, windows: HeldoutWindows, n_concepts: int,
                 batch: int = 8, sp: np.ndarray | None = None) -> np.ndarray:
    """S [n_chunks, n_concepts]: per chunk, softplus(z_tj) summed over the positions
    predicting its tokens (``sp``: position_softplus's output, if already computed;
    without it the sums are accumulated one row batch at a time)."""
    if sp is None:
        return _scores_and_token_columns(model, windows, n_concepts, batch,
                                         np.zeros(0, np.int64))[0]
    scores = np.zeros((len(windows.chunks), n_concepts), np.float64)
    _add_chunk_sums(scores, predicted_chunk_of(windows.chunk_of, model.config.objective), sp)
    return scores


def _scores_and_token_columns(model, windows: HeldoutWindows, n_concepts: int, batch: int,
                              token_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(chunk_scores [n_chunks, n_concepts], softplus [N,T,len(token_ids)] of only those
    concepts) from one pass over the windows, one row batch on the host at a time."""
    w = windows
    scores = np.zeros((len(w.chunks), n_concepts), np.float64)
    target = predicted_chunk_of(w.chunk_of, model.config.objective)
    cols = []
    for start, part in _softplus_batches(model, w, n_concepts, batch):
        _add_chunk_sums(scores, target[start:start + len(part)], part)
        cols.append(part[..., token_ids])
    return scores, np.concatenate(cols)


def chunk_positions(windows: HeldoutWindows, objective: str) -> np.ndarray:
    """[n_chunks] int: positions predicting each chunk's tokens (chunk_scores' summands)."""
    target = predicted_chunk_of(windows.chunk_of, objective)
    return np.bincount(target[target >= 0], minlength=len(windows.chunks))


def token_detection(sp: np.ndarray, windows: HeldoutWindows, objective: str,
                    concept_ids, min_positives: int = 5, *, columns_are_ids: bool = False
                    ) -> ConceptDetection:
    """Per-position AUROC of the token-level concepts ``concept_ids`` (module docstring).

    sp [N,T,C] scores, C > max(concept_ids) (column j: concept j), or with
    ``columns_are_ids`` [N,T,len(concept_ids)] (column i: concept_ids[i]);
    ``per_concept`` ids are corpus ids and ``num_chunks`` counts the scored positions.
    """
    w = windows
    ids = np.asarray(list(concept_ids), np.int64)
    if ids.size == 0 or len(w.token_labels) == 0:
        return ConceptDetection(None, None, 0, 0, [])
    if columns_are_ids and sp.shape[-1] != len(ids):
        raise ValueError(f"token_detection: sp has {sp.shape[-1]} columns for "
                         f"{len(ids)} concept ids")
    col = np.full(int(ids.max()) + 1 if columns_are_ids else sp.shape[-1], -1, np.int64)
    col[ids] = np.arange(len(ids))
    y = np.zeros(w.tokens.shape + (len(ids),), bool)                     # by token index
    for row, start, end, c in w.token_labels.tolist():
        if 0 <= c < len(col) and col[c] >= 0:
            y[row, start:end, col[c]] = True
    real_token = w.segment_ids > 0
    if objective == "autoregressive":                                    # position t -> t+1
        y = np.concatenate([y[:, 1:], np.zeros_like(y[:, :1])], axis=1)
        real_token = np.concatenate([real_token[:, 1:], np.zeros_like(real_token[:, :1])], 1)
    elif objective != "diffusion":
        raise ValueError(f"objective must be 'diffusion' or 'autoregressive', got {objective!r}")
    ok = real_token & (w.segment_ids > 0)
    det = macro_detection(sp[ok] if columns_are_ids else sp[ok][:, ids], y[ok], min_positives)
    per = [dict(p, id=int(ids[p["id"]])) for p in det.per_concept]
    return dataclasses.replace(det, per_concept=per)


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
                      min_positives: int = 5, batch: int = 8, token_concepts=()
                      ) -> tuple[ConceptDetection, ConceptDetection]:
    """(chunk-level detection of all concepts, per-position detection of ``token_concepts``),
    from one pass that keeps only the chunk sums and the token-level concepts' columns."""
    token_ids = np.asarray(list(token_concepts), np.int64)
    scores, sp_token = _scores_and_token_columns(model, windows, n_concepts, batch, token_ids)
    labels = windows.labels(n_concepts)
    chunk = macro_detection(scores, labels, min_positives)
    n = chunk_positions(windows, model.config.objective)
    mean = macro_detection(scores / np.maximum(n, 1)[:, None], labels, min_positives)
    chunk = dataclasses.replace(chunk, mean_pooled_auroc_macro=mean.auroc_macro)
    return chunk, token_detection(sp_token, windows, model.config.objective, token_ids,
                                  min_positives, columns_are_ids=True)
