"""Runs a cbm_lm checkpoint's forward pass in float32 and dumps what it produced.

  python tools/dump_forward.py --checkpoint CKPT_DIR --input_ids IDS.npy --out OUT.npz [--step N]

IDS.npy: integer token ids [B,T], each in [0, vocab_size). OUT.npz holds

  logits               [B,T,V] float32
  known_topk_indices   [B,T,k] int32    known top-k concept ids, best first
  known_topk_weights   [B,T,k] float32  their sigmoid weights
  unknown_topk_indices [B,T,k'] int32   unknown top-k ([B,T,0] without an unknown head)
  unknown_topk_weights [B,T,k'] float32
  epsilon              [B,T,D] float32  the residual correction (zeros when disabled)

The forward runs in float32 whatever dtype the checkpoint was trained in, so
the dump compares directly with a reference implementation (e.g. Steerling's
PyTorch forward on the same ids).
"""

from __future__ import annotations

import io
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from absl import app, flags, logging  # noqa: E402

_CKPT = flags.DEFINE_string("checkpoint", None, "cbm_lm checkpoint directory (config.json + checkpoints/).")
_IDS = flags.DEFINE_string("input_ids", None, ".npy file of int token ids [B,T].")
_OUT = flags.DEFINE_string("out", None, ".npz file to write.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def _log(msg: str) -> None:
    print(f"[dump_forward] {msg}", flush=True)


def _fail(msg: str):
    sys.exit(f"dump_forward: error: {msg}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
    if not (_CKPT.value and _IDS.value and _OUT.value):
        raise app.UsageError("--checkpoint, --input_ids and --out are required")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from cbm_lm.config import ConfigError
    from cbm_lm.inference.prompts import load_prompt_ids
    from cbm_lm.train.checkpoint import CheckpointError, load_model, read_config

    from etils import epath

    from cbm_lm.atomic_io import write_bytes_atomic

    ckpt, out = _CKPT.value, _OUT.value
    if not epath.Path(ckpt).is_dir():
        _fail(f"{ckpt}: no such checkpoint directory")
    out_dir = epath.Path(out if "://" in out else os.path.abspath(out)).parent
    if not out_dir.is_dir():
        _fail(f"{out}: directory {out_dir} does not exist")
    t0 = time.time()
    _log(f"loading {ckpt}")
    try:
        if "model" not in read_config(ckpt):
            _fail(f"{ckpt}/config.json has no 'model' section: not a cbm_lm checkpoint (a Steerling "
                  "checkpoint must first go through tools/import_steerling.py)")
        model, _ = load_model(ckpt, step=_STEP.value, dtype="float32")
    except (CheckpointError, ConfigError) as e:
        _fail(str(e))
    cfg = model.config
    try:
        ids = load_prompt_ids(_IDS.value, vocab_size=cfg.vocab_size, ndims=(2,))
    except (FileNotFoundError, ValueError) as e:
        _fail(f"--input_ids: {e}")
    b, t = ids.shape
    _log(f"forward on ids [{b},{t}] (vocab {cfg.vocab_size}, d={cfg.d_model}) in float32")

    @nnx.jit
    def forward(m, tokens):
        o = m(tokens)
        res = dict(logits=o.logits, known_topk_indices=o.known.topk_indices,
                   known_topk_weights=o.known.topk_weights, epsilon=o.epsilon)
        if o.unknown is not None:
            res.update(unknown_topk_indices=o.unknown.topk_indices,
                       unknown_topk_weights=o.unknown.topk_weights)
        return res

    res = {k: np.asarray(jax.device_get(v)) for k, v in forward(model, jnp.asarray(ids)).items()}
    if "unknown_topk_indices" not in res:
        res["unknown_topk_indices"] = np.zeros((b, t, 0), np.int32)
        res["unknown_topk_weights"] = np.zeros((b, t, 0), np.float32)
    res = {k: v.astype(np.int32 if "indices" in k else np.float32) for k, v in res.items()}
    buf = io.BytesIO()
    np.savez(buf, **res)
    write_bytes_atomic(out, buf.getvalue())     # tmp + rename; local or gs:// (etils.epath)
    for k in sorted(res):
        _log(f"  {k:<22} {list(res[k].shape)} {res[k].dtype}")
    _log(f"done in {time.time() - t0:.1f}s: {out}")


if __name__ == "__main__":
    app.run(main)
