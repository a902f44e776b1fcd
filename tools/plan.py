"""Prints the static plan of a config: parameter count (and, later, memory per
device, FLOPs per token, expected step time, a compile check).

  python tools/plan.py --config gin_configs/steerling_8b.py [--config.model.n_layers=4]

Shapes come from nnx.eval_shape: nothing is allocated, so the 8B config
plans on a laptop.
"""

from absl import app, flags
from ml_collections import config_flags

from cbm_lm.config import ModelConfig
from cbm_lm.parallel.planning import count_params, params_by_component

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a gin_configs/<scale>.py file.",
                                          lock_config=True)


def main(argv):
    del argv
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config gin_configs/tiny.py")
    cfg = ModelConfig.from_config(_CONFIG.value.model)
    total = count_params(cfg)
    print(f"config: {flags.FLAGS['config'].config_filename}")
    print(f"params: {total}")
    for group, n in sorted(params_by_component(cfg).items()):
        print(f"  {group:<13} {n:>15,d}  ({100 * n / total:5.1f}%)")


if __name__ == "__main__":
    app.run(main)
