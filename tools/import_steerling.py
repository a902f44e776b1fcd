"""Imports a Steerling checkpoint (config.json + *.safetensors) as a cbm_lm checkpoint.

  python tools/import_steerling.py --src STEERLING_DIR --out CKPT_DIR [--step 0] [--overwrite]

The checkpoint is written to a temporary sibling directory and renamed into
place; --overwrite replaces an existing cbm_lm checkpoint only once the new
one is complete. CKPT_DIR then holds config.json (the full cbm_lm config tree) and the params
under checkpoints/<step>/, loadable with cbm_lm.train.checkpoint.load_model and
usable by every cbm_lm tool (tools/dump_forward.py, attribution, eval).
bfloat16 weights are widened to float32.
"""

from __future__ import annotations

import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from absl import app, flags, logging  # noqa: E402

_SRC = flags.DEFINE_string("src", None, "Steerling checkpoint directory (config.json + *.safetensors).")
_OUT = flags.DEFINE_string("out", None, "cbm_lm checkpoint directory to write.")
_STEP = flags.DEFINE_integer("step", 0, "Step number to save the params under.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing checkpoint in --out.")


def _log(msg: str) -> None:
    print(f"[import_steerling] {msg}", flush=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
    if not _SRC.value or not _OUT.value:
        raise app.UsageError("--src and --out are required")
    import jax
    from flax import nnx

    from etils import epath

    from cbm_lm.atomic_io import replace_dir_atomically
    from cbm_lm.config import ModelConfig
    from cbm_lm.interop import SteerlingFormatError, build_model, read_steerling
    from cbm_lm.train.checkpoint import CHECKPOINTS, save_params

    src = _SRC.value
    out = epath.Path(_OUT.value if "://" in _OUT.value else os.path.abspath(_OUT.value))
    if out.exists() and not out.is_dir():
        sys.exit(f"import_steerling: error: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / CHECKPOINTS).is_dir():
            sys.exit(f"import_steerling: error: {out} is a non-empty directory that is not a "
                     "cbm_lm checkpoint; choose another --out")
        if not _OVERWRITE.value:
            sys.exit(f"import_steerling: error: {out} already holds a checkpoint; pass "
                     "--overwrite to replace it")
    t0 = time.time()
    _log(f"reading {src}")
    try:
        config, params = read_steerling(src)
        cfg = ModelConfig.from_config(config.model)
        cc = cfg.concepts
        _log(f"model: {cfg.n_layers} layers, d={cfg.d_model}, heads={cfg.n_heads}/{cfg.n_kv_heads}, "
             f"vocab={cfg.vocab_size}, norm={cfg.norm_order}, diffusion block={cfg.diffusion_block_size}")
        _log(f"concepts: known={cc.n_known} (top-{cc.known_topk}), unknown={cc.n_unknown} "
             f"(rank {cc.unknown_rank}, top-{cc.unknown_topk})")
        model = build_model(config, params)
    except SteerlingFormatError as e:
        sys.exit(f"import_steerling: error: {e}")
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    _log(f"built the model: {n:,d} params ({time.time() - t0:.1f}s)")
    _log(f"writing {out} (step {_STEP.value})")
    replace_dir_atomically(out, lambda tmp: save_params(tmp, config, model, step=_STEP.value))
    _log(f"done in {time.time() - t0:.1f}s: {out}")


if __name__ == "__main__":
    app.run(main)
