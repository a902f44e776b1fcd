"""Static planning: parameter counts from abstract shapes (no allocation).

Later extended with per-device memory, FLOPs per token and compile checks.
"""

from __future__ import annotations

import math
from collections import defaultdict

import jax
from flax import nnx

from cbm_lm.config import ModelConfig
from cbm_lm.model import ConceptBottleneckLM


def abstract_params(cfg: ModelConfig) -> nnx.State:
    """The model's param State as ShapeDtypeStructs, via nnx.eval_shape."""
    abstract = nnx.eval_shape(lambda: ConceptBottleneckLM(cfg, rngs=nnx.Rngs(0)))
    return nnx.state(abstract, nnx.Param)


def count_params(cfg: ModelConfig) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg)))


def params_by_component(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts grouped as embedding / blocks / known_head / unknown_head / other."""
    out: dict[str, int] = defaultdict(int)
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params(cfg)):
        keys = [getattr(p, "key", getattr(p, "idx", None)) for p in path]
        if "blocks" in keys:
            group = "blocks"
        elif "known_head" in keys:
            group = "known_head"
        elif "unknown_head" in keys:
            group = "unknown_head"
        elif "embedding" in keys or "lm_head" in keys:
            group = "embedding"
        else:
            group = "other"
        out[group] += math.prod(leaf.shape)
    return dict(out)
