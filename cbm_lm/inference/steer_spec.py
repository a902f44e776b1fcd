"""The steering settings a generation ran with, as plain data (no model, no jax).

A generation's trace carries one ``Steering``; replaying a trace step feeds the
model exactly what the sampler fed it, so these objects only describe, and
``model_kwargs`` turns the description into the model's keyword arguments
(cbm_lm.model.lm.ConceptBottleneckLM.__call__) for a batch of snapshots.

Intervention (weight override, DESIGN.md section 2):
  at the chosen positions, concept i's weight is set to ``known[i]`` (the
  top-k slot of i, if any, is zeroed and i added as an extra active slot), and
  epsilon is dropped for the whole batch, so the override reaches the logits.
  Steerling drops epsilon only when KNOWN concepts are overridden; with an
  unknown-only override it keeps epsilon = h - known - unknown', which cancels
  the override exactly (composed == h): the logits do not move. cbm_lm drops
  epsilon for any override (``drop_epsilon=True``) so unknown steering acts;
  ``drop_epsilon=False`` reproduces Steerling's unknown-only no-op.

Injection (Steerling's mask-aligned residual injection):
  direction d = sum_i E_k[i] / ||sum_i E_k[i]||          [D]
  alpha       = target / max_v (W_v . d)   (calibrated)  or target (raw)
  after every block l with l+1 >= layer:  x += alpha * d  at the steered
  positions. Diffusion steers the positions still MASK in the step's input;
  autoregressive decoding steers the query positions that produce generated
  tokens (position P-1+j at step j). With ``cutoff_tokens`` = N the alpha is
  zero from the step at which N tokens of the sequence are committed on
  (Steerling's hard_cutoff; None is its fixed schedule).

Logit mask (Steerling's ReLU suppression): ``logit_mask`` [V] = sum_c s_c
relu(E_k[c] W^T) is subtracted from the logits before sampling; it acts in the
sampler, not in the model.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Intervention:
    """Override concept weights. known / unknown: concept id -> weight.

    positions: [B,L] bool (which positions of each sequence), or None = all; columns
    past L (the sampler rounds rows up to a shape bucket) are not intervened on.
    """
    known: dict[int, float] = dataclasses.field(default_factory=dict)
    unknown: dict[int, float] = dataclasses.field(default_factory=dict)
    positions: np.ndarray | None = None
    drop_epsilon: bool = True

    def _arrays(self, table: dict[int, float], batch_idx: np.ndarray, length: int):
        if not table:
            return None
        n, k = len(batch_idx), len(table)
        ids = np.broadcast_to(np.asarray(list(table), np.int32), (n, length, k))
        vals = np.broadcast_to(np.asarray(list(table.values()), np.float32), (n, length, k))
        if self.positions is None:
            return np.ascontiguousarray(ids), np.ascontiguousarray(vals)
        pos = np.asarray(self.positions, bool)
        if pos.ndim != 2 or (len(batch_idx) and int(np.max(batch_idx)) >= pos.shape[0]):
            rows = sorted(set(np.asarray(batch_idx).tolist()))
            raise ValueError(f"Intervention.positions: expected [B, L] bool covering rows "
                             f"{rows}, got shape {pos.shape}")
        if pos.shape[1] < length:    # the sampler's row is bucketed past the caller's columns
            pos = np.pad(pos, ((0, 0), (0, length - pos.shape[1])))
        where = pos[batch_idx][:, :length, None]
        return np.where(where, ids, -1).astype(np.int32), np.where(where, vals, 0.0).astype(np.float32)

    def model_kwargs(self, batch_idx: np.ndarray, length: int) -> dict:
        """intervene_known / intervene_unknown (ids [N,L,K], vals [N,L,K]) and drop_epsilon."""
        out = {}
        known = self._arrays(self.known, batch_idx, length)
        unknown = self._arrays(self.unknown, batch_idx, length)
        if known is not None:
            out["intervene_known"] = known
        if unknown is not None:
            out["intervene_unknown"] = unknown
        if (known is not None or unknown is not None) and self.drop_epsilon:
            out["drop_epsilon"] = True
        return out


@dataclasses.dataclass(frozen=True)
class Injection:
    """Residual-stream injection of a unit concept direction (see module docstring).

    direction [D] unit float32; alpha the raw strength (already calibrated);
    layer L (inject after blocks l with l+1 >= L); cutoff_tokens N or None.
    """
    direction: np.ndarray
    alpha: float
    layer: int
    cutoff_tokens: int | None = None
    concept_ids: tuple[int, ...] = ()

    def alpha_for(self, n_committed: np.ndarray) -> np.ndarray:
        """Alpha [N] for sequences that have ``n_committed`` [N] tokens committed."""
        n_committed = np.asarray(n_committed)
        if self.cutoff_tokens is None:
            return np.full(n_committed.shape, self.alpha, np.float32)
        return np.where(n_committed < self.cutoff_tokens, self.alpha, 0.0).astype(np.float32)

    def field(self, steered: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        """injection [N,L,D] = alpha[n] * d at steered [N,L] positions (alpha [N] or [N,L])."""
        alpha = np.asarray(alpha, np.float32)
        if alpha.ndim == 1:
            alpha = alpha[:, None]
        scale = np.where(steered, alpha, 0.0).astype(np.float32)
        return scale[..., None] * np.asarray(self.direction, np.float32)[None, None, :]


@dataclasses.dataclass(frozen=True)
class Steering:
    """Everything that steered a generation; any part may be None."""
    intervention: Intervention | None = None
    injection: Injection | None = None
    logit_mask: np.ndarray | None = None   # [V], subtracted from the logits before sampling

    @property
    def empty(self) -> bool:
        return self.intervention is None and self.injection is None and self.logit_mask is None
