"""Held-out perplexity: exact for autoregressive models, the ELBO bound for diffusion.

Autoregressive: exp of the mean next-token NLL over every token whose
successor lies in the same document,

  PPL = exp( sum_{t: seg_t = seg_{t+1} > 0} -log p(x_{t+1} | x_<=t)  /  #those t ).

Masked diffusion (MDLM / block diffusion, cbm_lm.objectives.diffusion): per
block t ~ U(t_min, 1), mask each token with probability t, and

  NLL <= E_t E_mask [ sum_{i masked} -log p(x_i | x~) / t ]          (per real token)

estimated with ``num_draws`` mask draws per window, with the two-stream
clean context when the model was trained with it (each block predicted
from clean earlier blocks, as at generation). PPL = exp(the bound), an
upper bound on the true perplexity.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cbm_lm.eval.forward import map_rows
from cbm_lm.eval.heldout import HeldoutWindows
from cbm_lm.eval.report import MetricUnavailable
from cbm_lm.model import ConceptBottleneckLM
from cbm_lm.objectives.diffusion import corrupt, token_cross_entropy


@dataclasses.dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll_per_token: float
    num_tokens: int
    method: str


def two_stream_inputs(noisy, clean, positions, segment_ids):
    """[noisy | clean] tokens, positions, segment ids and stream ids [B,2T] (model/attention.py)."""
    return (jnp.concatenate([noisy, clean], 1), jnp.concatenate([positions, positions], 1),
            jnp.concatenate([segment_ids, segment_ids], 1),
            jnp.concatenate([jnp.zeros_like(segment_ids), jnp.ones_like(segment_ids)], 1))


@nnx.jit
def _ar_nll(model, tokens, positions, segment_ids, score):
    logits = model(tokens, positions=positions, segment_ids=segment_ids).logits
    ce = token_cross_entropy(logits[:, :-1], tokens[:, 1:])                  # [B,T-1]
    valid = ((segment_ids[:, 1:] > 0) & (segment_ids[:, 1:] == segment_ids[:, :-1])
             & score[:, 1:])
    return {"nll": jnp.sum(jnp.where(valid, ce, 0.0), 1), "count": valid.sum(1)}


@nnx.jit(static_argnames=("block_size", "mask_id", "t_min", "clean_context"))
def _diffusion_elbo(model, tokens, positions, segment_ids, score, key, *, block_size, mask_id,
                    t_min, clean_context):
    noisy, masked, t = corrupt(key, tokens, segment_ids, positions, block_size=block_size,
                               mask_id=mask_id, t_min=t_min)
    if clean_context:
        x, p, s, stream = two_stream_inputs(noisy, tokens, positions, segment_ids)
        logits = model(x, positions=p, segment_ids=s, stream=stream).logits[:, :tokens.shape[1]]
    else:
        logits = model(noisy, positions=positions, segment_ids=segment_ids).logits
    ce = token_cross_entropy(logits, tokens)
    m = masked & (segment_ids > 0) & score
    return {"nll": jnp.sum(jnp.where(m, ce / jnp.where(m, t, 1.0), 0.0), 1),
            "count": jnp.sum((segment_ids > 0) & score, 1)}


def perplexity(model: ConceptBottleneckLM, windows: HeldoutWindows, *, seed: int = 0,
               batch: int = 8, num_draws: int = 4, t_min: float = 1e-3,
               clean_context: bool = True, score_mask=None) -> Perplexity:
    """score_mask [N,T] bool: score only these tokens (default: every real token)."""
    cfg = model.config
    w = windows
    score = (w.segment_ids > 0) if score_mask is None else np.asarray(score_mask, bool)

    def rows_of(rows):
        return (jnp.asarray(w.tokens[rows]), jnp.asarray(w.positions[rows]),
                jnp.asarray(w.segment_ids[rows]), jnp.asarray(score[rows]))

    if cfg.objective == "autoregressive":
        out = map_rows(lambda r: _ar_nll(model, *rows_of(r)), w.num_rows, batch)
        nll, count = float(out["nll"].sum()), int(out["count"].sum())
        method = "exact next-token NLL"
    else:
        total = 0.0
        for d in range(num_draws):
            out = map_rows(lambda r: _diffusion_elbo(
                model, *rows_of(r), jax.random.fold_in(jax.random.key(seed), d * 1_000_003 + int(r[0])),
                block_size=cfg.diffusion_block_size, mask_id=cfg.resolved_mask_token_id,
                t_min=t_min, clean_context=clean_context), w.num_rows, batch)
            total += float(out["nll"].sum())
            count = int(out["count"].sum())
        nll = total / num_draws
        method = (f"masked-diffusion ELBO ({num_draws} mask draws, t_min={t_min}, "
                  f"{'two-stream clean context' if clean_context else 'single stream'})")
    if count == 0:
        raise MetricUnavailable(f"no token of the {w.num_rows} windows to score (every window "
                                f"shorter than 2 tokens, or none selected)")
    per_token = nll / count
    return Perplexity(float(np.exp(per_token)), per_token, count, method)
