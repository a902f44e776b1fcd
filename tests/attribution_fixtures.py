"""Hand-built generation traces for the attribution tests (no sampler needed).

Two sequences of different prompt lengths, the second stopped early; the
tokens are random (attribution explains whatever was committed), the commit
order is a random permutation for diffusion and left to right for
autoregressive decoding.
"""

from __future__ import annotations

import numpy as np

from cbm_lm.inference.steer_spec import Injection, Intervention, Steering
from cbm_lm.inference.trace import GenerationTrace

PROMPT_LENS = (3, 5)
GEN_LENS = (6, 4)
MAX_NEW = 6


def hand_trace(cfg, objective: str = "diffusion", steering: Steering | None = None,
               per_step: int = 2, seed: int = 0) -> GenerationTrace:
    rng = np.random.default_rng(seed)
    mask_id, pad_id = cfg.resolved_mask_token_id, cfg.vocab_size - 2
    length = max(PROMPT_LENS) + MAX_NEW
    b = len(PROMPT_LENS)
    tokens = np.full((b, length), pad_id, np.int32)
    committed = np.full((b, length), -1, np.int32)
    for i, (p, g) in enumerate(zip(PROMPT_LENS, GEN_LENS)):
        tokens[i, : p + g] = rng.integers(0, cfg.vocab_size - 2, p + g)
        if objective == "diffusion":
            # up to per_step positions share a step, in a random order
            committed[i, p: p + g] = rng.permutation(MAX_NEW)[:g] // per_step
        else:
            committed[i, p: p + g] = np.arange(g)
    return GenerationTrace(
        tokens=tokens, prompt_lens=np.asarray(PROMPT_LENS, np.int32),
        gen_lens=np.asarray(GEN_LENS, np.int32), committed_step=committed, objective=objective,
        mask_id=mask_id, pad_id=pad_id, max_new_tokens=MAX_NEW,
        num_steps=int(committed.max()) + 1, steering=steering or Steering())


def steerings(cfg, seed: int = 0) -> dict[str, Steering]:
    """No steering, a weight intervention, and a residual injection with a cutoff."""
    rng = np.random.default_rng(seed)
    d = rng.normal(size=cfg.d_model).astype(np.float32)
    return {
        "none": Steering(),
        "intervene": Steering(intervention=Intervention(known={3: 0.9, 11: 0.0}, unknown={5: 0.7})),
        "inject": Steering(injection=Injection(d / np.linalg.norm(d), alpha=2.0, layer=1,
                                               cutoff_tokens=3)),
    }
