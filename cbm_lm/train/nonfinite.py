"""Finds the first non-finite step without a host sync per step.

The step's ``finite`` flag and loss stay on the device: ``record`` keeps only
references to them (dispatch stays asynchronous), and ``check`` fetches all of
them in one transfer. The loop checks at log steps and before every
checkpoint, so a checkpoint never follows an unnoticed non-finite step, and
optax.apply_if_finite (make_optimizer) keeps the params finite meanwhile.
The price: with nan_policy=stop the run may go on for up to train.log_every
steps past the bad one (all dropped updates) before it stops naming it.
"""

from __future__ import annotations

import jax


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteWatch:
    def __init__(self, nan_policy: str, max_skipped_steps: int):
        self.nan_policy = nan_policy
        self.max_skipped_steps = max_skipped_steps
        self._pending = []   # (step, finite, loss): device scalars since the last check

    def record(self, step: int, metrics: dict) -> None:
        self._pending.append((step, metrics["finite"], metrics["loss"]))

    def check(self, skipped: jax.Array) -> None:
        """Raises NonFiniteLossError per train.nan_policy; ``skipped`` = state.skipped."""
        pending, self._pending = self._pending, []
        flags, losses, n_skipped = jax.device_get(
            ([f for _, f, _ in pending], [l for _, _, l in pending], skipped))
        if self.nan_policy == "stop":
            for (step, _, _), finite, loss in zip(pending, flags, losses):
                if not finite:
                    raise NonFiniteLossError(
                        f"non-finite loss or gradient at step {step} (loss={float(loss)}); "
                        f"stopping. Set --config.train.nan_policy=skip to skip such steps.")
        if int(n_skipped) > self.max_skipped_steps:
            raise NonFiniteLossError(
                f"{int(n_skipped)} steps skipped for non-finite updates by step "
                f"{pending[-1][0] if pending else '?'}, more than "
                f"train.max_skipped_steps={self.max_skipped_steps}")
