"""Dead real concepts on the held-out windows: concepts the deployed sparse path never uses.

The deployed known head weights only its active set (ConceptHead: the top-k of
the capped logits per position, f = sum_{i in S} sigmoid(z_i) E_i). Concept j
FIRES when it is in the active set S_t of some real (non-padding) position t
of the held-out windows; with ``min_weight`` > 0 it must also carry
sigmoid(z_tj) > min_weight there (0.5: the head says "present").

  fires_j = OR_{t real} [ j in S_t  and  w_tj > min_weight ]
  dead    = mean_{j real, labelled in the windows} (1 - fires_j)

Only the corpus's real concepts (ids 0..n_real-1) are counted: head slots past
them (padding, when the head is wider than the concept vocabulary) are never
counted, dead or alive. The headline fraction runs over the real concepts the
windows' labels contain (chunk or token labels): a concept the held-out text
never mentions (on the demo corpus: 86 of 198, e.g. 32 of the 38 plays have no
scene in the 256 held-out windows) cannot be told dead from correctly silent; the fraction over
all real concepts is reported beside it. Shapes: indices / weights [N,T,S], valid [N,T].
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from cbm_lm.eval.forward import map_rows
from cbm_lm.eval.heldout import HeldoutWindows
from cbm_lm.eval.report import MetricUnavailable
from cbm_lm.model import ConceptBottleneckLM


@dataclasses.dataclass(frozen=True)
class DeadConcepts:
    fraction: float               # dead / real concepts labelled in the windows
    fraction_confident: float     # same with "fires" = active and sigmoid(z) > 0.5
    fraction_all: float           # dead / all real concepts (absent ones included)
    num_real: int
    num_present: int              # real concepts labelled in the windows
    dead_ids: list[int]           # labelled real concepts never active
    positions: int                # real positions scanned


def fire_counts(indices: np.ndarray, weights: np.ndarray, valid: np.ndarray, n_real: int,
                min_weight: float = 0.0) -> np.ndarray:
    """[n_real] int: positions where each real concept is active with weight > min_weight.

    indices, weights [N,T,S] (the head's active set), valid [N,T] bool; ids >= n_real
    (padding slots) are dropped.
    """
    idx = np.asarray(indices).reshape(-1, indices.shape[-1])
    ok = (np.broadcast_to(np.asarray(valid, bool)[..., None], indices.shape).reshape(idx.shape)
          & (np.asarray(weights).reshape(idx.shape) > min_weight) & (idx >= 0) & (idx < n_real))
    return np.bincount(idx[ok], minlength=n_real)[:n_real]


@nnx.jit
def _active(model, tokens, positions, segment_ids):
    known = model(tokens, positions=positions, segment_ids=segment_ids).known
    return {"indices": known.indices, "weights": known.weights}


def dead_concepts(model: ConceptBottleneckLM, windows: HeldoutWindows, n_real: int,
                  batch: int = 8) -> DeadConcepts:
    """Runs the model over the windows and counts the real concepts that never fire."""
    if n_real < 1:
        raise MetricUnavailable(f"the corpus has {n_real} concepts; expected >= 1")
    w = windows
    act = map_rows(lambda r: _active(model, jax.numpy.asarray(w.tokens[r]),
                                     jax.numpy.asarray(w.positions[r]),
                                     jax.numpy.asarray(w.segment_ids[r])), w.num_rows, batch)
    valid = w.segment_ids > 0
    present = w.present(n_real)
    if not present.any():
        raise MetricUnavailable(f"none of the corpus's {n_real} concepts is labelled in the "
                                f"{w.num_rows} held-out windows")
    any_fire = fire_counts(act["indices"], act["weights"], valid, n_real)
    sure_fire = fire_counts(act["indices"], act["weights"], valid, n_real, min_weight=0.5)
    return summarize(any_fire, sure_fire, present, int(valid.sum()))


def summarize(any_fire: np.ndarray, sure_fire: np.ndarray, present: np.ndarray,
              positions: int) -> DeadConcepts:
    """Fire counts [n_real] and presence [n_real] bool -> DeadConcepts."""
    dead = np.nonzero((any_fire == 0) & present)[0]
    n_present = int(present.sum())
    return DeadConcepts(float(len(dead) / n_present),
                        float(np.sum((sure_fire == 0) & present) / n_present),
                        float(np.mean(any_fire == 0)), len(any_fire), n_present,
                        [int(j) for j in dead], positions)
