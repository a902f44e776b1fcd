"""The trainer's composite checkpoints (DESIGN.md section 6).

One orbax step directory holds four items:
  params       the model params (what load_model / the eval binary restores)
  train_state  step, optimizer state, rng, skipped-step count
  source_mass  the concept x source mass [C_pad,S] (train/chunk_keys.py); its own item so
               the provenance index reads it alone, and checkpoints written before it
               existed still resume (with a zero mass, said so)
  data         every process's grain iterator state (process_<i>-of-<n>.json)

Saves are async (orbax commits a step by renaming its temporary folder, so a
crash mid-save leaves the previous step intact).

Restore never costs a run:
  1. the newest step's saved tree (orbax metadata: paths, shapes, dtypes) is
     compared with the target first; a mismatch (a shape-changing --config
     override) is refused naming the differing leaves and config fields, and
     nothing is moved;
  2. a step whose structure matches but whose data fails to read is skipped
     for an older one; it is moved to WORKDIR/quarantine/ only once an older
     step has restored from the same storage (proof the failure is the step's,
     not the storage's); when none restores nothing is moved at all.
     With several processes every decision is collective: each process tries
     the same step, they agree (an all-gather of each one's outcome), and the
     step is taken only if every process read it; else all go on to the next
     older step together, so no two processes ever resume from different
     steps. A step any process failed to read is set aside (by process 0, after
     every process has restored the older step, all in the same barriers);
  3. a params-only directory (tools/import_steerling.py, init_checkpoint.py)
     is refused with a pointer to --init_from.
"""

from __future__ import annotations

import logging
import os
import time

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from cbm_lm.train.checkpoint import (CHECKPOINTS, PARAMS_ITEM, SOURCE_MASS_ITEM, CheckpointError,
                                     absolute, read_config, write_config)
from cbm_lm.train.restore_check import config_differences, tree_differences
from cbm_lm.train.state import TrainState

TRAIN_STATE_ITEM = "train_state"
DATA_ITEM = "data"
QUARANTINE = "quarantine"

# per-process outcomes of trying one step, agreed across processes
_OK, _FAILED, _MISMATCH = 0, 1, 2

log = logging.getLogger(__name__)


# data.* fields that decide which documents the iterator's saved position points at
# (data.dir is not one: a corpus moved or copied elsewhere is the same corpus)
DATA_ORDER_FIELDS = ("split", "batch_size", "seq_len", "shuffle_seed", "mixture",
                     "source_weighting", "window_tokens", "process_split", "packing_bins")


class CheckpointMismatchError(CheckpointError):
    """The saved tree does not fit the model/optimizer the current config describes."""


def _rest_of_state(state: TrainState) -> dict:
    return dict(step=state.step, opt_state=state.opt_state, rng=state.rng, skipped=state.skipped)


def _warn(msg: str) -> None:
    log.error(msg)
    print(f"WARNING: {msg}", flush=True)


