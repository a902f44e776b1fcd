"""Keep JAX off the TPU runtime on hosts that have no TPU.

libtpu is an optional extra (``pip install '.[tpu]'``) so that
tools/aot_compile.py can compile for TPU topologies on a CPU-only machine
(``jax.experimental.topologies`` works under ``JAX_PLATFORMS=cpu``). Once it
is installed, jax initializes the TPU backend in every process it is not told
otherwise; on a host without TPU chips that costs about 0.3 s per process,
prints libtpu's host-discovery warnings, and may leave /tmp/libtpu_lockfile
behind. ``prefer_cpu_without_accelerator`` pins jax to CPU when
JAX_PLATFORMS is unset, libtpu is installed, and neither a TPU (Google PCI
vendor id, /dev/accel*, /dev/vfio) nor a GPU is attached; anywhere else it
changes nothing.
"""

from __future__ import annotations

import glob
import importlib.util
import os

GOOGLE_PCI_VENDOR = "0x1ae0"


def _tpu_attached() -> bool:
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return True
    for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(path) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def _gpu_attached() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/kfd")


def prefer_cpu_without_accelerator() -> bool:
    """Sets jax_platforms=cpu where the TPU backend could only fail; True if it did."""
    if any(os.environ.get(k) for k in ("JAX_PLATFORMS", "JAX_FORCE_TPU_INIT", "TPU_NAME")):
        return False
    if importlib.util.find_spec("libtpu") is None or _tpu_attached() or _gpu_attached():
        return False
    import jax
    if jax.config.jax_platforms:
        return False
    jax.config.update("jax_platforms", "cpu")
    return True
