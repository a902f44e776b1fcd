"""Training objectives as pure JAX functions (DESIGN.md section 3)."""

from cbm_lm.objectives.autoregressive import (next_token_loss, next_token_loss_from_ce,
                                              next_token_pairs)
from cbm_lm.objectives.chunked_ce import chunked_token_ce
from cbm_lm.objectives.concept_loss import (
    chunk_concept_loss, chunk_sums, concept_auroc, pooled_label_features, positive_bce,
    sample_negative_ids, shared_logits, soft_or_probability)
from cbm_lm.objectives.diffusion import (corrupt, diffusion_loss, diffusion_loss_from_ce,
                                         token_cross_entropy)
from cbm_lm.objectives.regularizers import independence_loss, reconstruction_loss
from cbm_lm.objectives.schedules import (
    epsilon_dropout_prob, linear_schedule, sample_epsilon_dropout, teacher_forcing_alpha)

__all__ = [
    "chunk_concept_loss", "chunked_token_ce", "diffusion_loss_from_ce", "next_token_loss_from_ce", "chunk_sums", "concept_auroc", "corrupt", "diffusion_loss",
    "epsilon_dropout_prob", "independence_loss", "linear_schedule", "next_token_loss",
    "next_token_pairs", "pooled_label_features", "positive_bce", "reconstruction_loss",
    "sample_epsilon_dropout", "sample_negative_ids", "shared_logits", "soft_or_probability",
    "teacher_forcing_alpha", "token_cross_entropy",
]
