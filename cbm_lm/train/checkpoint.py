"""Checkpoint layout and params-only save / restore.

A checkpoint directory (a training workdir, or the output of
tools/import_steerling.py) holds:

  CKPT_DIR/config.json                 the full config tree (ml_collections)
  CKPT_DIR/checkpoints/<step>/params   orbax (tensorstore) arrays of the model params
  CKPT_DIR/checkpoints/<step>/source_mass  {"mass": [C_pad,S]}: ``restore_source_mass``
  CKPT_DIR/checkpoints/<step>/...      further items written by the trainer

Restoring needs no training code: ``load_model`` builds the abstract model
from the saved config, restores only the ``params`` item straight into the
requested shardings, and merges it into a live module.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from cbm_lm.atomic_io import replace_dir_atomically
from cbm_lm.config import ModelConfig, ProvenanceConfig, logical_rules_from_config
from cbm_lm.model import abstract_lm
from cbm_lm.parallel.sharding import state_shardings
from cbm_lm.train.restore_check import config_differences, tree_differences
from cbm_lm.train.layer_stack import per_layer_count, per_layer_targets, stack_restored

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
PARAMS_ITEM = "params"
SOURCE_MASS_ITEM = "source_mass"   # the trainer's concept x source mass (train/chunk_keys.py)


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete, or does not fit the model."""


def write_config(ckpt_dir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
    """Writes config.json atomically (tmp file + rename)."""
    path = epath.Path(ckpt_dir)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    tmp.replace(path / CONFIG_FILE)


def read_config(ckpt_dir: str | os.PathLike) -> ml_collections.ConfigDict:
    path = epath.Path(ckpt_dir) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: no config.json; is {ckpt_dir} a cbm_lm checkpoint directory?")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def absolute(path: str | os.PathLike) -> epath.Path:
    """Orbax wants absolute paths; object-store URLs (gs://...) already are."""
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def params_manager(ckpt_dir: str | os.PathLike, **options: Any) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        absolute(ckpt_dir) / CHECKPOINTS,
        options=ocp.CheckpointManagerOptions(create=True, **options),
        item_names=(PARAMS_ITEM,),
        item_handlers={PARAMS_ITEM: ocp.StandardCheckpointHandler()})


def restore_params(ckpt_dir: str | os.PathLike, targets: dict, *, step: int | None = None,
                   config: ml_collections.ConfigDict | None = None) -> tuple[dict, int]:
    """Restores the ``params`` item of ``ckpt_dir`` into ``targets`` -> (params, step).

    targets: pure dict of ShapeDtypeStructs (with shardings); dtypes are cast.
    Params saved per layer (before the blocks were stacked) are stacked on the
    way in (train/layer_stack.py).
    The saved shapes are compared with the targets first; a mismatch raises
    CheckpointError naming the differing leaves and, given ``config`` (the
    config the targets come from), the model fields that differ from the
    checkpoint's config.json.
    """
    with params_manager(ckpt_dir, read_only=True) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{absolute(ckpt_dir) / CHECKPOINTS}: no checkpoint steps found")
        try:
            saved = mngr.item_metadata(step)[PARAMS_ITEM]
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"{ckpt_dir}: step {step} has no readable params: {e}") from e
        saved = getattr(saved, "tree", saved)
        n_layers = per_layer_count(saved)   # written before the blocks were stacked
        wanted = per_layer_targets(targets, n_layers) if n_layers else targets
        diffs = tree_differences(saved, wanted, dtypes=False)
        if diffs:
            fields = ([f for f in config_differences(read_config(ckpt_dir), config)
                       if f.startswith("--config.model.")] if config is not None else [])
            raise CheckpointError(
                f"{ckpt_dir}: the params of step {step} do not fit the model "
                f"({len(diffs)} differing leaves, saved vs wanted):\n  " + "\n  ".join(diffs[:20])
                + (f"\nmodel fields that differ from {ckpt_dir}/{CONFIG_FILE}:\n  "
                   + "\n  ".join(fields) if fields else ""))
        restored = mngr.restore(step, args=ocp.args.Composite(
            **{PARAMS_ITEM: ocp.args.StandardRestore(wanted)}))[PARAMS_ITEM]
    if n_layers:
        restored = stack_restored(restored, targets)
    return restored, step


def restore_source_mass(ckpt_dir: str | os.PathLike, step: int | None = None):
    """The trainer's concept x source mass [C_pad,S] (numpy) at ``step`` (default: latest),
    or None when that step has none (written before the trainer kept it, or params only)."""
    mngr = ocp.CheckpointManager(
        absolute(ckpt_dir) / CHECKPOINTS, options=ocp.CheckpointManagerOptions(read_only=True),
        item_names=(SOURCE_MASS_ITEM,),
        item_handlers={SOURCE_MASS_ITEM: ocp.StandardCheckpointHandler()})
    with mngr:
        step = mngr.latest_step() if step is None else step
        if step is None or not (absolute(ckpt_dir) / CHECKPOINTS / str(step)
                                / SOURCE_MASS_ITEM).exists():
            return None
        meta = mngr.item_metadata(step)[SOURCE_MASS_ITEM]
        shape = getattr(meta, "tree", meta)["mass"].shape
        dev = SingleDeviceSharding(jax.devices()[0])
        target = {"mass": jax.ShapeDtypeStruct(shape, jax.numpy.float32, sharding=dev)}
        got = mngr.restore(step, args=ocp.args.Composite(
            **{SOURCE_MASS_ITEM: ocp.args.StandardRestore(target)}))[SOURCE_MASS_ITEM]
    return np.asarray(got["mass"])


