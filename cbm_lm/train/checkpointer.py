"""The trainer's composite checkpoints (DESIGN.md section 6).

One orbax step directory holds three items:
  params       the model params (what load_model / the eval binary restores)
  train_state  step, optimizer state, rng, skipped-step count
  data         every process's grain iterator state (process_<i>-of-<n>.json)

Saves are async (orbax commits a step by renaming its temporary folder, so a
crash mid-save leaves the previous step intact). Restore walks the steps
newest first and falls back past any step that fails to restore, saying why.
"""

from __future__ import annotations

import logging
import os
import time

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from cbm_lm.train.checkpoint import CHECKPOINTS, PARAMS_ITEM, absolute, write_config
from cbm_lm.train.state import TrainState

TRAIN_STATE_ITEM = "train_state"
DATA_ITEM = "data"

log = logging.getLogger(__name__)


def _rest_of_state(state: TrainState) -> dict:
    return dict(step=state.step, opt_state=state.opt_state, rng=state.rng, skipped=state.skipped)


class TrainCheckpointer:
    def __init__(self, workdir: str | os.PathLike, config: ml_collections.ConfigDict):
        self.workdir = absolute(workdir)
        self.config = config
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.checkpoint.keep, create=True,
            enable_async_checkpointing=config.checkpoint.async_save)
        self.manager = ocp.CheckpointManager(
            self.workdir / CHECKPOINTS, options=options,
            item_names=(PARAMS_ITEM, TRAIN_STATE_ITEM, DATA_ITEM),
            item_handlers={DATA_ITEM: grain.checkpoint.CheckpointHandler()})
        if jax.process_index() == 0:
            write_config(self.workdir, config)

    def save(self, step: int, state: TrainState, data_iter) -> None:
        args = {PARAMS_ITEM: ocp.args.StandardSave(state.params),
                TRAIN_STATE_ITEM: ocp.args.StandardSave(_rest_of_state(state))}
        if data_iter is not None:
            args[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def _quarantine(self, steps) -> None:
        """Moves unrestorable steps to WORKDIR/quarantine/ so training can redo them."""
        if not steps:
            return
        if jax.process_index() == 0:
            qdir = self.workdir / "quarantine"
            qdir.mkdir(parents=True, exist_ok=True)
            for step in steps:
                dst = qdir / f"{step}-{int(time.time())}"
                (self.workdir / CHECKPOINTS / str(step)).rename(dst)
                print(f"moved unrestorable checkpoint step {step} to {dst}", flush=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("cbm_lm_checkpoint_quarantine")
        self.manager.reload()

    def restore_latest(self, abstract_state: TrainState, data_iter):
        """Restores the newest usable step into ``abstract_state``'s shardings.

        Returns (state, step) or (None, None) when there is no checkpoint.
        ``abstract_state`` leaves are ShapeDtypeStructs with NamedShardings.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        bad = []
        for step in steps:
            args = {PARAMS_ITEM: ocp.args.StandardRestore(abstract_state.params),
                    TRAIN_STATE_ITEM: ocp.args.StandardRestore(_rest_of_state(abstract_state))}
            if data_iter is not None:
                args[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iter)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**args))
            except Exception as e:  # noqa: BLE001 - any failure means: try the previous step
                msg = (f"checkpoint step {step} in {self.workdir / CHECKPOINTS} could not be "
                       f"restored ({type(e).__name__}: {str(e)[:300]}); trying an older step")
                log.error(msg)
                print(f"WARNING: {msg}", flush=True)
                bad.append(step)
                continue
            self._quarantine(bad)
            rest = restored[TRAIN_STATE_ITEM]
            state = TrainState(step=rest["step"], params=restored[PARAMS_ITEM],
                               opt_state=rest["opt_state"], rng=rest["rng"],
                               skipped=rest["skipped"])
            return state, step
        self._quarantine(bad)
        if steps:
            raise RuntimeError(f"none of the checkpoints {steps} in {self.workdir / CHECKPOINTS} "
                               f"could be restored; see the warnings above")
        return None, None
