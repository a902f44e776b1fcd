"""Replaying a generation: the exact model call behind every generated token.

A GenerationTrace (cbm_lm/inference/trace.py) says, for each generated token
(b, p), the sampler step s that committed it, and ``trace.model_inputs(b, s)``
rebuilds the model input of that step with the same steering. A ReplaySet
lists the Q tokens to explain and the R unique model inputs they were
committed in:

  in general:     one input per (sequence, step) that committed something
                  (for diffusion, the partially masked snapshot);
  autoregressive decoding of a causal model (``causal=True``): one input per
                  sequence, the fully decoded window: under the causal mask
                  the logit read at p - 1 sees only positions < p, whose
                  tokens and steering are those of step s, so every step's
                  logit is read from the same pass.

Inputs are built lazily, a batch at a time (an injection field is [L,D] per
input), as LogitQuery rows (cbm_lm/attribution/integrated_gradients.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cbm_lm.attribution.integrated_gradients import LogitQuery


@dataclasses.dataclass
class ReplaySet:
    """Q generated tokens of ``trace`` and the R model inputs that committed them.

    input_batch / input_step: [R] the (sequence, step) of each unique input.
    row:      [Q] which input committed token q
    batch, position, step, targets: [Q] the token: sequence, absolute position,
              committing step, token id
    read_pos: [Q] where its logits are read (p for diffusion, p - 1 autoregressive)
    """
    trace: object
    input_batch: np.ndarray
    input_step: np.ndarray
    row: np.ndarray
    batch: np.ndarray
    position: np.ndarray
    step: np.ndarray
    targets: np.ndarray
    read_pos: np.ndarray

    @property
    def num(self) -> int:
        """Q, the number of tokens (so a ReplaySet is a query source for IG)."""
        return len(self.row)

    @property
    def inject_layer(self) -> int | None:
        inj = self.trace.steering.injection
        return None if inj is None else int(inj.layer)

    @property
    def snapshots(self) -> "_Inputs":
        """The R unique inputs as a lazy query source (read_pos / targets are 0)."""
        return _Inputs(self)

    def select(self, keep: np.ndarray) -> "ReplaySet":
        """The tokens where ``keep`` [Q] is True (e.g. one chunk's), with only their inputs."""
        keep = np.asarray(keep, bool)
        used, row = np.unique(self.row[keep], return_inverse=True)
        return ReplaySet(self.trace, self.input_batch[used], self.input_step[used],
                         row.reshape(-1), self.batch[keep], self.position[keep], self.step[keep],
                         self.targets[keep], self.read_pos[keep])

    def inputs(self, rows: np.ndarray) -> LogitQuery:
        """LogitQuery of the unique inputs ``rows`` [n] (read_pos / targets 0)."""
        return _query(self.trace, self.input_batch[rows], self.input_step[rows],
                      np.zeros(len(rows), np.int32), np.zeros(len(rows), np.int32))

    def take(self, q: np.ndarray) -> LogitQuery:
        """LogitQuery of tokens ``q`` [n]: each token's own input, read position, target."""
        r = self.row[q]
        return _query(self.trace, self.input_batch[r], self.input_step[r], self.read_pos[q],
                      self.targets[q])


class _Inputs:
    def __init__(self, replay: ReplaySet):
        self.replay = replay

    @property
    def num(self) -> int:
        return len(self.replay.input_batch)

    def take(self, rows) -> LogitQuery:
        return self.replay.inputs(np.asarray(rows))


def _query(trace, batch_idx, steps, read_pos, targets) -> LogitQuery:
    kw = trace.model_inputs(batch_idx, steps)
    n = len(batch_idx)
    known = kw.get("intervene_known")
    unknown = kw.get("intervene_unknown")
    drop = np.full((n,), bool(kw.get("drop_epsilon", False)) or known is not None)
    injection = kw.get("injection")
    if injection is not None:
        injection = np.asarray(injection, np.float32) * np.float32(kw.get("inject_alpha", 1.0))
    return LogitQuery(
        tokens=np.asarray(kw["tokens"], np.int32), read_pos=np.asarray(read_pos, np.int32),
        targets=np.asarray(targets, np.int32), positions=_opt(kw.get("positions"), np.int32),
        segment_ids=_opt(kw.get("segment_ids"), np.int32),
        known_ids=None if known is None else np.asarray(known[0], np.int32),
        known_vals=None if known is None else np.asarray(known[1], np.float32),
        unknown_ids=None if unknown is None else np.asarray(unknown[0], np.int32),
        unknown_vals=None if unknown is None else np.asarray(unknown[1], np.float32),
        drop_epsilon=drop, injection=injection)


def _opt(x, dtype):
    return None if x is None else np.asarray(x, dtype)


def replay_set(trace, batch_idx=None, *, causal: bool = False) -> ReplaySet:
    """Every generated token of the sequences ``batch_idx`` (default all) of ``trace``.

    causal: the model's attention is causal (model.config.attention == "causal"),
    so an autoregressive trace shares one input per sequence.
    """
    seqs = np.arange(trace.batch_size) if batch_idx is None else np.atleast_1d(batch_idx)
    ar = causal and trace.objective == "autoregressive"
    logit_pos = trace.logit_pos
    in_b, in_s, rows, bs, ps, ss = [], [], [], [], [], []
    for b in seqs.tolist():
        cs = trace.committed_step[b]
        pos = np.flatnonzero(cs >= 0)
        if len(pos) == 0:
            continue
        if ar:
            groups = [(int(cs[pos].max()) + 1, pos)]     # the fully decoded window
        else:
            groups = [(s, np.flatnonzero(cs == s)) for s in np.unique(cs[pos]).tolist()]
        for s, committed in groups:
            rows.append(np.full(len(committed), len(in_b)))
            in_b.append(b)
            in_s.append(s)
            bs.append(np.full(len(committed), b))
            ps.append(committed)
            ss.append(cs[committed])
    cat = (lambda xs: np.concatenate(xs).astype(np.int64)) if rows else (
        lambda xs: np.zeros((0,), np.int64))
    batch, position = cat(bs), cat(ps)
    return ReplaySet(trace, np.asarray(in_b, np.int64), np.asarray(in_s, np.int64), cat(rows),
                     batch, position, cat(ss), trace.tokens[batch, position].astype(np.int64),
                     logit_pos[batch, position].astype(np.int64))


def replay_for(model, trace_or_replay, batch_idx=None) -> ReplaySet:
    """A ReplaySet for ``model``: passed through, or built from a trace (sharing one input per
    sequence when the model is causal and the trace autoregressive)."""
    if isinstance(trace_or_replay, ReplaySet):
        return trace_or_replay
    return replay_set(trace_or_replay, batch_idx, causal=model.config.attention == "causal")
