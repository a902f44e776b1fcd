"""Concept attribution of generated tokens, from the forward pass that committed them.

For every generated token y at position p of sequence b, committed at step s,
the forward pass over the step-s model input (the partially masked diffusion
snapshot, or the autoregressive prefix, with the same steering) gives, at the
read position r (p for diffusion, p - 1 for autoregressive):

  C_k[i] = w_i (E_k[i] . W_y)     each active known concept    [S_k]
  C_u[j] = w_j (E_u[j] . W_y)     each active unknown concept  [S_u]
  eps    = residual . W_y         computed on its own, not as a remainder

and the identity logit_y = sum C_k + sum C_u + eps holds exactly
(cbm_lm/attribution/decomposition.py); ``verify`` checks it against the
logit the model produced, so a wrong table, target or position shows up as
an error instead of being absorbed into epsilon.

The contributions are taken in the pass that committed the token when the
sampler was given ``commit_capture`` (trace.capture), or that pass is
replayed from the trace (cbm_lm/attribution/replay.py): a jitted forward over each unique model input (one per diffusion step and
sequence; one per sequence for autoregressive models, whose causal mask makes
the full sequence equivalent to every prefix), decomposed at the tokens that
step committed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cbm_lm.attribution.decomposition import decompose_logits
from cbm_lm.attribution.replay import ReplaySet, replay_for
from cbm_lm.model.lm import ConceptBottleneckLM


@dataclasses.dataclass(frozen=True)
class Verification:
    """Result of ConceptAttribution.verify: |sum of contributions - logit| per token."""
    passed: bool
    max_abs_error: float
    mean_abs_error: float
    worst_token: tuple[int, int] | None   # (batch, position) of the largest error
    atol: float

    def __str__(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        return (f"{status}: max |known + unknown + epsilon - logit| = {self.max_abs_error:.2e} "
                f"(mean {self.mean_abs_error:.2e}, atol {self.atol:g})")


class ConceptAttribution(NamedTuple):
    """Per-token concept contributions of N generated tokens (numpy, fp32).

    batch, position, step, token: [N] int  which token, when it was committed, its id
    known_ids / known_contrib:     [N,S_k]
    unknown_ids / unknown_contrib: [N,S_u] (S_u = 0 without an unknown head)
    epsilon: [N]  residual . W_y
    logit:   [N]  the logit the model produced for the token in that pass
    known_weights / unknown_weights: [N,S] the weights w (None when the sampler's
    commit-time capture, which records contributions only, is the source)
    Slots with weight 0 (intervention padding, overridden top-k slots) carry 0.
    """
    batch: np.ndarray
    position: np.ndarray
    step: np.ndarray
    token: np.ndarray
    known_ids: np.ndarray
    known_contrib: np.ndarray
    unknown_ids: np.ndarray
    unknown_contrib: np.ndarray
    epsilon: np.ndarray
    logit: np.ndarray
    known_weights: np.ndarray | None = None
    unknown_weights: np.ndarray | None = None

    def total(self) -> np.ndarray:
        """[N]: sum of all contributions."""
        return self.known_contrib.sum(-1) + self.unknown_contrib.sum(-1) + self.epsilon

    def verify(self, atol: float = 1e-4) -> Verification:
        """Checks known + unknown + epsilon == logit for every token (fp32, ``atol``)."""
        if len(self.logit) == 0:
            return Verification(True, 0.0, 0.0, None, atol)
        err = np.abs(self.total().astype(np.float64) - self.logit)
        worst = int(np.argmax(err))
        return Verification(bool(np.all(err <= atol)), float(err.max()), float(err.mean()),
                            (int(self.batch[worst]), int(self.position[worst])), atol)

    def select(self, mask: np.ndarray) -> "ConceptAttribution":
        """The tokens where ``mask`` [N] is True."""
        return ConceptAttribution(*(None if f is None else np.asarray(f)[mask] for f in self))


def _forward_decompose(graphdef, inject_layer, state, snaps, rows, read_pos, targets):
    """One jitted pass: model over R snapshots, decomposition at Q (row, read_pos, target)."""
    model = nnx.merge(graphdef, state)
    out = model(snaps.tokens, positions=snaps.positions, segment_ids=snaps.segment_ids,
                intervene_known=_pair(snaps.known_ids, snaps.known_vals),
                intervene_unknown=_pair(snaps.unknown_ids, snaps.unknown_vals),
                drop_epsilon=False if snaps.drop_epsilon is None else snaps.drop_epsilon,
                injection=snaps.injection, inject_layer=inject_layer)
    return decompose_logits(model, out, rows, read_pos, targets)


def _pair(ids, vals):
    return None if ids is None else (ids, vals)


@functools.lru_cache(maxsize=16)
def _compiled(graphdef, inject_layer):
    return jax.jit(functools.partial(_forward_decompose, graphdef, inject_layer))


def concept_attribution(model: ConceptBottleneckLM, trace_or_replay, *,
                        source: str = "auto") -> ConceptAttribution:
    """Per-token concept contributions of a generation's tokens.

    trace_or_replay: a GenerationTrace (all its generated tokens) or a ReplaySet.
    source: "capture" reads the trace's commit-time capture (the sampler
    decomposed each token in the pass that committed it); "replay" recomputes
    that pass (replay_concepts); "auto" takes the capture when the trace has one.
    """
    replay = replay_for(model, trace_or_replay)
    capture = getattr(replay.trace, "capture", None)
    if source not in ("auto", "capture", "replay"):
        raise ValueError(f"source: expected auto | capture | replay, got {source!r}")
    if source == "capture" and capture is None:
        raise ValueError("source='capture': the trace has no commit-time capture "
                         "(generate with capture enabled, or use source='replay')")
    if capture is not None and source != "replay":
        return from_capture(replay, capture)
    return replay_concepts(model, replay)


def commit_capture(model, out, batch_idx, pos_idx, token) -> dict:
    """``capture_fn`` for cbm_lm.inference.generate: decomposes, inside the sampler's jitted
    loop, the logit of each token committed by this pass (out: its LMOutput; batch_idx,
    pos_idx, token [N]: rows, read positions in ``out``, committed ids). Returns [N,...]
    arrays that the sampler stores per position in ``trace.capture``."""
    dec = decompose_logits(model, out, batch_idx, pos_idx, token)
    return dict(logit=dec.logit, known_ids=dec.known_ids, known_contrib=dec.known_contrib,
                known_weights=dec.known_weights, unknown_ids=dec.unknown_ids,
                unknown_contrib=dec.unknown_contrib, unknown_weights=dec.unknown_weights,
                epsilon_contrib=dec.epsilon_contrib)


def from_capture(replay: ReplaySet, capture: dict) -> ConceptAttribution:
    """ConceptAttribution of replay's tokens from a trace's capture dict of [B,L,...] arrays
    (logit, known_ids, known_contrib, unknown_ids, unknown_contrib, epsilon_contrib)."""
    b, p = replay.batch, replay.position

    def at(name, dtype):
        return np.asarray(capture[name])[b, p].astype(dtype)

    weights = [at(k, np.float32) if k in capture else None
               for k in ("known_weights", "unknown_weights")]
    return ConceptAttribution(b, p, replay.step, replay.targets,
                              at("known_ids", np.int32), at("known_contrib", np.float32),
                              at("unknown_ids", np.int32), at("unknown_contrib", np.float32),
                              at("epsilon_contrib", np.float32), at("logit", np.float32),
                              *weights)


def replay_concepts(model: ConceptBottleneckLM, replay: ReplaySet, *,
                    snapshots_per_call: int = 8) -> ConceptAttribution:
    """Decomposes the logit of every token in ``replay`` (see the module docstring).

    replay: R unique model inputs and Q tokens (ReplaySet). Snapshots run in
    jitted batches of ``snapshots_per_call`` (padded), queries in power-of-two
    buckets. Returns a ConceptAttribution over the Q tokens, in replay order.
    """
    graphdef, state = nnx.split(model)
    fn = _compiled(graphdef, replay.inject_layer)
    n_rows = len(replay.input_batch)
    parts, order = [], []
    for start in range(0, n_rows, snapshots_per_call):
        rows = np.arange(start, min(start + snapshots_per_call, n_rows))
        pad_rows = np.concatenate([rows, np.full(snapshots_per_call - len(rows), rows[0])])
        sel = np.nonzero((replay.row >= start) & (replay.row < start + len(rows)))[0]
        if len(sel) == 0:
            continue
        bucket = 1 << int(np.ceil(np.log2(len(sel))))
        pad_sel = np.concatenate([sel, np.full(bucket - len(sel), sel[0])])
        dec = fn(state, replay.inputs(pad_rows),
                 jnp.asarray(replay.row[pad_sel] - start, jnp.int32),
                 jnp.asarray(replay.read_pos[pad_sel], jnp.int32),
                 jnp.asarray(replay.targets[pad_sel], jnp.int32))
        parts.append(jax.tree.map(lambda x: np.asarray(x)[: len(sel)], dec))
        order.append(sel)
    if not parts:
        return _empty(model)
    idx = np.concatenate(order)
    inv = np.empty_like(idx)
    inv[idx] = np.arange(len(idx))

    def cat(name):
        return np.concatenate([getattr(p, name) for p in parts])[inv]

    return ConceptAttribution(
        replay.batch, replay.position, replay.step, replay.targets,
        cat("known_ids"), cat("known_contrib"), cat("unknown_ids"), cat("unknown_contrib"),
        cat("epsilon_contrib"), cat("logit"), cat("known_weights"), cat("unknown_weights"))


def _empty(model) -> ConceptAttribution:
    cc = model.config.concepts
    z = np.zeros((0,), np.int64)
    sk = (cc.known_topk or cc.n_known)
    su = (cc.unknown_topk or cc.n_unknown) if cc.use_unknown else 0
    f = np.zeros((0,), np.float32)
    return ConceptAttribution(z, z, z, z, np.zeros((0, sk), np.int32), np.zeros((0, sk), np.float32),
                              np.zeros((0, su), np.int32), np.zeros((0, su), np.float32), f, f,
                              np.zeros((0, sk), np.float32), np.zeros((0, su), np.float32))
