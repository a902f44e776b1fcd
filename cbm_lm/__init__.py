"""cbm_lm: concept-bottleneck language models in JAX/Flax NNX."""

from cbm_lm.backend import prefer_cpu_without_accelerator as _prefer_cpu

__version__ = "0.1.0"

_prefer_cpu()


def __getattr__(name):
    # ``from cbm_lm import Explainer`` loads the API (and jax) only when asked for.
    if name in ("Explainer", "Generation", "ChunkExplanation"):
        from cbm_lm import api
        return getattr(api, name)
    raise AttributeError(f"module 'cbm_lm' has no attribute {name!r}")
