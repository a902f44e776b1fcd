"""generate(): the sampler a model's objective calls for, returning a GenerationTrace.

  trace = generate(model, prompts, SamplingConfig(max_new_tokens=64, seed=1),
                   steering=amplify(model, "topic:kings", vocab=vocab),
                   pad_id=tokenizer.pad_id)

A diffusion model (block-causal attention) is unmasked block by block
(diffusion_sampler.py); an autoregressive one (causal attention) decodes
with a KV cache (ar_sampler.py). Both read the same SamplingConfig and
Steering and return the same trace (trace.py), so attribution treats them
alike.
"""

from __future__ import annotations

from cbm_lm.inference.ar_sampler import generate_autoregressive
from cbm_lm.inference.diffusion_sampler import generate_diffusion
from cbm_lm.inference.logit_processing import SamplingConfig
from cbm_lm.inference.steer_spec import Steering
from cbm_lm.inference.trace import GenerationTrace


def generate(model, prompts, cfg: SamplingConfig | None = None, steering: Steering | None = None,
             *, pad_id: int, seeds=None, capture_fn=None, bucket: int = 64) -> GenerationTrace:
    """Generates after each prompt (a [B,P] array or a list of id lists) -> GenerationTrace."""
    cfg = cfg or SamplingConfig()
    sampler = generate_autoregressive if model.config.attention == "causal" else generate_diffusion
    return sampler(model, prompts, cfg, steering, pad_id=pad_id, seeds=seeds,
                   capture_fn=capture_fn, bucket=bucket)
