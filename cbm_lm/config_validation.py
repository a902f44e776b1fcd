"""Whole-config validation at start-up: one error naming every bad field.

``validate_config`` checks every section of base_config's tree before a run
writes anything; ``check_loss_fields`` is the ``loss.*`` part that
train/losses.py also applies (it lives here so config never imports train/).
"""

from __future__ import annotations

from typing import Any, Mapping

from cbm_lm.config import (MESH_AXIS_NAMES, ConfigError, MeshConfig, ModelConfig, Problems,
                           ProvenanceConfig, _as_dict, _from_mapping, logical_rules_from_config)

LOSS_CHOICES = {"diffusion_noise": ("uniform", "gaussian"),
                "diffusion_weighting": ("elbo", "uniform"),
                "teacher_forcing": ("soft", "hard"),
                "teacher_forcing_schedule": ("linear", "report"),
                "reconstruction_target": ("predicted", "labels"),
                "independence_normalization": ("population", "report"),
                "concept_positives": ("soft_or", "token"),
                "concept_balance": ("none", "concept")}


def check_loss_fields(loss: Mapping[str, Any], p: Problems) -> None:
    """Adds to ``p`` every ``loss.*`` choice or range compute_losses cannot use.

    Fields the section lacks are skipped. Other range checks are in
    validate_config; this holds the choices, the dropout probabilities,
    0 <= t_min < t_max <= 1, 0 <= unknown_teacher_forcing_hold <= _until <= 1, the
    floor, the noise centres and context_window_until in [0, 1], and sigma > 0.
    """
    for field, allowed in LOSS_CHOICES.items():
        if field in loss:
            p.choice(loss[field], f"loss.{field}", allowed)
    for field in ("epsilon_dropout", "cfg_dropout"):
        v = loss.get(field, 0.0)
        p.check(isinstance(v, (int, float)) and 0 <= v <= 1, f"loss.{field}",
                f"must be a probability in [0, 1], got {v!r}")
    ar, anneal = loss.get("ar_warmup_fraction", 0.0), loss.get("mask_anneal_fraction", 0.0)
    ok_ar = isinstance(ar, (int, float)) and 0 <= ar < 1
    p.check(ok_ar, "loss.ar_warmup_fraction",
            f"must be a fraction of training in [0, 1) (the rest trains diffusion), got {ar!r}")
    ok_anneal = isinstance(anneal, (int, float)) and 0 <= anneal <= 1
    p.check(ok_anneal, "loss.mask_anneal_fraction",
            f"must be a fraction of training in [0, 1], got {anneal!r}")
    if ok_ar and ok_anneal:
        p.check(ar + anneal <= 1, "loss.mask_anneal_fraction",
                f"the AR warmup ({ar!r}) and the mask anneal ({anneal!r}) must fit in training: "
                f"ar_warmup_fraction + mask_anneal_fraction <= 1")
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    # Fractions of training and noise centres: each in [0, 1].
    for field in ("unknown_teacher_forcing_floor", "diffusion_noise_center_start",
                  "diffusion_noise_center_end", "context_window_until"):
        if field in loss:
            v = loss[field]
            p.check(number(v) and 0 <= v <= 1, f"loss.{field}",
                    f"must be in [0, 1], got {v!r}")
    if "diffusion_noise_sigma" in loss:
        v = loss["diffusion_noise_sigma"]
        p.check(number(v) and v > 0, "loss.diffusion_noise_sigma", f"must be > 0, got {v!r}")
    # beta holds at 1 up to `hold`, then decays to the floor by `until` (hold_decay): with
    # hold > until the decay is a step at `hold`, so the order is required.
    hold = loss.get("unknown_teacher_forcing_hold", 0.0)
    until = loss.get("unknown_teacher_forcing_until", 1.0)
    if "unknown_teacher_forcing_hold" in loss or "unknown_teacher_forcing_until" in loss:
        ok = number(hold) and number(until) and 0 <= hold <= until <= 1
        field = ("loss.unknown_teacher_forcing_hold" if not (number(hold) and 0 <= hold <= 1)
                 else "loss.unknown_teacher_forcing_until")
        p.check(ok, field, f"must satisfy 0 <= unknown_teacher_forcing_hold <= "
                f"unknown_teacher_forcing_until <= 1, got hold={hold!r}, until={until!r}")
    lo, hi = loss.get("diffusion_t_min", 0.0), loss.get("diffusion_t_max", 1.0)
    ok = isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and 0 <= lo < hi <= 1
    p.check(ok, "loss.diffusion_t_max",
            f"must satisfy 0 <= t_min < t_max <= 1, got t_min={lo!r}, t_max={hi!r}")


