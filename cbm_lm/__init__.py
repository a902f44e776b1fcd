"""cbm_lm: concept-bottleneck language models in JAX/Flax NNX."""

__version__ = "0.1.0"
