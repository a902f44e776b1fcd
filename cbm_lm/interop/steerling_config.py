"""Steerling config.json <-> cbm_lm config (the ``model`` section of ``base_config()``).

Steerling checkpoints come with one of two config.json layouts:

  nested  the fields of CausalDiffusionConfig at the top level, plus
          ``interpretable``, ``vocab_size`` and a ``concept`` dict holding the
          fields of ConceptConfig (what SteerlingGenerator.from_pretrained's
          direct-loading path reads).
  flat    the HuggingFace SteerlingConfig: architecture and concept fields side
          by side, the concept block size renamed ``concept_block_size`` (the
          bare ``block_size`` is the model's context length), plus token ids
          such as ``mask_token_id``.

Fields a config.json leaves out take Steerling's defaults (pydantic defaults of
CausalDiffusionConfig / ConceptConfig, mirrored below so this module does not
need the steerling package; tests/test_steerling_import.py checks the mirror).
Features cbm_lm does not implement raise ``SteerlingFormatError`` naming the field.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Mapping

import ml_collections

from cbm_lm.config import ConfigError, ModelConfig
from cbm_lm.default_config import base_config

# Steerling's LARGE_CONCEPT_THRESHOLD: above it, heads never materialize [B,T,C].
STEERLING_DENSE_THRESHOLD = 50000
# Steerling's tokenizer (steerling/data/tokenizer.py): cl100k_base's 100277 ids, then <|pad|>,
# <|bos|>, <|endofchunk|>, <|mask|> = 100280; the instruct model's 3 chat tokens follow it,
# so its last id (100283) is <|eot_id|>, not the mask.
STEERLING_MASK_ID = 100280
# Steerling reports this many unknown top-k concepts when the head applies no top-k.
STEERLING_UNKNOWN_REPORT_TOPK = 64
STEERLING_LOGIT_CLIP = 15.0
# Keys HuggingFace adds that are not part of the model (stripped like steerling's load_config).
HF_KEYS = frozenset({"model_type", "transformers_version", "auto_map", "architectures",
                     "torch_dtype"})

MODEL_DEFAULTS: dict[str, Any] = dict(
    interpretable=False, n_layers=32, n_head=32, n_embd=4096, block_size=4096, n_kv_heads=4,
    diff_block_size=64, use_rms_norm=True, norm_eps=1e-5, norm_order="post", use_qk_norm=True,
    use_rope=True, rope_base=500000.0, rope_full_precision=True, mlp_type="swiglu",
    activation="gelu", mlp_ratio=4, intermediate_size=None, use_bias=False, clip_qkv=10.0,
    weight_sharing=True)
CONCEPT_DEFAULTS: dict[str, Any] = dict(
    n_concepts=33732, n_unknown_concepts=101196, max_concepts=16, concept_dim=4096,
    use_attention_known=False, use_attention_unknown=False, topk_known=32,
    topk_known_features=32, use_unknown=True, factorize_unknown=True, factorize_rank=256,
    unknown_topk=128, use_epsilon_correction=True, block_size=4096, pad_multiple=16,
    topk_on_logits=False, store_unknown_weights=False, apply_topk_to_unknown=True,
    inject_layer=16, inject_alpha=1.0)
# Flat-layout name -> ConceptConfig name, where they differ.
FLAT_CONCEPT_RENAMES = {"concept_block_size": "block_size"}


class SteerlingFormatError(ValueError):
    """A Steerling checkpoint (config or tensors) that cbm_lm cannot read or write."""


def read_steerling_config(src_dir: str | os.PathLike) -> dict[str, Any]:
    """Parses ``src_dir/config.json`` and drops the HuggingFace bookkeeping keys."""
    path = os.path.join(os.fspath(src_dir), "config.json")
    if not os.path.isdir(src_dir):
        raise SteerlingFormatError(f"{src_dir}: not a directory (expected a Steerling checkpoint dir)")
    if not os.path.isfile(path):
        raise SteerlingFormatError(f"{path}: missing; a Steerling checkpoint dir holds config.json "
                                   "and *.safetensors")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise SteerlingFormatError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise SteerlingFormatError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return {k: v for k, v in raw.items() if k not in HF_KEYS}


def split_steerling_config(raw: Mapping[str, Any]) -> tuple[dict, dict | None, dict]:
    """(architecture fields, concept fields or None, other top-level keys), defaults filled in.

    Accepts the nested layout (a ``concept`` dict) and the flat one (concept
    fields beside the architecture, ``concept_block_size``). The concept part is
    None for a plain (non-interpretable) backbone.
    """
    raw = {k: v for k, v in raw.items() if k not in HF_KEYS}
    arch = {**MODEL_DEFAULTS, **{k: v for k, v in raw.items() if k in MODEL_DEFAULTS}}
    flat_keys = (set(CONCEPT_DEFAULTS) - {"block_size"}) | set(FLAT_CONCEPT_RENAMES)
    if isinstance(raw.get("concept"), Mapping):
        nested = dict(raw["concept"])
        unknown = sorted(set(nested) - set(CONCEPT_DEFAULTS))
        if unknown:
            raise SteerlingFormatError(
                f"config.json 'concept' has unknown field(s) {unknown}; ConceptConfig fields: "
                f"{sorted(CONCEPT_DEFAULTS)}")
        concept = {**CONCEPT_DEFAULTS, **nested}
        used = set(arch) | {"concept"}
    elif raw.get("concept") is not None:
        raise SteerlingFormatError(
            f"config.json 'concept': expected an object, got {type(raw['concept']).__name__}")
    elif any(k in raw for k in flat_keys):
        flat = {FLAT_CONCEPT_RENAMES.get(k, k): v for k, v in raw.items() if k in flat_keys}
        concept = {**CONCEPT_DEFAULTS, **flat}
        used = set(arch) | flat_keys
    else:
        concept = None
        used = set(arch)
    if concept is not None and not raw.get("interpretable", True):
        # steerling's from_pretrained builds a plain backbone then; the concept
        # heads' tensors would be dropped.
        raise SteerlingFormatError(
            "config.json 'interpretable' is false but concept fields are present; set "
            "'interpretable': true to import the concept heads")
    other = {k: v for k, v in raw.items() if k not in used}
    return arch, concept, other


def _unsupported(cond: bool, field: str, value: Any, why: str) -> None:
    if cond:
        raise SteerlingFormatError(f"Steerling config field '{field}'={value!r}: {why}")


def steerling_to_model_dict(raw: Mapping[str, Any], *, vocab_size: int | None = None) -> dict:
    """Steerling config.json (either layout) -> a dict for ``config.model`` (validated).

    vocab_size: used when config.json has none (steerling then takes the
    tokenizer's; pass the embedding's row count).
    """
    arch, concept, other = split_steerling_config(raw)
    if concept is None:
        raise SteerlingFormatError(
            "config.json describes a plain CausalDiffusionLM (no 'concept' section, "
            "'interpretable' false): cbm_lm imports interpretable Steerling models only")
    _unsupported(not arch["use_rms_norm"], "use_rms_norm", False, "LayerNorm is not supported (RMSNorm only)")
    _unsupported(bool(arch["use_bias"]), "use_bias", True, "biases in Linear layers are not supported")
    _unsupported(arch["mlp_type"] != "swiglu", "mlp_type", arch["mlp_type"], "only 'swiglu' is supported")
    _unsupported(arch["norm_order"] not in ("pre", "post"), "norm_order", arch["norm_order"],
                 "must be 'pre' or 'post'")
    for f in ("use_attention_known", "use_attention_unknown"):
        _unsupported(bool(concept[f]), f, True, "attention concept heads are not supported (linear only)")
    d, h = int(arch["n_embd"]), int(arch["n_head"])
    _unsupported(d % h != 0, "n_embd", d, f"must be divisible by n_head={h}")
    _unsupported(int(concept["concept_dim"]) != d, "concept_dim", concept["concept_dim"],
                 f"must equal n_embd={d}")

    if other.get("vocab_size") is not None:
        vocab_size = other["vocab_size"]
    if vocab_size is None:
        raise SteerlingFormatError("config.json has no 'vocab_size' and none was inferred from the weights")
    vocab_size = int(vocab_size)
    mask_id = other.get("mask_token_id")
    if mask_id is None and vocab_size > STEERLING_MASK_ID:
        mask_id = STEERLING_MASK_ID     # Steerling's vocabulary, base or instruct
    mlp_dim = arch["intermediate_size"] if arch["intermediate_size"] is not None \
        else int(arch["mlp_ratio"]) * d

    # Fields whose non-default value changes Steerling's behaviour where cbm_lm has one
    # behaviour: imported, but not silently.
    if concept.get("topk_on_logits"):
        warnings.warn("Steerling config field 'topk_on_logits'=True: cbm_lm's known-head "
                      "intervention prunes by weights (Steerling's default, False); forward "
                      "logits are unaffected, interventions may differ", stacklevel=2)
    if not arch.get("rope_full_precision", True):
        warnings.warn("Steerling config field 'rope_full_precision'=False: cbm_lm computes "
                      "RoPE in fp32 always; bf16 forwards may differ slightly", stacklevel=2)

    n_known = int(concept["n_concepts"])
    dense_threshold = STEERLING_DENSE_THRESHOLD
    # Known head: features use the top-k_features, the top-k (<= that) is reported.
    # topk_known None weights every concept densely (steerling reports no top-k then).
    if concept["topk_known"] is None:
        known_topk = n_known
        known_report = min(n_known, STEERLING_UNKNOWN_REPORT_TOPK)
        dense_threshold = max(dense_threshold, n_known)
    else:
        k_feat = concept["topk_known_features"]
        k_feat = concept["topk_known"] if k_feat is None else k_feat
        known_topk = min(int(k_feat), n_known)
        known_report = min(int(concept["topk_known"]), known_topk)

    use_unknown = bool(concept["use_unknown"])
    n_unknown = int(concept["n_unknown_concepts"] or 0) if use_unknown else 0
    _unsupported(use_unknown and n_unknown <= 0, "n_unknown_concepts", concept["n_unknown_concepts"],
                 "must be > 0 when use_unknown is true")
    rank = int(concept["factorize_rank"]) if concept["factorize_unknown"] else 0
    unknown_topk = concept["unknown_topk"] if concept["apply_topk_to_unknown"] else None
    if n_unknown and unknown_topk is not None:
        unknown_topk = min(int(unknown_topk), n_unknown)
        unknown_report = unknown_topk
    else:
        unknown_report = STEERLING_UNKNOWN_REPORT_TOPK
        if n_unknown:
            dense_threshold = max(dense_threshold, n_unknown)

    model = base_config().model.to_dict()
    model.update(
        vocab_size=vocab_size, d_model=d, n_layers=int(arch["n_layers"]), n_heads=h,
        n_kv_heads=int(arch["n_kv_heads"]) if arch["n_kv_heads"] is not None else h,
        head_dim=None, mlp_dim=int(mlp_dim), norm_order=arch["norm_order"],
        norm_eps=float(arch["norm_eps"]), qk_norm=bool(arch["use_qk_norm"]),
        qkv_clip=None if arch["clip_qkv"] is None else float(arch["clip_qkv"]),
        rope_base=float(arch["rope_base"]), use_rope=bool(arch["use_rope"]),
        tie_embeddings=bool(arch["weight_sharing"]), max_seq_len=int(arch["block_size"]),
        attention="block_causal", diffusion_block_size=int(arch["diff_block_size"]),
        objective="diffusion",
        mask_token_id=None if mask_id is None else int(mask_id),
        dtype="float32", param_dtype="float32")
    model["concepts"] = dict(
        n_known=n_known, known_topk=known_topk, known_report_topk=known_report,
        n_unknown=n_unknown, unknown_rank=rank if n_unknown else 0,
        unknown_topk=unknown_topk if n_unknown else None,
        unknown_report_topk=unknown_report if n_unknown else None,
        pad_multiple=int(concept["pad_multiple"]), block_size=int(concept["block_size"]),
        dense_threshold=dense_threshold,
        epsilon_correction=bool(concept["use_epsilon_correction"]),
        logit_clip=STEERLING_LOGIT_CLIP, clip_mode="hard")
    try:
        ModelConfig.from_config(model)
    except ConfigError as e:
        raise SteerlingFormatError(f"Steerling config does not map to a valid cbm_lm model: {e}") from e
    return model


def steerling_to_config(raw: Mapping[str, Any], *, vocab_size: int | None = None
                        ) -> ml_collections.ConfigDict:
    """``base_config()`` with its ``model`` section filled from a Steerling config.json."""
    cfg = base_config()
    model = steerling_to_model_dict(raw, vocab_size=vocab_size)
    concepts = model.pop("concepts")
    for k, v in model.items():
        cfg.model[k] = v
    for k, v in concepts.items():
        cfg.model.concepts[k] = v
    return cfg


def _export_check(cond: bool, field: str, value: Any, why: str) -> None:
    if not cond:
        raise SteerlingFormatError(f"cannot export to Steerling: model.{field}={value!r} {why}")


def model_to_steerling_config(cfg: ModelConfig, *, layout: str = "nested") -> dict[str, Any]:
    """Our ModelConfig -> a Steerling config.json dict.

    layout='nested' is read by steerling's ``from_pretrained`` direct-loading
    path (``interpretable`` + ``concept`` dict); layout='flat' is the
    HuggingFace SteerlingConfig layout. Causal attention becomes diffusion
    blocks of one token. Steerling always reports the unknown head's own
    top-k (64 when it applies none), so ``unknown_report_topk`` is not exported;
    it changes what is reported, never the logits.
    """
    cc = cfg.concepts
    _export_check(cfg.head_dim is None or cfg.head_dim * cfg.n_heads == cfg.d_model, "head_dim",
                  cfg.head_dim, f"must be d_model/n_heads={cfg.d_model // cfg.n_heads}")
    _export_check(cc.logit_clip == STEERLING_LOGIT_CLIP, "concepts.logit_clip", cc.logit_clip,
                  f"must be {STEERLING_LOGIT_CLIP} (Steerling's fixed clip)")
    _export_check(cc.clip_mode != "soft", "concepts.clip_mode", cc.clip_mode,
                  "must be hard or straight_through (Steerling's forward is a hard clip)")
    _export_check(not cfg.diffusion_shift, "diffusion_shift", cfg.diffusion_shift,
                  "must be False (Steerling predicts a masked token at its own position)")
    rank = cc.unknown_rank if cc.use_unknown else 0
    _export_check(rank == 0 or 16 <= rank <= 1024, "concepts.unknown_rank", rank,
                  "must be 0 (dense) or in [16, 1024] (Steerling's factorize_rank bounds)")
    # causal attention is block-causal with blocks of one token.
    diff_block = cfg.diffusion_block_size if cfg.attention == "block_causal" else 1
    arch = dict(
        interpretable=True, n_layers=cfg.n_layers, n_head=cfg.n_heads, n_embd=cfg.d_model,
        block_size=cfg.max_seq_len, n_kv_heads=cfg.n_kv_heads, diff_block_size=diff_block,
        use_rms_norm=True, norm_eps=cfg.norm_eps, norm_order=cfg.norm_order,
        use_qk_norm=cfg.qk_norm, use_rope=cfg.use_rope, rope_base=cfg.rope_base,
        rope_full_precision=True, mlp_type="swiglu", activation=MODEL_DEFAULTS["activation"],
        mlp_ratio=4, intermediate_size=cfg.mlp_dim, use_bias=False, clip_qkv=cfg.qkv_clip,
        weight_sharing=cfg.tie_embeddings)
    report = cc.known_report_topk
    topk_known = cc.known_topk if report is None or report >= cc.known_topk else report
    concept = dict(CONCEPT_DEFAULTS)
    concept.update(
        n_concepts=cc.n_known, concept_dim=cfg.d_model, topk_known=topk_known,
        topk_known_features=cc.known_topk, use_unknown=cc.use_unknown,
        n_unknown_concepts=cc.n_unknown if cc.use_unknown else None,
        factorize_unknown=rank > 0, factorize_rank=rank if rank else CONCEPT_DEFAULTS["factorize_rank"],
        unknown_topk=cc.unknown_topk, apply_topk_to_unknown=cc.unknown_topk is not None,
        use_epsilon_correction=cc.epsilon_correction, block_size=cc.block_size,
        pad_multiple=cc.pad_multiple)
    extra = dict(vocab_size=cfg.vocab_size, mask_token_id=cfg.resolved_mask_token_id)
    if layout == "nested":
        return {**arch, **extra, "concept": concept}
    if layout == "flat":
        flat = {("concept_block_size" if k == "block_size" else k): v for k, v in concept.items()}
        return {**arch, **extra, **flat}
    raise ValueError(f"layout must be 'nested' or 'flat', got {layout!r}")