class TrainCheckpointer:
    def __init__(self, workdir: str | os.PathLike, config: ml_collections.ConfigDict):
        self.workdir = absolute(workdir)
        self.config = config
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.checkpoint.keep, create=True,
            enable_async_checkpointing=config.checkpoint.async_save)
        self.manager = ocp.CheckpointManager(
            self.workdir / CHECKPOINTS, options=options,
            item_names=(PARAMS_ITEM, TRAIN_STATE_ITEM, SOURCE_MASS_ITEM, DATA_ITEM),
            item_handlers={PARAMS_ITEM: ocp.StandardCheckpointHandler(),
                           TRAIN_STATE_ITEM: ocp.StandardCheckpointHandler(),
                           SOURCE_MASS_ITEM: ocp.StandardCheckpointHandler(),
                           DATA_ITEM: grain.checkpoint.CheckpointHandler()})

    def write_config(self) -> None:
        """Records this run's config; called only once the restore decision is made,
        so a refused run never overwrites the config of the run it refused."""
        if jax.process_index() == 0:
            write_config(self.workdir, self.config)

    def save(self, step: int, state: TrainState, data_iter) -> None:
        args = {PARAMS_ITEM: ocp.args.StandardSave(state.params),
                TRAIN_STATE_ITEM: ocp.args.StandardSave(_rest_of_state(state))}
        if state.source_mass is not None:
            args[SOURCE_MASS_ITEM] = ocp.args.StandardSave({"mass": state.source_mass})
        if data_iter is not None:
            args[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def _step_dir(self, step: int):
        return self.workdir / CHECKPOINTS / str(step)

    def _quarantine(self, steps) -> None:
        """Moves steps proven unreadable to WORKDIR/quarantine/ so training can redo them.

        Collective: every process calls it with the same (agreed) ``steps``, so every
        process takes part in the same barrier, or none does."""
        if not steps:
            return
        if jax.process_index() == 0:
            qdir = self.workdir / QUARANTINE
            qdir.mkdir(parents=True, exist_ok=True)
            for step in steps:
                dst = qdir / f"{step}-{int(time.time())}"
                self._step_dir(step).rename(dst)
                print(f"moved unreadable checkpoint step {step} to {dst}", flush=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("cbm_lm_checkpoint_quarantine")
        self.manager.reload()

    @staticmethod
    def _agree(ok: int) -> list[int]:
        """Every process's outcome code for the step they all just tried (a collective
        that every process calls the same number of times, in the same order)."""
        if jax.process_count() == 1:
            return [ok]
        from jax.experimental import multihost_utils
        codes = multihost_utils.process_allgather(np.asarray(ok, np.int32))
        return [int(c) for c in np.asarray(codes).reshape(-1)]

    @staticmethod
    def _reason(local: str | None, codes: list[int]) -> str:
        """Why a step was given up: this process's error, or which processes failed."""
        if len(codes) == 1:
            return local
        failed = [p for p, c in enumerate(codes) if c == _FAILED]
        return (local + f" (processes {failed} failed)") if local else \
            f"process(es) {failed} could not read it"

    def _catch_up_restore_barrier(self) -> None:
        """A restore that failed on this process skipped the barrier orbax's
        Checkpointer.restore ends with, where the processes that did read the step are
        waiting; meet them there so that the collectives stay paired.

        Read failures (a missing/unfinalized step, a handler's read) all happen before
        that barrier. Its key is orbax's: 'Checkpointer:restore' with the checkpointer's
        own prefix (None for a synchronous one, '' for an async one; orbax 0.12). A
        different key would not hang silently: jax's sync_global_devices compares the
        keys' hashes across processes and raises on a mismatch.
        """
        if jax.process_count() == 1:
            return
        from orbax.checkpoint._src.multihost import multihost as ocp_multihost
        prefix = getattr(self.manager._checkpointer, "_barrier_sync_key_prefix", None)
        ocp_multihost.sync_global_processes(
            ocp_multihost.unique_barrier_key("Checkpointer:restore", prefix=prefix))

    def _refuse_params_only(self, step: int) -> None:
        if not (self._step_dir(step) / TRAIN_STATE_ITEM).exists():
            raise CheckpointError(
                f"{self._step_dir(step)} holds params only (no {TRAIN_STATE_ITEM}: e.g. written "
                f"by tools/import_steerling.py or tools/init_checkpoint.py), so it cannot be "
                f"resumed. To fine-tune from it, pass --init_from={self.workdir} with a new, "
                f"empty --workdir.")

    def _has_mass(self, step: int, abstract_state: TrainState) -> bool:
        return (abstract_state.source_mass is not None
                and (self._step_dir(step) / SOURCE_MASS_ITEM).exists())

    def _check_fits(self, step: int, abstract_state: TrainState) -> None:
        """Raises CheckpointMismatchError if step's saved tree differs from the target."""
        meta = self.manager.item_metadata(step)
        target = {PARAMS_ITEM: abstract_state.params,
                  TRAIN_STATE_ITEM: _rest_of_state(abstract_state)}
        if self._has_mass(step, abstract_state):
            target[SOURCE_MASS_ITEM] = {"mass": abstract_state.source_mass}
        saved = {name: getattr(meta[name], "tree", meta[name]) for name in target}
        diffs = tree_differences(saved, target)
        if not diffs:
            return
        try:
            fields = config_differences(read_config(self.workdir), self.config)
        except CheckpointError as e:
            fields = [f"(cannot compare configs: {e})"]
        shown = "\n  ".join(diffs[:20]) + (f"\n  ... and {len(diffs) - 20} more"
                                           if len(diffs) > 20 else "")
        cause = ("\n  ".join(fields) if fields else
                 "(no config field differs from the saved config.json)")
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {self.workdir / CHECKPOINTS} does not fit the model and "
            f"optimizer this config describes; refusing to restore (nothing was moved or "
            f"deleted).\nDiffering leaves (saved vs wanted):\n  {shown}\n"
            f"Config fields that differ from {self.workdir / 'config.json'} (the likely cause; "
            f"drop the override to resume, or use a new --workdir, with --init_from for the "
            f"params):\n  {cause}")

    def _check_data_order(self) -> None:
        """Refuses to restore the data iterator into a pipeline that reads the corpus in
        another order (the saved position would then skip or repeat documents silently)."""
        try:
            saved = read_config(self.workdir).data
        except CheckpointError:
            return                                   # no config.json to compare against
        def plain(v):
            return v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v
        diffs = [f"data.{k}: saved {plain(saved.get(k))!r}, now {plain(self.config.data.get(k))!r}"
                 for k in DATA_ORDER_FIELDS       # a field the saved config predates: unknown
                 if k in saved and plain(saved.get(k)) != plain(self.config.data.get(k))]
        if diffs:
            raise CheckpointMismatchError(
                f"{self.workdir}: the data pipeline differs from the one its checkpoints' "
                f"iterator state was saved in, so resuming would skip or repeat data; refusing "
                "(nothing was moved or deleted):\n  " + "\n  ".join(diffs) + "\nDrop the "
                "override to resume, or start a new --workdir (--init_from for the params).")

    def _restored_mass(self, restored, has_mass: bool, step: int, abstract_state: TrainState):
        target = abstract_state.source_mass
        if target is None:
            return None
        if has_mass:
            return restored[SOURCE_MASS_ITEM]["mass"]
        print(f"checkpoint step {step} predates the source mass: it restarts at zero (the "
              f"provenance source distribution counts only the steps from here)", flush=True)
        return jax.device_put(np.zeros(target.shape, target.dtype), target.sharding)

    def restore_latest(self, abstract_state: TrainState, data_iter):
        """Restores the newest usable step into ``abstract_state``'s shardings.

        Returns (state, step) or (None, None) when there is no checkpoint.
        ``abstract_state`` leaves are ShapeDtypeStructs with NamedShardings.
        Raises CheckpointMismatchError / CheckpointError (see the module
        docstring), leaving the directory as it was.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        unreadable = {}
        for i, step in enumerate(steps):
            self._refuse_params_only(step)
            # 1. the saved tree: fits (OK), does not fit (MISMATCH), unreadable (FAILED);
            #    agreed before anyone reads data, so all or none enter the restore below.
            mismatch, reason = None, None
            try:
                self._check_fits(step, abstract_state)
            except CheckpointMismatchError as e:
                mismatch = e
            except Exception as e:  # noqa: BLE001 - metadata unreadable: try an older step
                reason = f"metadata: {type(e).__name__}: {str(e)[:300]}"
            codes = self._agree(_MISMATCH if mismatch else _FAILED if reason else _OK)
            if _MISMATCH in codes:
                if i == 0 or not unreadable:
                    raise mismatch or CheckpointMismatchError(
                        f"checkpoint step {step} in {self.workdir / CHECKPOINTS} does not fit "
                        f"the model and optimizer this config describes on processes "
                        f"{[p for p, c in enumerate(codes) if c == _MISMATCH]} (their logs "
                        f"name the leaves); refusing to restore (nothing was moved or "
                        f"deleted)")
                # An older step of another shape: the newer ones are not proven bad.
                break
            if _FAILED in codes:
                unreadable[step] = self._reason(reason, codes)
                _warn(f"checkpoint step {step} in {self.workdir / CHECKPOINTS} could not be "
                      f"restored ({unreadable[step]}); trying an older step")
                continue
            # 2. the data: every process reads its part; the step is taken only if all did.
            args = {PARAMS_ITEM: ocp.args.StandardRestore(abstract_state.params),
                    TRAIN_STATE_ITEM: ocp.args.StandardRestore(_rest_of_state(abstract_state))}
            has_mass = self._has_mass(step, abstract_state)
            if has_mass:
                args[SOURCE_MASS_ITEM] = ocp.args.StandardRestore(
                    {"mass": abstract_state.source_mass})
            if data_iter is not None:
                self._check_data_order()
                args[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iter)
            restored = None
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**args))
            except Exception as e:  # noqa: BLE001 - any read failure: try the previous step
                reason = f"{type(e).__name__}: {str(e)[:300]}"
                self._catch_up_restore_barrier()
            codes = self._agree(_FAILED if reason else _OK)
            if _FAILED in codes:
                # A process that did read the step drops it too (its data iterator is
                # overwritten by the older step's restore): one step for all processes.
                restored = None
                unreadable[step] = self._reason(reason, codes)
                _warn(f"checkpoint step {step} in {self.workdir / CHECKPOINTS} could not be "
                      f"restored ({unreadable[step]}); trying an older step")
                continue
            # Every process restored this older step from the same storage: the newer
            # failures are the steps'. `unreadable` is the same on every process (built
            # from agreed outcomes only), so all take part in the same quarantine barrier.
            self._quarantine(sorted(unreadable))
            rest = restored[TRAIN_STATE_ITEM]
            state = TrainState(step=rest["step"], params=restored[PARAMS_ITEM],
                               opt_state=rest["opt_state"], rng=rest["rng"],
                               skipped=rest["skipped"],
                               source_mass=self._restored_mass(restored, has_mass, step,
                                                               abstract_state))
            return state, step
        if steps:
            reasons = "\n  ".join(f"step {s}: {r}" for s, r in unreadable.items())
            raise CheckpointError(
                f"none of the checkpoints {steps} in {self.workdir / CHECKPOINTS} could be "
                f"restored; nothing was moved or deleted (if the storage was unavailable, rerun "
                f"the same command):\n  {reasons}")
        return None, None
