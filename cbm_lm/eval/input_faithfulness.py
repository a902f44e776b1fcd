"""The deletion test (cbm_lm.eval.deletion) run on a model with integrated-gradients attributions.

Explained tokens are drawn from the held-out windows (seeded), each with at
least ``min_context`` context tokens. Autoregressive: y = x_{p+1} read at p,
context = positions [0, p]. Diffusion: y = x_p, its block [s, s+b) and
everything after masked, read at p, context = positions [0, s). Attribution
= IG of logit_y on the input embeddings (MASK baseline); deleting a context
token writes MASK at its position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cbm_lm.attribution.integrated_gradients import LogitQuery, integrated_gradients
from cbm_lm.eval.deletion import DeletionResult, deletion_auc
from cbm_lm.eval.heldout import HeldoutWindows
from cbm_lm.eval.report import MetricUnavailable
from cbm_lm.model import ConceptBottleneckLM


@nnx.jit
def _log_probs(model, tokens, read_pos, targets):
    logits = model(tokens).logits
    rows = jnp.arange(tokens.shape[0])
    return jax.nn.log_softmax(logits[rows, read_pos], -1)[rows, targets]


def explained_tokens(model_cfg, windows: HeldoutWindows, num: int, seed: int,
                     min_context: int = 8):
    """(inputs [E,T], read [E], targets [E], context list of [n_e]) drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    mask_id = model_cfg.resolved_mask_token_id
    cands = []
    for row in range(windows.num_rows):
        length = int(windows.segment_ids[row].sum())
        if model_cfg.objective == "autoregressive":
            cands += [(row, p) for p in range(min_context - 1, length - 1)]
        else:
            b = model_cfg.diffusion_block_size
            cands += [(row, p) for p in range(length) if (p // b) * b >= min_context]
    if not cands:
        raise MetricUnavailable(f"no token of the {windows.num_rows} held-out windows (longest "
                                f"{int(windows.segment_ids.sum(1).max(initial=0))} tokens) has "
                                f"{min_context} tokens of context")
    pick = rng.choice(len(cands), size=min(num, len(cands)), replace=False)
    inputs, read, targets, context = [], [], [], []
    for i in sorted(pick):
        row, p = cands[i]
        x = windows.tokens[row].copy()
        if model_cfg.objective == "autoregressive":
            read.append(p), targets.append(int(x[p + 1])), context.append(np.arange(p + 1))
        else:
            s = (p // model_cfg.diffusion_block_size) * model_cfg.diffusion_block_size
            targets.append(int(x[p]))
            x[s:] = mask_id
            read.append(p), context.append(np.arange(s))
        inputs.append(x)
    return np.stack(inputs), np.asarray(read, np.int32), np.asarray(targets, np.int32), context


def input_deletion(model: ConceptBottleneckLM, windows: HeldoutWindows, *, num_tokens: int = 24,
                   num_steps: int = 10, ig_steps: int = 8, seed: int = 0) -> DeletionResult:
    cfg = model.config
    inputs, read, targets, context = explained_tokens(cfg, windows, num_tokens, seed)
    q = LogitQuery(jnp.asarray(inputs), jnp.asarray(read), jnp.asarray(targets))
    attr = np.asarray(integrated_gradients(model, q, n_steps=ig_steps, batch_size=8).attributions)

    def log_prob_fn(x, example):
        return np.asarray(_log_probs(model, jnp.asarray(x), jnp.asarray(read[example]),
                                     jnp.asarray(targets[example])))

    return deletion_auc(log_prob_fn, inputs, context, [attr[e, c] for e, c in enumerate(context)],
                        cfg.resolved_mask_token_id, num_steps=num_steps, seed=seed)
