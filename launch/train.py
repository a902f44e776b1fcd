"""Cluster entry point for training.

  python launch/train.py --config gin_configs/tiny.py --workdir runs/tiny \
      [--config.train.num_steps=1000] [--config.data.dir=...] [--init_from CKPT_DIR]

Multi-host (JAX's multi-controller runtime): pass --coordinator_address,
--num_processes and --process_id (or set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID); on TPU pods jax.distributed.initialize()
discovers them itself (--distributed). Every process runs this same command.
"""

import os
import socket
import sys

import jax
from absl import app, flags, logging

import cbm_lm  # noqa: F401  (pins jax to CPU on hosts with libtpu but no accelerator)
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "gin_configs/<scale>.py",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics, TensorBoard.",
                               required=True)
_COORD = flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                             "host:port of process 0 for jax.distributed.initialize")
_NPROC = flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", "1")),
                              "Number of processes.")
_PID = flags.DEFINE_integer("process_id", int(os.environ.get("JAX_PROCESS_ID", "0")),
                            "This process's index.")
_AUTO = flags.DEFINE_bool("distributed", False,
                          "Call jax.distributed.initialize() with auto-detection (TPU pods, SLURM).")
_INIT_FROM = flags.DEFINE_string(
    "init_from", None, "Checkpoint directory (e.g. from tools/import_steerling.py) whose params "
    "start a fresh run: fine-tuning. Shapes must fit --config; ignored when --workdir already "
    "holds a checkpoint to resume.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "Simulate this many CPU devices (testing).")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv):
    if len(argv) > 1:   # a stray word, e.g. the value of "--config.x False" (write x=False)
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags take --name=value")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config gin_configs/tiny.py")
    if not flags.FLAGS["verbosity"].present:   # orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    if _CPU_DEVICES.value:
        jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
    if _NPROC.value > 1:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORD.value, _NPROC.value, _PID.value)
    elif _AUTO.value:
        jax.distributed.initialize()
    else:
        # One process still starts the runtime: its preemption service is what turns
        # SIGTERM into an agreed save step (cbm_lm/train/loop.py).
        jax.distributed.initialize(f"127.0.0.1:{_free_port()}", 1, 0)
    from cbm_lm.config import ConfigError
    from cbm_lm.data.errors import DataError
    from cbm_lm.train.checkpoint import CheckpointError  # after distributed init
    from cbm_lm.train.loop import train
    try:
        train(_CONFIG.value, _WORKDIR.value, init_from=_INIT_FROM.value)
    except (CheckpointError, ConfigError, DataError) as e:   # the user's to fix: one message
        sys.exit(f"train: error: {e}")


if __name__ == "__main__":
    app.run(main)
