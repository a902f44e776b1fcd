"""Sampling settings and Steerling's logit processing, batched in jax.

For one position's logits l [V] (rows are processed independently; shapes
[...,V]), in Steerling's order:

  1. ReLU concept suppression:  l -= m            (m [V], steer_spec.Steering.logit_mask)
  2. repetition penalty r:      for every token v present in the sequence,
                                l_v = l_v / r if l_v > 0 else l_v * r
  3. banned tokens:             l_v = -inf  for v in banned_ids (MASK, PAD, EOS, ...)
  4. sample:
     entropy-adaptive (Steerling's default): p = softmax(l), k = max(#{cumsum of
       sorted p <= top_p} + 1, 2), H = -sum p log(p + 1e-10),
       T = 0.3 + 0.4 min(1, H / log k), then top-p sampling from softmax(l / T);
     else with temperature T > 0 and top_p > 0: top-p sampling from softmax(l / T);
     else argmax.
  Top-p keeps the sorted tokens whose preceding mass is <= top_p (at least one).

The confidence a diffusion sampler ranks positions by is max softmax(l) of the
processed logits (no temperature), as Steerling ranks them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to generate. Defaults are Steerling's GenerationConfig except the length.

    block_size: diffusion unmasking block (None: the model's attention block,
      model.diffusion_block_size, as SteerlingGenerator does).
    steps_per_block: diffusion steps per block (None: block_size, one token per
      step, Steerling's default steps = max_new_tokens).
    grid: diffusion block grid, "steerling" or "training" (diffusion_sampler.py).
    banned_ids: never sampled (the caller passes MASK, PAD and EOS ids).
    stop_ids: a sequence stops after the block (diffusion) or token (AR) that
      produced one of these.
    """
    max_new_tokens: int = 64
    block_size: int | None = None   # None: the model's diffusion_block_size (as Steerling)
    steps_per_block: int | None = None
    grid: str = "steerling"
    temperature: float = 1.2
    top_p: float = 0.8
    repetition_penalty: float = 1.1
    use_entropy_sampling: bool = True
    cfg_scale: float = 0.0
    seed: int = 0
    banned_ids: tuple[int, ...] = ()
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self):
        checks = [(self.max_new_tokens > 0, "max_new_tokens", "must be > 0"),
                  (self.block_size is None or self.block_size > 0, "block_size", "must be > 0"),
                  (self.steps_per_block is None or self.steps_per_block > 0,
                   "steps_per_block", "must be None or > 0"),
                  (self.grid in ("steerling", "training"), "grid", "must be steerling|training"),
                  (self.temperature >= 0, "temperature", "must be >= 0"),
                  (0 <= self.top_p <= 1, "top_p", "must be in [0, 1]"),
                  (self.repetition_penalty >= 1, "repetition_penalty", "must be >= 1"),
                  (self.cfg_scale >= 0, "cfg_scale", "must be >= 0")]
        for ok, name, msg in checks:
            if not ok:
                raise ValueError(f"SamplingConfig.{name}={getattr(self, name)!r}: {msg}")

    def resolved(self, model_block_size: int) -> "SamplingConfig":
        """block_size and steps_per_block filled in (steps capped at the block size)."""
        block = self.block_size or model_block_size
        return self.replace(block_size=block,
                            steps_per_block=min(self.steps_per_block or block, block))

    def replace(self, **kw) -> "SamplingConfig":
        return dataclasses.replace(self, **kw)


def token_presence(tokens: jax.Array, valid: jax.Array, vocab: int) -> jax.Array:
    """[B,V] bool: which ids occur at the valid positions of tokens [B,L]."""
    b = tokens.shape[0]
    ids = jnp.where(valid, tokens, vocab)                 # invalid -> an extra dropped column
    hits = jnp.zeros((b, vocab + 1), bool).at[jnp.arange(b)[:, None], ids].set(True)
    return hits[:, :vocab]


def process_logits(logits: jax.Array, presence: jax.Array, cfg: SamplingConfig,
                   logit_mask: jax.Array | None = None) -> jax.Array:
    """Steps 1-3 on logits [B,N,V] with presence [B,V] -> fp32 [B,N,V]."""
    l = logits.astype(jnp.float32)
    if logit_mask is not None:
        l = l - logit_mask.astype(jnp.float32)
    r = cfg.repetition_penalty
    if r != 1.0:
        penalized = jnp.where(l > 0, l / r, l * r)
        l = jnp.where(presence[:, None, :], penalized, l)
    if cfg.banned_ids:
        banned = jnp.zeros(l.shape[-1], bool).at[jnp.asarray(cfg.banned_ids)].set(True)
        l = jnp.where(banned, NEG_INF, l)
    return l


def confidence(logits: jax.Array) -> jax.Array:
    """max_v softmax(l)_v [...]: how sure the model is at each position."""
    return jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)


def _top_p_sample(key, logits: jax.Array, top_p: float) -> jax.Array:
    """One token per row of logits [N,V] from softmax restricted to the top-p nucleus."""
    probs = jax.nn.softmax(logits, axis=-1)
    order = jnp.argsort(-probs, axis=-1)
    sorted_p = jnp.take_along_axis(probs, order, axis=-1)
    before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
    keep = (before <= top_p).at[:, 0].set(True)
    choice = jax.random.categorical(key, jnp.where(keep, jnp.log(sorted_p), NEG_INF), axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]


def entropy_temperature(logits: jax.Array, top_p: float) -> jax.Array:
    """Steerling's entropy-adaptive temperature per row of logits [N,V] -> [N]."""
    probs = jax.nn.softmax(logits, axis=-1)
    sorted_p = -jnp.sort(-probs, axis=-1)
    k = jnp.maximum(jnp.sum(jnp.cumsum(sorted_p, axis=-1) <= top_p, axis=-1) + 1, 2)
    entropy = -jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1)
    return 0.3 + 0.4 * jnp.minimum(1.0, entropy / jnp.log(k.astype(jnp.float32)))


def sample_tokens(key, logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Step 4 on processed logits [...,V] -> token ids [...] int32."""
    shape = logits.shape[:-1]
    l = logits.reshape(-1, logits.shape[-1])
    if cfg.use_entropy_sampling:
        t = entropy_temperature(l, cfg.top_p)
        tok = _top_p_sample(key, l / t[:, None], cfg.top_p)
    elif cfg.top_p > 0 and cfg.temperature > 0:
        tok = _top_p_sample(key, l / cfg.temperature, cfg.top_p)
    else:
        tok = jnp.argmax(l, axis=-1)
    return tok.reshape(shape).astype(jnp.int32)
