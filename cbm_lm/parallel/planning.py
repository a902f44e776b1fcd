"""Static planning: parameter counts, FLOPs per token, device tables (no allocation).

Per-device memory lives in memory_plan.py and the compile check of the real
sharded train step in compile_check.py; tools/plan.py prints all three.
"""

from __future__ import annotations

import math
from collections import defaultdict

import jax
from flax import nnx

from cbm_lm.config import ModelConfig
from cbm_lm.model import abstract_lm


def abstract_params(cfg: ModelConfig) -> nnx.State:
    """The model's param State as ShapeDtypeStructs, via nnx.eval_shape."""
    return abstract_lm(cfg)[1]


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


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Matmul FLOPs of one forward pass per token (2 per multiply-add).

    Counts the dense projections, the attention scores and mixing over the
    full [T,T] (the mask does not skip work in the dense kernel), the LM head,
    the known head's logits over all C_k concepts (the streaming top-k scores
    every concept) plus its k gathered rows, and the factorized unknown head.
    """
    d, f, h, g = cfg.d_model, cfg.mlp_dim, cfg.n_heads, cfg.n_kv_heads
    hd = cfg.resolved_head_dim
    per_layer = 2 * (d * h * hd + 2 * d * g * hd + h * hd * d + 3 * d * f)
    per_layer += 2 * 2 * seq_len * h * hd
    cc = cfg.concepts
    known = 2 * (cc.n_known * d + 2 * cc.known_topk * d)
    unknown = 0
    if cc.use_unknown:
        k_u = cc.unknown_topk or cc.n_unknown
        q_dim = cc.unknown_rank or d
        unknown = 2 * (cc.n_unknown * q_dim + 2 * k_u * q_dim)
        if cc.unknown_rank:
            unknown += 2 * 2 * d * cc.unknown_rank
    return float(cfg.n_layers * per_layer + 2 * cfg.vocab_size * d + known + unknown)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward (2x forward), plus one forward recomputed under remat."""
    fwd = forward_flops_per_token(cfg, seq_len)
    return fwd * (4.0 if cfg.remat != "none" else 3.0)


# Peak dense bf16 FLOP/s per chip, by jax device_kind prefix (vendor data sheets).
# Prefixes are tried in order: jax names a v5e "TPU v5 lite" and a v5p "TPU v5",
# so the lite entries come before the bare "TPU v5".
PEAK_FLOPS = {
    "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12,
    "TPU v6": 918e12, "TPU v4": 275e12,
    "NVIDIA H200": 989e12, "NVIDIA H100": 989e12, "NVIDIA A100": 312e12,
    "cpu": 1e11,  # nominal: a few AVX cores; MFU on CPU is only indicative
}

GiB = 1024 ** 3

# High-bandwidth memory per chip, bytes, by the same device_kind prefixes.
HBM_BYTES = {
    "TPU v5p": 95 * GiB, "TPU v5 lite": 16 * GiB, "TPU v5e": 16 * GiB, "TPU v5": 95 * GiB,
    "TPU v6": 32 * GiB, "TPU v4": 32 * GiB,
    "NVIDIA H200": 141 * GiB, "NVIDIA H100": 80 * GiB, "NVIDIA A100": 80 * GiB,
}


def _lookup(table: dict, device_kind: str):
    for prefix, value in table.items():
        if device_kind.lower().startswith(prefix.lower()):
            return value
    return None


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float:
    if override:
        return override
    found = _lookup(PEAK_FLOPS, device_kind)
    return PEAK_FLOPS["cpu"] if found is None else found


def hbm_bytes_per_device(device_kind: str) -> int | None:
    """HBM bytes of one chip of ``device_kind``; None when not in the table (e.g. cpu)."""
    return _lookup(HBM_BYTES, device_kind)