def save_params(ckpt_dir: str | os.PathLike, config: ml_collections.ConfigDict,
                model: nnx.Module, step: int = 0, overwrite: bool = False) -> None:
    """Writes the model's params as step ``step``, then config.json.

    config.json is written last, so a directory whose save failed part-way is
    not mistaken for a usable checkpoint (orbax itself commits a step
    atomically by renaming its temporary folder).
    """
    params = nnx.state(model, nnx.Param).to_pure_dict()
    with params_manager(ckpt_dir, enable_async_checkpointing=False) as mngr:
        if step in mngr.all_steps():
            if not overwrite:
                raise CheckpointError(f"{absolute(ckpt_dir) / CHECKPOINTS}: step {step} exists; "
                                      f"pass overwrite=True to replace it")
            mngr.delete(step)
        mngr.save(step, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardSave(params)}),
                  force=True)
        mngr.wait_until_finished()
    write_config(ckpt_dir, config)


def init_checkpoint(ckpt_dir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
    """Writes a random-init checkpoint of ``config`` (seed ``config.seed``) as step 0.

    The config is validated as training validates it, and the model is built as
    load_model rebuilds it (with the learned key head when provenance trains one), so
    the checkpoint always loads. A directory that already holds a run or checkpoint is
    refused: its config.json would be replaced; so is one holding other files. The
    checkpoint is written to a sibling temporary directory and renamed into place, so a
    killed or failed save leaves ``ckpt_dir`` as it was (absent or empty) and a rerun works.
    """
    from cbm_lm.config_validation import validate_config
    from cbm_lm.model import ConceptBottleneckLM
    validate_config(config)
    d = absolute(ckpt_dir)
    held = [n for n in (CONFIG_FILE, CHECKPOINTS) if (d / n).exists()]
    if held:
        raise CheckpointError(f"{d} already holds {' and '.join(held)}; write the random-init "
                              f"checkpoint to a new directory")
    if d.exists() and (not d.is_dir() or any(d.iterdir())):
        raise CheckpointError(f"{d} is a file or a non-empty directory that is not a cbm_lm "
                              f"checkpoint; write the random-init checkpoint to a new or empty "
                              f"directory")
    model = ConceptBottleneckLM(ModelConfig.from_config(config.model),
                                rngs=nnx.Rngs(int(config.seed)),
                                provenance=saved_provenance(config))
    replace_dir_atomically(d, lambda tmp: save_params(tmp, config, model))


def saved_provenance(config: ml_collections.ConfigDict) -> ProvenanceConfig:
    """The provenance section of a saved config.json (fields it predates take their
    defaults; a config without the section trained no key head)."""
    return ProvenanceConfig.from_config(config.get("provenance"))


def load_model(ckpt_dir: str | os.PathLike, *, mesh: Mesh | None = None, rules=None,
               step: int | None = None, param_dtype=None, dtype: str | None = None):
    """Restores (ConceptBottleneckLM, ConfigDict) from ``ckpt_dir``.

    mesh/rules: restore straight into those shardings (default: first device).
    step: which checkpoint (default: the latest). param_dtype: cast on restore.
    dtype: run the model in this dtype whatever it was trained in (params are
    cast to it, the module computes in it), e.g. "float32" to compare with a
    reference implementation; the returned model.config says so.
    """
    model, config, _ = load_model_and_step(ckpt_dir, mesh=mesh, rules=rules, step=step,
                                           param_dtype=param_dtype, dtype=dtype)
    return model, config


def load_model_and_step(ckpt_dir: str | os.PathLike, *, mesh: Mesh | None = None, rules=None,
                        step: int | None = None, param_dtype=None, dtype: str | None = None):
    """``load_model`` -> (model, config, step), step being the one whose params were restored.

    For whatever labels its output with the step (the provenance index): asking the
    checkpoint manager for the latest step a second time can name a newer one, when a
    training run beside it commits a checkpoint in between.
    """
    config = read_config(ckpt_dir)
    model_cfg = ModelConfig.from_config(config.model)
    if dtype is not None:
        model_cfg = model_cfg.replace(dtype=dtype, param_dtype=dtype)
    # A run that trained the learned key head saved its W with the params (model/lm.py).
    graphdef, abs_params = abstract_lm(model_cfg, saved_provenance(config))
    if mesh is None:
        dev = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: dev, abs_params)
    else:
        rules = rules if rules is not None else logical_rules_from_config(config.rules)
        shardings = state_shardings(abs_params, mesh, rules)

    def target(var, sharding):
        return jax.ShapeDtypeStruct(var.shape, param_dtype or var.dtype, sharding=sharding)

    targets = jax.tree.map(target, abs_params.to_pure_dict(), shardings.to_pure_dict())
    restored, step = restore_params(ckpt_dir, targets, step=step)
    nnx.replace_by_pure_dict(abs_params, restored)
    return nnx.merge(graphdef, abs_params), config, int(step)
