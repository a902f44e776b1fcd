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
MESH_AXIS_NAMES = ("data", "fsdp", "tensor")
CLIP_MODES = ("hard", "straight_through", "soft")   # model/concept_topk.py cap_logits
KERNELS = ("auto", "xla")                           # model/cpu_kernels.py KERNELS


class ConfigError(ValueError):
    """A config field has a value the library cannot use."""


class Problems:
    """Collects every bad field, so one error names all of them (not just the first)."""

    def __init__(self):
        self.items: list[str] = []

    def check(self, cond: bool, field: str, msg: str) -> None:
        if not cond:
            self.items.append(f"config field '{field}': {msg}")

    def choice(self, value: Any, field: str, allowed: tuple) -> None:
        self.check(value in allowed, field,
                   f"must be one of {allowed} (case-sensitive), got {value!r}")

    def raise_if_any(self) -> None:
        if len(self.items) == 1:
            raise ConfigError(self.items[0])
        if self.items:
            raise ConfigError(f"{len(self.items)} bad config fields:\n  " + "\n  ".join(self.items))


def _as_dict(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, ml_collections.ConfigDict):
        return cfg.to_dict()
    if isinstance(cfg, Mapping):
        return dict(cfg)
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    raise TypeError(f"expected a ConfigDict or mapping, got {type(cfg).__name__}")


