"""Builds the provenance index of a training run, beside its checkpoints.

  python tools/build_provenance_index.py --workdir DIR [--rekey [--rekey_d_p N] [--context C]]
      [--gradient] [--corpus_dir CORPUS]

Indexes the training-time key store (DIR/provenance/keys/logged). With
--rekey, or when the run logged no keys, every training chunk is first keyed
again with the checkpoint (--step, default the latest) and that store is
indexed too; queries use the re-keyed index then. A re-keyed index already built
from the same step, corpus and re-keying config (by the eval binary, or an earlier
--rekey) is reused, and stays the default, unless --rekey asks for a new pass.
--context / --rekey_d_p set how re-keying keys: on a run with a training-time key
store they need --rekey (or an index already re-keyed with them), else they are a
usage error, since nothing would be re-keyed with them.
See cbm_lm/provenance/build.py.
--gradient also builds the projected-gradient reference (cbm_lm/provenance/gradient.py).
"""

import json
import sys

from absl import app, flags, logging

from cbm_lm.config import ConfigError
from cbm_lm.data.corpus import Corpus
from cbm_lm.provenance.build import UnusedRekeyOverrides, build_index, corpus_dir
from cbm_lm.train.checkpoint import CheckpointError, load_model_and_step

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (checkpoints/, config.json).",
                               required=True)
_REKEY = flags.DEFINE_bool("rekey", False, "Re-key every training chunk with the checkpoint.")
_CORPUS = flags.DEFINE_string("corpus_dir", None, "Corpus (default: the run's data.dir).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_GRADIENT = flags.DEFINE_bool("gradient", False, "Also build the projected-gradient reference "
                              "(one backward pass per training chunk; small models).")
_GRADIENT_DIM = flags.DEFINE_integer("gradient_dim", 1024, "CountSketch dimension of the "
                                     "gradient reference.")
_CONTEXT = flags.DEFINE_enum("context", None, ["chunk", "document"],
                             "Override provenance.rekey_context for re-keying (with --rekey, "
                             "or on a run that logged no keys).")
_REKEY_D_P = flags.DEFINE_integer("rekey_d_p", None, "Override provenance.rekey_d_p: the key "
                                  "width of the re-keyed index (fixed head only; 0 = d_p; with "
                                  "--rekey, or on a run that logged no keys).")


def main(argv):
    if len(argv) > 1:   # a stray word, e.g. the value of "--config.x False" (write x=False)
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags take --name=value")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    # the step of the params restored: a run training beside it may commit a newer one
    try:
        model, config, step = load_model_and_step(_WORKDIR.value, step=_STEP.value)
        # --corpus_dir is strict: a typo fails naming it, never falls back to a look-alike
        cdir = corpus_dir(config, _WORKDIR.value, _CORPUS.value)
        corpus = Corpus(cdir)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        sys.exit(f"build_provenance_index: error: {e}")
    config.data.dir = cdir
    overrides = {k: v for k, v in (("rekey_context", _CONTEXT.value),
                                   ("rekey_d_p", _REKEY_D_P.value)) if v is not None}
    try:
        built = build_index(_WORKDIR.value, model, config, step, rekey=_REKEY.value,
                            rekey_overrides=overrides, corpus=corpus,
                            log=lambda m: print(m, flush=True))
    except UnusedRekeyOverrides as e:
        raise app.UsageError(str(e)) from e
    if _GRADIENT.value:
        from cbm_lm.provenance.build import provenance_config
        from cbm_lm.provenance.gradient import build_gradient_index
        idx = build_gradient_index(_WORKDIR.value, model, corpus, provenance_config(config),
                                   k=_GRADIENT_DIM.value, log=lambda m: print(m, flush=True))
        built["gradient"] = idx.meta
    print(json.dumps(built, indent=1))


if __name__ == "__main__":
    app.run(main)