NAN_POLICIES = ("stop", "skip")
PROCESS_SPLITS = ("documents", "rows")
_MISSING = object()


def validate_config(config: Any) -> None:
    """Checks every section of a full config (base_config's tree) at start-up.

    Raises one ConfigError naming every bad field with its allowed values, so a
    run that cannot train well never starts (nothing is written before this).
    Sections or fields a config does not have are skipped, not invented.
    """
    tree = _as_dict(config)
    p = Problems()
    model = None
    if "model" in tree:
        model = ModelConfig.from_config_unchecked(tree["model"], p)
        model.check(p)
    sec = {name: tree.get(name) or {} for name in
           ("mesh", "data", "train", "optimizer", "loss", "checkpoint", "hardware")}

    def get(section, field):
        return sec[section].get(field, _MISSING)

    def at_least(section, field, low):
        v = get(section, field)
        if v is not _MISSING:
            p.check(isinstance(v, (int, float)) and v >= low, f"{section}.{field}",
                    f"must be >= {low}, got {v!r}")

    def above(section, field, low):
        v = get(section, field)
        if v is not _MISSING:
            p.check(isinstance(v, (int, float)) and v > low, f"{section}.{field}",
                    f"must be > {low}, got {v!r}")

    def within(section, field, low, high, high_open=False):
        v = get(section, field)
        if v is not _MISSING:
            ok = isinstance(v, (int, float)) and low <= v and (v < high if high_open else v <= high)
            p.check(ok, f"{section}.{field}",
                    f"must be in [{low}, {high}{')' if high_open else ']'}, got {v!r}")

    # train / checkpoint: step periods are divisors (0 would divide by zero).
    for field in ("num_steps", "log_every", "grad_accum_steps"):
        at_least("train", field, 1)
    for field in ("eval_every", "eval_batches", "max_skipped_steps"):   # eval_every=0: no eval
        at_least("train", field, 0)
    at_least("train", "key_refit_steps", 0)
    refit = get("train", "key_refit_steps")
    if model is not None and isinstance(refit, int) and refit > 0:
        p.check(model.objective == "autoregressive", "train.key_refit_steps",
                f"the known-key refit fits states of the clean forward, so it needs "
                f"model.objective=autoregressive, got {model.objective!r} (set it to 0)")
        p.check(model.concepts.epsilon_correction, "train.key_refit_steps",
                "the known-key refit leaves the LM's output unchanged only with "
                "model.concepts.epsilon_correction=True (set it to 0)")
    at_least("train", "key_refit_batches", 1)
    above("train", "key_refit_lr", 0)
    if get("train", "key_refit_balance") is not _MISSING:
        p.choice(get("train", "key_refit_balance"), "train.key_refit_balance",
                 ("loss",) + LOSS_CHOICES["concept_balance"])
    if get("train", "nan_policy") is not _MISSING:
        p.choice(get("train", "nan_policy"), "train.nan_policy", NAN_POLICIES)
    at_least("checkpoint", "every_steps", 1)
    at_least("checkpoint", "keep", 1)

    # data
    for field in ("batch_size", "seq_len", "max_chunk_concepts"):
        at_least("data", field, 1)
    at_least("data", "worker_count", 0)
    at_least("data", "packing_bins", 0)
    if get("data", "process_split") is not _MISSING:
        p.choice(get("data", "process_split"), "data.process_split", PROCESS_SPLITS)
    for name, w in dict(get("data", "mixture") if get("data", "mixture") is not _MISSING
                        else {}).items():
        p.check(isinstance(w, (int, float)) and w >= 0, f"data.mixture.{name}",
                f"must be a weight >= 0, got {w!r}")
    batch, accum = get("data", "batch_size"), get("train", "grad_accum_steps")
    if isinstance(batch, int) and isinstance(accum, int) and batch >= 1 and accum >= 1:
        p.check(batch % accum == 0, "train.grad_accum_steps",
                f"must divide data.batch_size={batch}, got {accum}")
    seq_len = get("data", "seq_len")
    if model is not None and isinstance(seq_len, int):
        p.check(seq_len <= model.max_seq_len, "data.seq_len",
                f"must be <= model.max_seq_len={model.max_seq_len}, got {seq_len}")

    # optimizer
    at_least("optimizer", "learning_rate", 0)
    at_least("optimizer", "warmup_steps", 0)
    at_least("optimizer", "weight_decay", 0)
    at_least("optimizer", "grad_clip", 0)
    at_least("optimizer", "known_keys_weight_decay", 0)
    above("optimizer", "known_keys_lr_scale", 0)
    within("optimizer", "min_lr_ratio", 0, 1)
    within("optimizer", "b1", 0, 1, high_open=True)
    within("optimizer", "b2", 0, 1, high_open=True)
    above("optimizer", "eps", 0)

    # hardware: 0 = look the peak up from the device kind (parallel/devices.py)
    at_least("hardware", "peak_flops_per_device", 0)

    # loss
    for field in ("lm_weight", "concept_weight", "concept_pos_weight", "concept_neg_weight",
                  "concept_pooled_weight",
                  "reconstruction_weight", "independence_weight", "epsilon_weight",
                  "concept_negatives", "teacher_forcing_steps", "ce_chunk_tokens",
                  "steering_weight"):
        at_least("loss", field, 0)
    at_least("loss", "steering_period", 1)
    at_least("loss", "schedule_steps", 1)      # the fractional schedules' length
    for field in ("teacher_forcing_start", "teacher_forcing_end"):
        within("loss", field, 0, 1)
    check_loss_fields(sec["loss"], p)
    # Two-stream training reads the clean copy of earlier blocks: that view exists only
    # under block-causal attention (model/attention.py).
    if (model is not None and model.objective == "diffusion"
            and get("loss", "diffusion_clean_context") is True):
        p.check(model.attention == "block_causal", "loss.diffusion_clean_context",
                f"two-stream (clean-context) diffusion needs model.attention='block_causal', got "
                f"{model.attention!r}; set --config.loss.diffusion_clean_context=False or "
                f"--config.model.attention=block_causal")

    # Fields that need the model: checked here, before anything is written, not at the
    # first step's compile (or never: a steering layer past the last injects nothing).
    layer = get("loss", "steering_layer")
    if model is not None and isinstance(layer, int):
        p.check(layer == -1 or 0 <= layer <= model.n_layers, "loss.steering_layer",
                f"must be -1 (n_layers // 2) or a layer in [0, {model.n_layers}] (the injection "
                f"follows every block from it on), got {layer}")
    window = get("loss", "context_window")
    if window is not _MISSING:
        ok = isinstance(window, int) and window >= 0
        p.check(ok, "loss.context_window", f"must be >= 0 (0 = off), got {window!r}")
        if ok and window and model is not None and model.objective == "diffusion":
            b = model.diffusion_block_size
            p.check(window % b == 0, "loss.context_window",
                    f"must be a multiple of model.diffusion_block_size={b}, got {window}")

    # AR-to-diffusion adaptation trains a diffusion model causally first (train/losses.py).
    for field in ("ar_warmup_fraction", "mask_anneal_fraction"):
        v = get("loss", field)
        if model is not None and isinstance(v, (int, float)) and v > 0:
            p.check(model.objective == "diffusion" and model.attention == "block_causal",
                    f"loss.{field}",
                    f"AR-to-diffusion adaptation needs model.objective='diffusion' and "
                    f"model.attention='block_causal', got {model.objective!r} / "
                    f"{model.attention!r}; set --config.loss.{field}=0")

    if tree.get("provenance"):
        _from_mapping(ProvenanceConfig, tree["provenance"], "provenance", p).check(p)

    # mesh and rules
    if sec["mesh"]:
        mesh = _from_mapping(MeshConfig, sec["mesh"], "mesh", p)
        ici = (mesh.data, mesh.fsdp, mesh.tensor)
        p.check(all(s == -1 or (isinstance(s, int) and s >= 1) for s in ici), "mesh",
                f"data/fsdp/tensor must be >= 1 or -1, got {ici}")
        p.check(sum(s == -1 for s in ici) <= 1, "mesh", f"at most one axis may be -1, got {ici}")
        dcn = (mesh.dcn_data, mesh.dcn_fsdp, mesh.dcn_tensor)
        p.check(all(isinstance(s, int) and s >= 1 for s in dcn), "mesh.dcn_*",
                f"must be >= 1, got {dcn}")
    if "rules" in tree:
        try:
            rules = logical_rules_from_config(tree["rules"])
        except ConfigError as e:
            p.items.append(str(e))
        else:
            for logical, axes in rules:
                names = (axes,) if isinstance(axes, str) else tuple(axes or ())
                bad = [a for a in names if a not in MESH_AXIS_NAMES]
                p.check(not bad, f"rules[{logical}]",
                        f"mesh axes must be among {MESH_AXIS_NAMES}, got {bad}")
    p.raise_if_any()
