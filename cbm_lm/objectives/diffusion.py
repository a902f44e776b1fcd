"""Masked (absorbing-state) diffusion for block-causal LMs (MDLM / Steerling style).

Forward (noising) process, per (row, document, block) -- a block is
``positions // block_size`` inside one segment, exactly the unit the
block-causal attention mask treats as bidirectional:

  t_blk ~ U(t_min, t_max)                      one draw per block ("uniform"), or
  t_blk ~ N(c, sigma^2) truncated to [t_min, t_max]   ("gaussian": the technical report's
                                               moving curriculum, c = 0.2 -> 0.8 over training)
  m_i   ~ Bernoulli(t_blk(i))                  independently per real token i
  x~_i  = mask_id if m_i else x_i              padding (segment_ids == 0) never masked

Loss (the continuous-time ELBO of MDLM with the linear schedule alpha_t = 1 - t,
whose weight -alpha'_t / (1 - alpha_t) is 1/t):

  L = sum_{i masked} CE(logits_i, x_i) / t_i  /  #{i : segment_ids_i > 0}     ("elbo")

or, with weighting="uniform", the plain mean CE over masked tokens (lower variance:
no 1/t blow-up from nearly clean blocks, at the price of a biased ELBO).

Shapes: tokens, segment_ids, positions [B,T] int32; logits [B,T,V] fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def block_ids(positions: jax.Array, block_size: int) -> jax.Array:
    """Block index of each token inside its document: positions // block_size, [B,T]."""
    return positions.astype(jnp.int32) // block_size


def noise_rate(u: jax.Array, *, t_min: float, t_max: float = 1.0, noise: str = "uniform",
               center=0.5, sigma: float = 0.3) -> jax.Array:
    """Maps uniform draws u in [0,1) to masking rates t in [t_min, t_max].

    "uniform": t = t_min + (t_max - t_min) u.
    "gaussian": inverse-CDF sample of N(center, sigma^2) truncated to [t_min, t_max];
    ``center`` may be a traced scalar (the moving curriculum).
    """
    if noise == "uniform":
        return t_min + (t_max - t_min) * u
    if noise != "gaussian":
        raise ValueError(f"noise must be 'uniform' or 'gaussian', got {noise!r}")
    ndtr, ndtri = jax.scipy.special.ndtr, jax.scipy.special.ndtri
    lo, hi = ndtr((t_min - center) / sigma), ndtr((t_max - center) / sigma)
    p = jnp.clip(lo + u * (hi - lo), 1e-7, 1.0 - 1e-7)
    return jnp.clip(center + sigma * ndtri(p), t_min, t_max)


def corrupt(rng: jax.Array, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array,
            *, block_size: int, mask_id: int, t_min: float, t_max: float = 1.0,
            noise: str = "uniform", center=0.5, sigma: float = 0.3
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mask tokens block by block.

    Returns (noisy_tokens [B,T] int32, masked [B,T] bool, t [B,T] float32).
    ``t`` is the masking rate of the token's block (constant over the block;
    1.0 on padding so 1/t is always safe). Deterministic given ``rng``.

    The per-block rate is a hash of (rng, row, segment id, block index)
    (``jax.random.fold_in``), so tokens of one block share t wherever they sit
    in the row, matching the attention mask's block definition without
    assuming blocks are contiguous.
    """
    b, t = tokens.shape
    real = segment_ids > 0
    blk_key, tok_key = jax.random.split(rng)
    rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, t))
    blocks = block_ids(positions, block_size)

    def block_uniform(row, seg, blk):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(blk_key, row), seg), blk)
        return jax.random.uniform(key, (), jnp.float32)

    u_blk = jax.vmap(block_uniform)(rows.reshape(-1), segment_ids.reshape(-1).astype(jnp.int32),
                                    blocks.reshape(-1)).reshape(b, t)
    rate = noise_rate(u_blk, t_min=t_min, t_max=t_max, noise=noise, center=center, sigma=sigma)
    u_tok = jax.random.uniform(tok_key, (b, t), jnp.float32)
    masked = real & (u_tok < rate)
    noisy = jnp.where(masked, jnp.asarray(mask_id, tokens.dtype), tokens)
    return noisy, masked, jnp.where(real, rate, 1.0).astype(jnp.float32)


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """CE_i = logsumexp(logits_i) - logits_i[target_i]; logits [...,V], targets [...] -> [...]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           targets.astype(jnp.int32))


T_BUCKETS = (0.25, 0.5, 0.75)   # masked CE is also reported per masking-rate bucket


def diffusion_loss(logits: jax.Array, tokens: jax.Array, masked: jax.Array, t: jax.Array,
                   segment_ids: jax.Array, weighting: str = "elbo") -> tuple[jax.Array, dict]:
    """1/t-weighted CE on masked tokens, normalized by the number of real tokens
    (weighting="elbo"), or the mean CE over masked tokens (weighting="uniform").

    logits [B,T,V] fp32 (the model's output on the noisy tokens), tokens [B,T]
    (the clean targets), masked [B,T] bool, t [B,T] float32, segment_ids [B,T].
    Returns (loss scalar, aux) with aux:
      n_masked     number of masked (scored) tokens
      n_real       number of real tokens (the normalizer)
      masked_ce    mean unweighted CE over masked tokens (for logging)
      masked_acc   argmax accuracy over masked tokens
      masked_ce_t{j}  masked CE of the tokens whose t falls in bucket j of
                   [0, .25), [.25, .5), [.5, .75), [.75, 1] (NaN-free: 0 when empty)
    """
    ce = token_cross_entropy(logits, tokens)
    correct = jnp.argmax(logits, axis=-1) == tokens
    return diffusion_loss_from_ce(ce, correct, masked, t, segment_ids, weighting)


def diffusion_loss_from_ce(ce: jax.Array, correct: jax.Array, masked: jax.Array, t: jax.Array,
                           segment_ids: jax.Array, weighting: str = "elbo"
                           ) -> tuple[jax.Array, dict]:
    """``diffusion_loss`` from per-token CE [B,T] and argmax hits [B,T] (chunked_ce.py)."""
    if weighting not in ("elbo", "uniform"):
        raise ValueError(f"diffusion weighting must be 'elbo' or 'uniform', got {weighting!r}")
    real = segment_ids > 0
    m = masked & real
    mf = m.astype(jnp.float32)
    correct = correct.astype(jnp.float32)
    safe_t = jnp.where(m, t, 1.0)
    n_real = jnp.sum(real.astype(jnp.float32))
    n_masked = jnp.sum(mf)
    if weighting == "elbo":
        loss = jnp.sum(jnp.where(m, ce / safe_t, 0.0)) / jnp.maximum(n_real, 1.0)
    else:
        loss = jnp.sum(jnp.where(m, ce, 0.0)) / jnp.maximum(n_masked, 1.0)
    aux = {
        "n_masked": n_masked,
        "n_real": n_real,
        "masked_ce": jax.lax.stop_gradient(jnp.sum(ce * mf) / jnp.maximum(n_masked, 1.0)),
        "masked_acc": jnp.sum(correct * mf) / jnp.maximum(n_masked, 1.0),
    }
    bucket = jnp.searchsorted(jnp.asarray(T_BUCKETS, jnp.float32), t, side="right")
    for j in range(len(T_BUCKETS) + 1):
        in_j = mf * (bucket == j)
        aux[f"masked_ce_t{j}"] = jax.lax.stop_gradient(
            jnp.sum(ce * in_j) / jnp.maximum(jnp.sum(in_j), 1.0))
    return loss, aux
