"""Checkpoint interop: Steerling (PyTorch, safetensors) <-> cbm_lm (DESIGN.md section 1)."""

from cbm_lm.interop.steerling import (  # noqa: F401
    build_model, export_steerling, import_steerling, read_steerling)
from cbm_lm.interop.steerling_config import (  # noqa: F401
    SteerlingFormatError, model_to_steerling_config, steerling_to_config)

__all__ = ["SteerlingFormatError", "build_model", "export_steerling", "import_steerling",
           "model_to_steerling_config", "read_steerling", "steerling_to_config"]
