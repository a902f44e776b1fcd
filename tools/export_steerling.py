"""Exports a cbm_lm checkpoint as a Steerling checkpoint (config.json + model.safetensors).

  python tools/export_steerling.py --checkpoint CKPT_DIR --out DIR
      [--layout nested|flat] [--dtype float32|bfloat16] [--step N] [--overwrite]

The nested layout is what steerling's SteerlingGenerator.from_pretrained reads
(direct-loading path); flat is the HuggingFace SteerlingConfig layout. The
tensors load into InterpretableCausalDiffusionLM with load_state_dict(strict=True).
"""

from __future__ import annotations

import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from absl import app, flags, logging  # noqa: E402

_CKPT = flags.DEFINE_string("checkpoint", None, "cbm_lm checkpoint directory (config.json + checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Directory to write config.json and model.safetensors to.")
_LAYOUT = flags.DEFINE_enum("layout", "nested", ["nested", "flat"], "config.json layout.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Stored tensor dtype.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing export in --out.")


def _log(msg: str) -> None:
    print(f"[export_steerling] {msg}", flush=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
    if not _CKPT.value or not _OUT.value:
        raise app.UsageError("--checkpoint and --out are required")
    import jax.numpy as jnp

    from cbm_lm.interop import SteerlingFormatError, export_steerling
    from cbm_lm.config import ConfigError
    from cbm_lm.train.checkpoint import CheckpointError, load_model, read_config

    from etils import epath

    ckpt, out = _CKPT.value, _OUT.value
    # epath, as the library reads and writes: the checks hold for gs:// paths too
    if not epath.Path(ckpt).is_dir():
        sys.exit(f"export_steerling: error: --checkpoint {ckpt}: no such checkpoint directory")
    if (epath.Path(out) / "config.json").exists() and not _OVERWRITE.value:
        sys.exit(f"export_steerling: error: --out {out} already holds a config.json; pass "
                 "--overwrite")
    t0 = time.time()
    _log(f"loading {ckpt}" + (f" step {_STEP.value}" if _STEP.value is not None else ""))
    try:
        if "model" not in read_config(ckpt):
            sys.exit(f"export_steerling: error: {ckpt}/config.json has no 'model' section: not a "
                     "cbm_lm checkpoint")
        model, _ = load_model(ckpt, step=_STEP.value, param_dtype=jnp.float32)
    except (CheckpointError, ConfigError) as e:
        sys.exit(f"export_steerling: error: {e}")
    _log(f"writing {out} ({_LAYOUT.value} layout, {_DTYPE.value})")
    try:
        export_steerling(model, out, layout=_LAYOUT.value, dtype=_DTYPE.value)
    except SteerlingFormatError as e:
        sys.exit(f"export_steerling: error: {e}")
    _log(f"done in {time.time() - t0:.1f}s: {out}/config.json, {out}/model.safetensors")


if __name__ == "__main__":
    app.run(main)