def _from_mapping(cls, values: Mapping[str, Any], prefix: str, problems: Problems | None = None):
    """``cls(**values)``; unknown fields are refused (into ``problems`` when given)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        msg = (f"config section '{prefix}' has unknown field(s) {unknown}; "
               f"known fields: {sorted(names)}")
        if problems is None:
            raise ConfigError(msg)
        problems.items.append(msg)
    return cls(**{k: v for k, v in values.items() if k in names})


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
    clip_mode: how logits are bounded to [-logit_clip, logit_clip]: hard (Steerling's
        clip, zero gradient outside), straight_through (the same values, gradient 1:
        a saturated concept can still be corrected by its loss), soft (c tanh(z/c)).
    epsilon_correction: add epsilon = h - known - unknown so logits equal the
        backbone's when not intervening (Steerling's default).
    scoring: how the top-k rows are read: "gather" (row gathers; cheap on CPU)
        or "blockwise" (dense blocks of the table, no [N,k,D] gathers; for
        TPU/GPU at scale, model/sparse_rows.py).
    kernels: "auto" (compiled kernels where XLA lowers for CPU: the top-k,
        model/topk_cpu.py, and the gathered-row products, model/sparse_rows_cpu.py;
        XLA's ops on TPU/GPU) or "xla" (XLA's ops everywhere).
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
    clip_mode: str = "straight_through"   # hard (Steerling) | straight_through | soft
    scoring: str = "gather"
    kernels: str = "auto"

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
        p = Problems()
        self.check(p, prefix)
        p.raise_if_any()
        return self

    def check(self, p: Problems, prefix: str = "model.concepts") -> None:
        p.check(self.n_known > 0, f"{prefix}.n_known", f"must be > 0, got {self.n_known}")
        p.check(0 < self.known_topk <= self.n_known, f"{prefix}.known_topk",
                f"must be in [1, n_known={self.n_known}], got {self.known_topk}")
        p.check(self.known_report_topk is None or 0 < self.known_report_topk <= self.known_topk,
                f"{prefix}.known_report_topk",
                f"must be None or in [1, known_topk={self.known_topk}] (the reported concepts are "
                f"taken from the kept ones), got {self.known_report_topk}")
        p.check(self.n_unknown >= 0, f"{prefix}.n_unknown", f"must be >= 0, got {self.n_unknown}")
        p.check(self.scoring in ("gather", "blockwise"), f"{prefix}.scoring",
                f"must be 'gather' or 'blockwise', got {self.scoring!r}")
        if self.n_unknown:
            p.check(self.unknown_rank >= 0, f"{prefix}.unknown_rank", "must be >= 0")
            p.check(self.unknown_topk is None or 0 < self.unknown_topk <= self.n_unknown,
                    f"{prefix}.unknown_topk",
                    f"must be None or in [1, n_unknown={self.n_unknown}], got {self.unknown_topk}")
            kept = self.unknown_topk or float("inf")   # dense unknown: clamped to n_unknown
            p.check(self.unknown_report_topk is None or 0 < self.unknown_report_topk <= kept,
                    f"{prefix}.unknown_report_topk",
                    f"must be None or in [1, unknown_topk={self.unknown_topk}], "
                    f"got {self.unknown_report_topk}")
        p.check(self.pad_multiple >= 1, f"{prefix}.pad_multiple", "must be >= 1")
        p.check(self.block_size >= 1, f"{prefix}.block_size", "must be >= 1")
        p.check(self.dense_threshold >= 0, f"{prefix}.dense_threshold", "must be >= 0")
        p.check(self.logit_clip > 0, f"{prefix}.logit_clip", "must be > 0")
        p.choice(self.clip_mode, f"{prefix}.clip_mode", CLIP_MODES)
        p.choice(self.kernels, f"{prefix}.kernels", KERNELS)


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
    diffusion_shift: bool = False  # token i predicted from position i-1 (model/lm.py)
    mask_token_id: int | None = None  # the [MASK] id for diffusion; None: vocab_size - 1
    dtype: str = "float32"        # activation / compute dtype
    param_dtype: str = "float32"  # master weights
    init_std: float = 0.02
    remat: str = "none"           # none | block | full (see train/)
    scan_layers: bool = True      # blocks run as one lax.scan (False: unrolled, same params)
    concepts: ConceptConfig = dataclasses.field(default_factory=ConceptConfig)

    @classmethod
    def from_config(cls, cfg: Any) -> "ModelConfig":
        p = Problems()
        cfg = cls.from_config_unchecked(cfg, p)
        cfg.check(p)
        p.raise_if_any()
        return cfg

    @classmethod
    def from_config_unchecked(cls, cfg: Any, p: Problems, prefix: str = "model") -> "ModelConfig":
        """Builds the view, recording unknown fields in ``p``; values are not checked."""
        values = _as_dict(cfg)
        concepts = values.pop("concepts", {})
        if not isinstance(concepts, ConceptConfig):
            concepts = _from_mapping(ConceptConfig, concepts, f"{prefix}.concepts", p)
        return _from_mapping(cls, {**values, "concepts": concepts}, prefix, p)

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
        p = Problems()
        self.check(p, prefix)
        p.raise_if_any()
        return self

    def check(self, p: Problems, prefix: str = "model") -> None:
        p.check(self.vocab_size > 0, f"{prefix}.vocab_size", "must be > 0")
        p.check(self.n_layers >= 1, f"{prefix}.n_layers", "must be >= 1")
        p.check(self.n_heads >= 1, f"{prefix}.n_heads", "must be >= 1")
        p.check(self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0,
                f"{prefix}.n_kv_heads",
                f"must divide n_heads={self.n_heads}, got {self.n_kv_heads}")
        if self.head_dim is None and self.n_heads >= 1:
            p.check(self.d_model % self.n_heads == 0, f"{prefix}.d_model",
                    f"must be divisible by n_heads={self.n_heads} when head_dim is None")
        if self.n_heads >= 1:
            p.check(self.resolved_head_dim % 2 == 0, f"{prefix}.head_dim", "must be even for RoPE")
        p.check(self.norm_order in NORM_ORDERS, f"{prefix}.norm_order",
                f"must be one of {NORM_ORDERS}, got {self.norm_order!r}")
        p.check(self.attention in ATTENTION_KINDS, f"{prefix}.attention",
                f"must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        p.check(self.objective in OBJECTIVES, f"{prefix}.objective",
                f"must be one of {OBJECTIVES}, got {self.objective!r}")
        p.check(self.diffusion_block_size >= 1, f"{prefix}.diffusion_block_size", "must be >= 1")
        p.check(self.dtype in DTYPES, f"{prefix}.dtype", f"must be one of {DTYPES}")
        p.check(self.param_dtype in DTYPES, f"{prefix}.param_dtype", f"must be one of {DTYPES}")
        p.check(self.remat in ("none", "block", "full"), f"{prefix}.remat",
                f"must be none|block|full, got {self.remat!r}")
        p.check(0 <= self.resolved_mask_token_id < self.vocab_size, f"{prefix}.mask_token_id",
                f"must be in [0, vocab_size={self.vocab_size})")
        # Next-token prediction with block-causal attention lets each position see, inside
        # its block, the very token it is asked to predict: a cheating model.
        p.check(not (self.objective == "autoregressive" and self.attention != "causal"),
                f"{prefix}.attention",
                f"objective='autoregressive' needs attention='causal' (block-causal attention "
                f"shows each token its own next-token target), got {self.attention!r}; set "
                f"--config.{prefix}.attention=causal or --config.{prefix}.objective=diffusion")
        p.check(not (self.diffusion_shift and self.objective != "diffusion"),
                f"{prefix}.diffusion_shift",
                f"the shift is defined for objective='diffusion' (an autoregressive model already "
                f"predicts from the previous position), got objective={self.objective!r}")
        self.concepts.check(p, f"{prefix}.concepts")


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
    if not any(name == "layers" for name, _ in out):   # configs saved before blocks were stacked
        out.append(("layers", None))
    return tuple(out)


PROVENANCE_HEADS = ("fixed", "learned")
REKEY_CONTEXTS = ("chunk", "document")
POOL_WEIGHTS = ("surprisal", "uniform")
LEXICAL_FEATURES = ("words", "tokens")
HASHED_VECTORS = ("signs", "gaussian")


@dataclasses.dataclass(frozen=True)
class ProvenanceConfig:
    """Chunk provenance: the key head, training-time logging, the index (DESIGN.md section 7).

    Fields are documented in default_config.py. ``from_config`` fills fields a
    saved config.json predates with their defaults, so checkpoints written
    before this section existed still build an index.
    """
    d_p: int = 256
    head: str = "fixed"
    seed: int = 0
    known_weight: float = 0.2
    unknown_weight: float = 0.2
    hidden_weight: float = 0.2
    lexical_weight: float = 1.0
    pool_weights: str = "surprisal"
    lexical: str = "words"
    hashed_vectors: str = "signs"
    max_chunks_per_row: int = 64
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.05
    token_dropout: float = 0.15
    log_keys: bool = False
    max_sources: int = 64
    exact_max_keys: int = 262144
    ivf_nlist: int = 0
    pq_m: int = 16
    nprobe: int = 16
    rekey_batch_size: int = 32
    rekey_context: str = "chunk"
    rekey_d_p: int = 0

    @classmethod
    def from_config(cls, cfg: Any) -> "ProvenanceConfig":
        values = _as_dict(cfg) if cfg is not None else {}
        return _from_mapping(cls, values, "provenance").validate()

    def validate(self, prefix: str = "provenance") -> "ProvenanceConfig":
        p = Problems()
        self.check(p, prefix)
        p.raise_if_any()
        return self

    def check(self, p: Problems, prefix: str = "provenance") -> None:
        p.check(self.d_p >= 1, f"{prefix}.d_p", f"must be >= 1, got {self.d_p}")
        p.choice(self.head, f"{prefix}.head", PROVENANCE_HEADS)
        weights = (self.known_weight, self.unknown_weight, self.hidden_weight,
                   self.lexical_weight)
        p.check(min(weights) >= 0 and sum(weights) > 0,
                f"{prefix}.known_weight/unknown_weight/hidden_weight/lexical_weight",
                f"must be >= 0 with a positive sum, got {weights}")
        p.choice(self.pool_weights, f"{prefix}.pool_weights", POOL_WEIGHTS)
        p.choice(self.lexical, f"{prefix}.lexical", LEXICAL_FEATURES)
        p.choice(self.hashed_vectors, f"{prefix}.hashed_vectors", HASHED_VECTORS)
        p.check(self.max_chunks_per_row >= 1, f"{prefix}.max_chunks_per_row", "must be >= 1")
        p.check(self.contrastive_weight >= 0, f"{prefix}.contrastive_weight",
                f"must be >= 0, got {self.contrastive_weight}")
        # The weight trains the learned head's W; the fixed head has nothing it could train.
        p.check(self.contrastive_weight <= 0 or self.head == "learned",
                f"{prefix}.contrastive_weight",
                f"trains the learned key head: > 0 needs {prefix}.head='learned', got "
                f"contrastive_weight={self.contrastive_weight} with head={self.head!r}")
        p.check(self.contrastive_temperature > 0, f"{prefix}.contrastive_temperature",
                "must be > 0")
        p.check(0 <= self.token_dropout < 1, f"{prefix}.token_dropout", "must be in [0, 1)")
        p.check(self.max_sources >= 1, f"{prefix}.max_sources", "must be >= 1")
        p.check(self.pq_m >= 1 and self.d_p % self.pq_m == 0, f"{prefix}.pq_m",
                f"must divide d_p={self.d_p}, got {self.pq_m}")
        p.check(self.nprobe >= 1, f"{prefix}.nprobe", "must be >= 1")
        p.check(self.rekey_batch_size >= 1, f"{prefix}.rekey_batch_size", "must be >= 1")
        p.choice(self.rekey_context, f"{prefix}.rekey_context", REKEY_CONTEXTS)
        p.check(self.rekey_d_p >= 0, f"{prefix}.rekey_d_p",
                f"must be >= 0 (0: re-key at d_p), got {self.rekey_d_p}")
        # The fixed head's tables are seeded, so it keys one checkpoint at any width; the
        # learned head's W is [4 d_p, d_p] and keys at its trained width only.
        p.check(self.rekey_d_p in (0, self.d_p) or self.head == "fixed", f"{prefix}.rekey_d_p",
                f"re-keying at another width needs {prefix}.head='fixed' (the learned head's W "
                f"is d_p={self.d_p} wide), got rekey_d_p={self.rekey_d_p} with head={self.head!r}")
        p.check(self.rekey_d_p <= 0 or self.rekey_d_p % max(self.pq_m, 1) == 0,
                f"{prefix}.rekey_d_p", f"must be a multiple of pq_m={self.pq_m}, got "
                f"{self.rekey_d_p}")

    def for_rekeying(self) -> "ProvenanceConfig":
        """The config the re-keying pass keys with: d_p = rekey_d_p where set (> 0).

        Training-time logging pays per-token [B,T,d_p] work on every step; re-keying is
        one pass, so its index can afford a wider (less noisy) sketch."""
        return dataclasses.replace(self, d_p=self.rekey_d_p or self.d_p)
