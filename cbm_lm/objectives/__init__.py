"""Training objectives as pure JAX functions (DESIGN.md section 3)."""

from cbm_lm.objectives.autoregressive import (next_token_loss, next_token_loss_from_ce,
                                              next_token_pairs)
from cbm_lm.objectives.chunked_ce import ce_and_hit, chunked_token_ce
from cbm_lm.objectives.concept_loss import (
    chunk_concept_loss, chunk_sums, concept_auroc, pooled_label_features, positive_bce,
    sample_negative_ids, shared_logits, soft_or_probability)
from cbm_lm.objectives.diffusion import (
    T_BUCKETS, corrupt, diffusion_loss, diffusion_loss_from_ce, noise_rate, token_cross_entropy)
from cbm_lm.objectives.key_contrastive import (KeyView, key_contrastive_loss,
                                               token_dropout_views)
from cbm_lm.objectives.label_alignment import align_labels_to_predictions
from cbm_lm.objectives.regularizers import (independence_loss, independence_loss_factorized,
                                           reconstruction_loss, residual_energy)
from cbm_lm.objectives.schedules import (
    ar_warmup_steps, epsilon_dropout_prob, hold_decay, in_ar_phase, linear_schedule,
    mask_lookahead, sample_epsilon_dropout, teacher_forcing_alpha, training_fraction)

__all__ = [
    "KeyView", "T_BUCKETS", "align_labels_to_predictions", "key_contrastive_loss",
    "token_dropout_views", "ar_warmup_steps", "in_ar_phase",
    "mask_lookahead", "chunk_concept_loss", "chunk_sums",
    "ce_and_hit", "chunked_token_ce", "concept_auroc", "corrupt", "diffusion_loss", "diffusion_loss_from_ce",
    "epsilon_dropout_prob", "hold_decay", "independence_loss", "independence_loss_factorized",
    "linear_schedule",
    "next_token_loss", "next_token_loss_from_ce", "next_token_pairs", "noise_rate",
    "pooled_label_features", "positive_bce", "reconstruction_loss", "residual_energy",
    "sample_epsilon_dropout",
    "sample_negative_ids", "shared_logits", "soft_or_probability", "teacher_forcing_alpha",
    "token_cross_entropy", "training_fraction",
]
