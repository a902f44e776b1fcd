"""Writes a randomly initialized cbm_lm checkpoint for a config.

  python tools/init_checkpoint.py --config gin_configs/tiny.py --out DIR [--config.seed=1]

Useful for smoke tests, exports and the demo before a model is trained.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from cbm_lm.config import ConfigError
from cbm_lm.train.checkpoint import CheckpointError, init_checkpoint

_CONFIG = config_flags.DEFINE_config_file("config", None, "gin_configs/<scale>.py", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Checkpoint directory to write.", required=True)


def main(argv):
    if len(argv) > 1:   # a stray word, e.g. the value of "--config.x False" (write x=False)
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags take --name=value")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required")
    config = _CONFIG.value
    try:
        init_checkpoint(_OUT.value, config)
    except (CheckpointError, ConfigError) as e:
        sys.exit(f"init_checkpoint: error: {e}")
    print(f"wrote random-init checkpoint (seed {config.seed}) to {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
