"""Typed, validated views of the ml_collections config.

The config files in gin_configs/ return an ``ml_collections.ConfigDict`` (so
``--config.model.d_model=256`` works from any absl CLI). Library code never
reads that dict directly: it takes the frozen dataclasses below, built by
``ModelConfig.from_config(cfg.model)`` and friends, which validate every field
once and name the offending field in the error.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

ATTENTION_KINDS = ("causal", "block_causal")
OBJECTIVES = ("diffusion", "autoregressive")
NORM_ORDERS = ("pre", "post")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config field has a value the library cannot use."""


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config field '{field}': {msg}")


def _as_dict(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, ml_collections.ConfigDict):
        return cfg.to_dict()
    if isinstance(cfg, Mapping):
        return dict(cfg)
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    raise TypeError(f"expected a ConfigDict or mapping, got {type(cfg).__name__}")


def _from_mapping(cls, values: Mapping[str, Any], prefix: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
                f"config section '{prefix}' has unknown field(s) {unknown}; "
                f"known fields: {sorted(names)}")
    return cls(**values)


def round_up(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class ConceptConfig:
    """The concept-rewrite layer (DESIGN.md section 2).

    n_known: supervised concepts C_k; rows are padded to ``pad_multiple``.
    known_topk: concepts kept per token in the known features.
    n_unknown: discovered concepts C_u (0 disables the unknown head).
    unknown_rank: rank r of the factorized unknown head (0 = dense tables).
    unknown_topk: concepts kept per token (None = all, weighted densely).
    block_size: concepts per block of the streaming top-k.
    dense_threshold: at or below this many concepts a head may compute its
        logits densely in one shot; above it, only blockwise.
    epsilon_correction: add epsilon = h - known - unknown so logits equal the
        backbone's when not intervening (Steerling's default).
    """
    n_known: int = 64
    known_topk: int = 8
    known_report_topk: int | None = None  # top-k reported (Steerling's topk when < features k)
    n_unknown: int = 128
    unknown_rank: int = 16
    unknown_topk: int | None = 16
    unknown_report_topk: int | None = None  # None: unknown_topk (or 64 when unknown_topk is None)
    pad_multiple: int = 16
    block_size: int = 4096
    dense_threshold: int = 8192
    epsilon_correction: bool = True
    logit_clip: float = 15.0

    @property
    def n_known_padded(self) -> int:
        return round_up(self.n_known, self.pad_multiple)

    @property
    def n_unknown_padded(self) -> int:
        return round_up(self.n_unknown, self.pad_multiple) if self.n_unknown else 0

    @property
    def use_unknown(self) -> bool:
        return self.n_unknown > 0

    def validate(self, prefix: str = "model.concepts") -> "ConceptConfig":
        _check(self.n_known > 0, f"{prefix}.n_known", f"must be > 0, got {self.n_known}")
        _check(0 < self.known_topk <= self.n_known, f"{prefix}.known_topk",
                      f"must be in [1, n_known={self.n_known}], got {self.known_topk}")
        _check(self.n_unknown >= 0, f"{prefix}.n_unknown", f"must be >= 0, got {self.n_unknown}")
        if self.n_unknown:
            _check(self.unknown_rank >= 0, f"{prefix}.unknown_rank", "must be >= 0")
            _check(self.unknown_topk is None or 0 < self.unknown_topk <= self.n_unknown,
                          f"{prefix}.unknown_topk",
                          f"must be None or in [1, n_unknown={self.n_unknown}], got {self.unknown_topk}")
        _check(self.pad_multiple >= 1, f"{prefix}.pad_multiple", "must be >= 1")
        _check(self.block_size >= 1, f"{prefix}.block_size", "must be >= 1")
        _check(self.logit_clip > 0, f"{prefix}.logit_clip", "must be > 0")
        return self


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Backbone + concept layer. Field names follow DESIGN.md section 2."""
    vocab_size: int = 512
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # None: d_model // n_heads
    mlp_dim: int = 512
    norm_order: str = "pre"
    norm_eps: float = 1e-5
    qk_norm: bool = True
    qkv_clip: float | None = None
    rope_base: float = 500000.0
    use_rope: bool = True
    tie_embeddings: bool = True
    max_seq_len: int = 256
    attention: str = "block_causal"
    diffusion_block_size: int = 16
    objective: str = "diffusion"
    mask_token_id: int | None = None  # the [MASK] id for diffusion; None: vocab_size - 1
    dtype: str = "float32"        # activation / compute dtype
    param_dtype: str = "float32"  # master weights
    init_std: float = 0.02
    remat: str = "none"           # none | block | full (see train/)
    concepts: ConceptConfig = dataclasses.field(default_factory=ConceptConfig)

    @classmethod
    def from_config(cls, cfg: Any) -> "ModelConfig":
        values = _as_dict(cfg)
        concepts = values.pop("concepts", {})
        if not isinstance(concepts, ConceptConfig):
            concepts = _from_mapping(ConceptConfig, concepts, "model.concepts")
        return _from_mapping(cls, {**values, "concepts": concepts}, "model").validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw).validate()

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def resolved_mask_token_id(self) -> int:
        return self.vocab_size - 1 if self.mask_token_id is None else self.mask_token_id

    def validate(self, prefix: str = "model") -> "ModelConfig":
        _check(self.vocab_size > 0, f"{prefix}.vocab_size", "must be > 0")
        _check(self.n_layers >= 1, f"{prefix}.n_layers", "must be >= 1")
        _check(self.n_heads >= 1, f"{prefix}.n_heads", "must be >= 1")
        _check(self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0,
                      f"{prefix}.n_kv_heads",
                      f"must divide n_heads={self.n_heads}, got {self.n_kv_heads}")
        if self.head_dim is None:
            _check(self.d_model % self.n_heads == 0, f"{prefix}.d_model",
                          f"must be divisible by n_heads={self.n_heads} when head_dim is None")
        _check(self.resolved_head_dim % 2 == 0, f"{prefix}.head_dim", "must be even for RoPE")
        _check(self.norm_order in NORM_ORDERS, f"{prefix}.norm_order",
                      f"must be one of {NORM_ORDERS}, got {self.norm_order!r}")
        _check(self.attention in ATTENTION_KINDS, f"{prefix}.attention",
                      f"must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        _check(self.objective in OBJECTIVES, f"{prefix}.objective",
                      f"must be one of {OBJECTIVES}, got {self.objective!r}")
        _check(self.diffusion_block_size >= 1, f"{prefix}.diffusion_block_size", "must be >= 1")
        _check(self.dtype in DTYPES, f"{prefix}.dtype", f"must be one of {DTYPES}")
        _check(self.param_dtype in DTYPES, f"{prefix}.param_dtype", f"must be one of {DTYPES}")
        _check(self.remat in ("none", "block", "full"), f"{prefix}.remat",
                      f"must be none|block|full, got {self.remat!r}")
        _check(0 <= self.resolved_mask_token_id < self.vocab_size, f"{prefix}.mask_token_id",
                      f"must be in [0, vocab_size={self.vocab_size})")
        self.concepts.validate(f"{prefix}.concepts")
        return self


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh: axes (data, fsdp, tensor) within a slice and across slices.

    -1 on one axis fills it with the devices left over.
    """
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1

    @classmethod
    def from_config(cls, cfg: Any) -> "MeshConfig":
        return _from_mapping(cls, _as_dict(cfg), "mesh")


def logical_rules_from_config(rules: Any) -> tuple[tuple[str, Any], ...]:
    """Normalizes ``config.rules`` (a list of [logical, mesh_axes]) to a tuple.

    mesh_axes is None (replicated), a mesh axis name, or a list of names.
    """
    out = []
    for i, rule in enumerate(rules):
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ConfigError(f"config field 'rules[{i}]': expected [logical_name, mesh_axes], got {rule!r}")
        logical, axes = rule
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
        out.append((logical, axes))
    return tuple(out)
