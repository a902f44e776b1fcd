"""Steerling checkpoint import / export (safetensors + config.json <-> cbm_lm model).

  config, params = read_steerling(src_dir)        # ConfigDict, nested numpy params
  model, config = import_steerling(src_dir)       # a live ConceptBottleneckLM
  export_steerling(model, out_dir)                # config.json + model.safetensors

A Steerling checkpoint directory holds config.json (nested or flat layout, see
steerling_config.py) and one or more *.safetensors files (see
steerling_weights.py for the tensor mapping). The exported directory loads in
steerling with ``InterpretableCausalDiffusionLM(...).load_state_dict(strict=True)``
and with ``SteerlingGenerator.from_pretrained``'s direct-loading path.

The tools (tools/import_steerling.py, tools/export_steerling.py) add the orbax
side through cbm_lm.train.checkpoint; this module knows no checkpoint format
but Steerling's.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors.numpy
from etils import epath
from flax import nnx

from cbm_lm.atomic_io import write_bytes_atomic, write_text_atomic
from cbm_lm.config import ModelConfig
from cbm_lm.interop.steerling_config import (
    SteerlingFormatError, model_to_steerling_config, read_steerling_config, split_steerling_config,
    steerling_to_config)
from cbm_lm.interop.steerling_weights import (
    LM_HEAD, TOK_EMB, load_safetensors_dir, params_to_steerling, steerling_to_params,
    strip_wrapper_prefix)
from cbm_lm.model import ConceptBottleneckLM, abstract_lm

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16}


def read_steerling(src_dir: str | os.PathLike) -> tuple[ml_collections.ConfigDict, dict]:
    """Reads a Steerling checkpoint dir -> (cbm_lm ConfigDict, nested float32 numpy params)."""
    raw = read_steerling_config(src_dir)
    state = strip_wrapper_prefix(load_safetensors_dir(src_dir))
    vocab_size = None
    _, _, other = split_steerling_config(raw)
    if other.get("vocab_size") is None:
        emb = state.get(TOK_EMB, state.get(LM_HEAD))
        if emb is None:
            raise SteerlingFormatError(
                f"{src_dir}: config.json has no 'vocab_size' and neither '{TOK_EMB}' nor "
                f"'{LM_HEAD}' is present to infer it from")
        vocab_size = int(emb.shape[0])
    try:
        config = steerling_to_config(raw, vocab_size=vocab_size)
    except SteerlingFormatError as e:
        raise SteerlingFormatError(f"{os.path.join(os.fspath(src_dir), CONFIG_FILE)}: {e}") from e
    model_cfg = ModelConfig.from_config(config.model)
    try:
        params = steerling_to_params(state, model_cfg, consume=True)
    except SteerlingFormatError as e:
        raise SteerlingFormatError(f"{src_dir}: {e}") from e
    return config, params


def build_model(config: ml_collections.ConfigDict, params: dict) -> ConceptBottleneckLM:
    """A ConceptBottleneckLM of ``config.model`` holding ``params`` (nested arrays).

    The module is built abstractly (no random init), then filled; every leaf of
    the model must be present in ``params`` with its exact shape.
    """
    cfg = ModelConfig.from_config(config.model)
    graphdef, abs_params = abstract_lm(cfg)
    want = nnx.to_pure_dict(abs_params)

    def fill(path, leaf):
        node = params
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        for k in path:
            key = getattr(k, "key", getattr(k, "idx", k))
            if not isinstance(node, dict) or key not in node:
                raise SteerlingFormatError(f"no value for model param '{name}'")
            node = node[key]
        if tuple(node.shape) != tuple(leaf.shape):
            raise SteerlingFormatError(
                f"model param '{name}': got shape {list(node.shape)}, expected {list(leaf.shape)}")
        return jnp.asarray(node, dtype=leaf.dtype)

    filled = jax.tree_util.tree_map_with_path(fill, want)
    nnx.replace_by_pure_dict(abs_params, filled)
    return nnx.merge(graphdef, abs_params)


def import_steerling(src_dir: str | os.PathLike) -> tuple[ConceptBottleneckLM, ml_collections.ConfigDict]:
    """Steerling checkpoint dir -> (ConceptBottleneckLM in float32, ConfigDict)."""
    config, params = read_steerling(src_dir)
    return build_model(config, params), config


def export_steerling(model: ConceptBottleneckLM, out_dir: str | os.PathLike, *,
                     layout: str = "nested", dtype: str = "float32") -> dict:
    """Writes ``out_dir/model.safetensors`` then ``out_dir/config.json``; returns the config dict.

    Each file is written to a temporary name and renamed, weights first, so a
    config.json in ``out_dir`` always describes complete weights.
    layout: 'nested' (steerling's from_pretrained) or 'flat' (HuggingFace).
    dtype: 'float32' or 'bfloat16' for the stored tensors.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    cfg: ModelConfig = model.config
    st_config = model_to_steerling_config(cfg, layout=layout)
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), dtype=np.float32),
                          nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    tensors = params_to_steerling(params, cfg, dtype=EXPORT_DTYPES[dtype])
    out_dir = epath.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Stale shards from an earlier export would be merged in by readers.
    for stale in out_dir.iterdir():
        if stale.name.endswith(".safetensors") and stale.name != WEIGHTS_FILE:
            raise SteerlingFormatError(f"{out_dir}: holds another safetensors file "
                                       f"'{stale.name}'; export into an empty directory")
    write_bytes_atomic(out_dir / WEIGHTS_FILE,
                       safetensors.numpy.save(tensors, metadata={"format": "pt"}))
    write_text_atomic(out_dir / CONFIG_FILE, json.dumps(st_config, indent=2) + "\n")
    return st_config
