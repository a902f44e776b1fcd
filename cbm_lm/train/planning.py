"""Static planning: parameter counts and FLOPs per token (no allocation).

It needs the model (abstract_lm), so it lives in train/, its user, not in
parallel/ (the model imports parallel/; DESIGN.md section 1). Chip tables are
in parallel/devices.py, per-device memory in memory_plan.py and the compile
check of the real sharded train step in compile_check.py; tools/plan.py prints
all of them.
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


def layer_forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """One block's forward matmul FLOPs per token: q,k,v,o and SwiGLU projections
    2 (D H hd + 2 D G hd + H hd D + 3 D F), plus scores and mixing 2 x 2 T H hd."""
    d, f, h, g = cfg.d_model, cfg.mlp_dim, cfg.n_heads, cfg.n_kv_heads
    hd = cfg.resolved_head_dim
    return float(2 * (d * h * hd + 2 * d * g * hd + h * hd * d + 3 * d * f)
                 + 2 * 2 * seq_len * h * hd)


def backbone_forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """The blocks and the tied LM head without the concept layer: n_layers x layer + 2 V D."""
    return float(cfg.n_layers * layer_forward_flops_per_token(cfg, seq_len)
                 + 2 * cfg.vocab_size * cfg.d_model)


def _concept_heads_forward_flops_per_token(cfg: ModelConfig) -> float:
    """The known head's logits over all C_k concepts plus its k gathered rows, and the
    factorized unknown head (forward_flops_per_token's concept part)."""
    d = cfg.d_model
    cc = cfg.concepts
    known = 2 * (cc.n_known * d + 2 * cc.known_topk * d)
    unknown = 0
    if cc.use_unknown:
        k_u = cc.unknown_topk or cc.n_unknown
        q_dim = cc.unknown_rank or d
        unknown = 2 * (cc.n_unknown * q_dim + 2 * k_u * q_dim)
        if cc.unknown_rank:
            unknown += 2 * 2 * d * cc.unknown_rank
    return float(known + unknown)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Matmul FLOPs of one forward pass per token (2 per multiply-add).

    Counts the dense projections, the attention scores and mixing over the
    full [T,T] (the mask does not skip work in the dense kernel), the LM head,
    the known head's logits over all C_k concepts (the streaming top-k scores
    every concept) plus its k gathered rows, and the factorized unknown head.
    One stream; two-stream diffusion is ``step_forward_flops_per_token``.
    """
    return (backbone_forward_flops_per_token(cfg, seq_len)
            + _concept_heads_forward_flops_per_token(cfg))


def step_forward_flops_per_token(cfg: ModelConfig, seq_len: int, *,
                                 two_stream: bool = False) -> float:
    """Forward matmul FLOPs of the train step per data token (``seq_len`` data tokens a row).

    One stream: ``forward_flops_per_token``. Two-stream diffusion (rows [noisy | clean],
    train/losses.py) runs every block and both concept heads on 2 model tokens per data
    token, but unembeds only the noisy stream (the LM head once), and its attention
    (model/attention_kernels.two_stream_attention) computes clean -> clean [T,T] and
    noisy -> clean [T,T] plus a noisy band of 3 x block_size keys, not [2T,2T]:
      2 (layer projections + concept heads) + 2 V D
      + n_layers x 2 x 2 H hd (2T + 3 block_size)
    """
    if not two_stream:
        return forward_flops_per_token(cfg, seq_len)
    h, hd = cfg.n_heads, cfg.resolved_head_dim
    proj = layer_forward_flops_per_token(cfg, 0)            # the projections alone
    attn = 2 * 2 * h * hd * (2 * seq_len + 3 * cfg.diffusion_block_size)
    return float(2 * cfg.n_layers * proj + cfg.n_layers * attn
                 + 2 * cfg.vocab_size * cfg.d_model
                 + 2 * _concept_heads_forward_flops_per_token(cfg))


def model_train_flops_per_token(cfg: ModelConfig, seq_len: int, *,
                                two_stream: bool = False) -> float:
    """Model FLOPs of one train step per data token: forward + backward = 3 x forward,
    no rematerialization counted whatever ``cfg.remat`` is. The MFU numerator
    (train/loop.py logs ``mfu`` from it; aot.py's model FLOPs are the same count)."""
    return 3.0 * step_forward_flops_per_token(cfg, seq_len, two_stream=two_stream)


def hardware_train_flops_per_token(cfg: ModelConfig, seq_len: int, *,
                                   two_stream: bool = False) -> float:
    """Hardware FLOPs of one train step per data token: ``model_train_flops_per_token``
    plus the forward recomputed under remat (4 x forward with remat, 3 x without). The
    HFU numerator (train/loop.py logs ``hfu``)."""
    return (_train_multiplier(cfg)
            * step_forward_flops_per_token(cfg, seq_len, two_stream=two_stream))


def _train_multiplier(cfg: ModelConfig) -> float:
    """Forward + backward (2x forward), plus one forward recomputed under remat."""
    return 4.0 if cfg.remat != "none" else 3.0


def backbone_train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """``train_flops_per_token`` of the same model without the concept layer (the
    concept-overhead benchmark's plain step, and the denominator of its FLOP floor)."""
    return backbone_forward_flops_per_token(cfg, seq_len) * _train_multiplier(cfg)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, *, layer_only: bool = False) -> float:
    """Forward + backward (2x forward), plus one forward recomputed under remat
    (of the whole model, or with ``layer_only`` of one block), one stream.

    Hardware FLOPs (what the chip executes; the step-time plan), not model FLOPs:
    under remat this is 4/3 of ``model_train_flops_per_token``, the MFU numerator."""
    fwd = (layer_forward_flops_per_token(cfg, seq_len) if layer_only
           else forward_flops_per_token(cfg, seq_len))
    return fwd * _train_multiplier(cfg)
