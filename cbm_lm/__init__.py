"""cbm_lm: concept-bottleneck language models in JAX/Flax NNX."""

from cbm_lm.backend import prefer_cpu_without_accelerator as _prefer_cpu

__version__ = "0.1.0"

_prefer_cpu()
