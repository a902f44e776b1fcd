"""Input attribution of a generation: which context tokens caused each output token and chunk.

For every generated token (b, p) the model call that committed it is
replayed (cbm_lm/attribution/replay.py) and integrated gradients
(cbm_lm/attribution/integrated_gradients.py) attributes the token's logit to
the L input positions of that call: A [Q,L]. Positions still masked in a
diffusion snapshot equal the MASK baseline and get exactly 0.

Aggregation over a set of output tokens T (a chunk) and a scope S of input
positions (Steerling's FaithfulOutputToInputAttribution._aggregate_targets):

  a_q[t]  = A[q,t] / max(sum_{t' in S} |A[q,t']|, 1e-8)     equal mass per output token
  score[t] = mean_{q in T} a_q[t]        (signed; |a_q| when signed=False)

Scopes: "prompt" (the prompt), "generated" (generated positions), "all" (both;
padding and never-committed positions are never included).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cbm_lm.attribution.integrated_gradients import integrated_gradients
from cbm_lm.attribution.replay import ReplaySet, replay_for

SCOPES = ("prompt", "generated", "all")


@dataclasses.dataclass
class InputAttribution:
    """attributions [Q,L] fp32 for the Q tokens of ``replay`` (in its order); f_input /
    f_baseline [Q] the logit at the input and at the baseline (IG's two ends)."""
    replay: ReplaySet
    attributions: np.ndarray
    f_input: np.ndarray
    f_baseline: np.ndarray

    @property
    def trace(self):
        return self.replay.trace

    def completeness_gap(self) -> np.ndarray:
        """[Q]: sum_t A[q,t] - (f(x) - f(baseline))."""
        return self.attributions.sum(-1) - (self.f_input - self.f_baseline)

    def token_index(self, b: int, p: int) -> int:
        hit = np.flatnonzero((self.replay.batch == b) & (self.replay.position == p))
        if len(hit) == 0:
            raise KeyError(f"no generated token at sequence {b}, position {p}")
        return int(hit[0])

    def for_token(self, b: int, p: int) -> np.ndarray:
        """[L] attribution of the generated token at (b, p) to its input positions."""
        return self.attributions[self.token_index(b, p)]

    def scope_mask(self, b: int, scope: str = "all") -> np.ndarray:
        """[L] bool: the input positions of sequence b in ``scope`` (SCOPES)."""
        if scope not in SCOPES:
            raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
        pos = np.arange(self.trace.length)
        prompt = pos < int(self.trace.prompt_lens[b])
        generated = self.trace.committed_step[b] >= 0
        return {"prompt": prompt, "generated": generated, "all": prompt | generated}[scope]

    def chunk_scores(self, b: int, start: int, end: int, scope: str = "all",
                     signed: bool = True) -> np.ndarray:
        """[L] aggregated score of each input position for outputs in [start, end) of b
        (0 outside ``scope``); see the module docstring."""
        sel = (self.replay.batch == b) & (self.replay.position >= start) & (self.replay.position < end)
        keep = self.scope_mask(b, scope)
        scores = np.zeros(self.trace.length, np.float32)
        if not sel.any() or not keep.any():
            return scores
        a = self.attributions[sel][:, keep]
        a = a / np.maximum(np.abs(a).sum(-1, keepdims=True), 1e-8)
        scores[keep] = (a if signed else np.abs(a)).mean(0)
        return scores

    def top_tokens(self, b: int, start: int, end: int, k: int = 5, scope: str = "all",
                   signed: bool = True) -> list[dict]:
        """The k highest-scoring input positions for outputs [start, end) of sequence b:
        [{"position", "token_id", "score"}], best first (by score, or |score| unsigned)."""
        scores = self.chunk_scores(b, start, end, scope, signed)
        positions = np.flatnonzero(self.scope_mask(b, scope))
        key = scores[positions] if signed else np.abs(scores[positions])
        ranked = positions[np.argsort(-key, kind="stable")][:k]
        return [{"position": int(t), "token_id": int(self.trace.tokens[b, t]),
                 "score": float(scores[t])} for t in ranked]


def input_attribution(model, trace_or_replay, *, n_steps: int = 16, baseline="mask",
                      pad_id: int | None = None, batch_size: int = 16,
                      mesh=None) -> InputAttribution:
    """IG of every generated token of a trace against the input it was committed in.

    trace_or_replay: a GenerationTrace (all its tokens) or a ReplaySet (a subset).
    n_steps: Riemann steps (1 = gradient x input). baseline: "mask" | "pad" | "zero"
    or a [D] / [L,D] array; pad_id for "pad" (default: the trace's pad id).
    Returns InputAttribution with attributions [Q,L].
    """
    replay = replay_for(model, trace_or_replay)
    if replay.num == 0:
        raise ValueError("input_attribution: the trace has no generated tokens")
    trace = replay.trace
    res = integrated_gradients(
        model, replay, baseline=baseline, n_steps=n_steps, inject_layer=replay.inject_layer,
        batch_size=batch_size, mask_id=trace.mask_id,
        pad_id=trace.pad_id if pad_id is None else pad_id, mesh=mesh)
    return InputAttribution(replay, *(np.asarray(x, np.float32) for x in res))
