"""How much of each explained logit flows through known concepts, unknown concepts, epsilon.

For an explained token y at a position, the exact decomposition
(cbm_lm.attribution.decomposition) gives

  logit_y = C_known + C_unknown + C_eps,   C_known = sum_i w_i (E_k[i] . W_y), ...

with C_eps = residual . W_y computed from the residual vector itself, not
as logit minus the concept terms, so

  decomposition error = | C_known + C_unknown + C_eps - logit_y |

is a real check of the identity. Shares per token:

  share_x = |C_x| / (|C_known| + |C_unknown| + |C_eps|),   x in {known, unknown, eps}

reported as means over every explained token, with percentiles beside them.

Explained tokens: autoregressive, every next token; diffusion, every token
masked by one mask draw, per block rate t ~ U(0.5, 1) (mostly masked blocks,
as during generation; two-stream clean context when trained with it).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cbm_lm.attribution.decomposition import decompose_logits
from cbm_lm.eval.forward import map_rows
from cbm_lm.eval.heldout import HeldoutWindows
from cbm_lm.eval.perplexity import two_stream_inputs
from cbm_lm.eval.report import MetricUnavailable
from cbm_lm.model import ConceptBottleneckLM
from cbm_lm.objectives.diffusion import corrupt

PERCENTILES = (5, 25, 50, 75, 95)


@dataclasses.dataclass(frozen=True)
class LogitShares:
    known: float
    unknown: float
    epsilon: float
    max_error: float
    num_tokens: int
    percentiles: dict          # {"known": {"p5": ..}, ...}


def shares_from_contributions(c_known, c_unknown, c_eps) -> np.ndarray:
    """[N] group contributions -> shares [N,3] (known, unknown, eps); rows sum to 1."""
    parts = np.abs(np.stack([c_known, c_unknown, c_eps], -1)).astype(np.float64)
    return parts / np.maximum(parts.sum(-1, keepdims=True), 1e-30)


def summarize(c_known, c_unknown, c_eps, logit) -> LogitShares:
    """Means, percentiles and the identity's max error over N explained tokens ([N] each)."""
    shares = shares_from_contributions(c_known, c_unknown, c_eps)
    err = np.abs(np.asarray(c_known, np.float64) + c_unknown + c_eps - logit)
    pct = {name: {f"p{p}": float(np.percentile(shares[:, i], p)) for p in PERCENTILES}
           for i, name in enumerate(("known", "unknown", "epsilon"))}
    return LogitShares(*(float(x) for x in shares.mean(0)), float(err.max()), len(err), pct)


def _group_contributions(model, out, targets, explain):
    """Decomposes every position of ``targets`` [B,T] -> dict of [B,T] arrays."""
    b, t = targets.shape
    bi = jnp.repeat(jnp.arange(b), t)
    ti = jnp.tile(jnp.arange(t), b)
    dec = decompose_logits(model, out, bi, ti, targets.reshape(-1))
    shape = lambda x: x.reshape(b, t)  # noqa: E731
    return {"known": shape(dec.known_contrib.sum(-1)), "unknown": shape(dec.unknown_contrib.sum(-1)),
            "eps": shape(dec.epsilon_contrib), "logit": shape(dec.logit), "explain": explain}


@nnx.jit
def _ar_contributions(model, tokens, positions, segment_ids):
    out = model(tokens, positions=positions, segment_ids=segment_ids)
    targets = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], 1)
    nxt = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], 1)
    explain = (segment_ids > 0) & (nxt == segment_ids)
    return _group_contributions(model, out, targets, explain)


@nnx.jit(static_argnames=("block_size", "mask_id", "clean_context", "t_min"))
def _diffusion_contributions(model, tokens, positions, segment_ids, key, *, block_size, mask_id,
                             clean_context, t_min):
    noisy, masked, rate = corrupt(key, tokens, segment_ids, positions, block_size=block_size,
                                  mask_id=mask_id, t_min=t_min)
    if clean_context:
        x, p, s, stream = two_stream_inputs(noisy, tokens, positions, segment_ids)
        out = model(x, positions=p, segment_ids=s, stream=stream)
        out = jax.tree.map(lambda a: a[:, :tokens.shape[1]] if a.ndim >= 2 else a, out)
    else:
        out = model(noisy, positions=positions, segment_ids=segment_ids)
    return dict(_group_contributions(model, out, tokens, masked & (segment_ids > 0)), rate=rate)


def contributions(model: ConceptBottleneckLM, windows: HeldoutWindows, *, seed: int = 0,
                  batch: int = 8, clean_context: bool = True, t_min: float = 0.5
                  ) -> dict[str, np.ndarray]:
    """Every explained token's {"known", "unknown", "eps", "logit"} contributions, [N] each,
    and for diffusion its block's masking rate "rate" (t ~ U(t_min, 1); module docstring)."""
    cfg, w = model.config, windows

    def rows_of(rows):
        return (jnp.asarray(w.tokens[rows]), jnp.asarray(w.positions[rows]),
                jnp.asarray(w.segment_ids[rows]))

    if cfg.objective == "autoregressive":
        out = map_rows(lambda r: _ar_contributions(model, *rows_of(r)), w.num_rows, batch)
    else:
        out = map_rows(lambda r: _diffusion_contributions(
            model, *rows_of(r), jax.random.fold_in(jax.random.key(seed), int(r[0])),
            block_size=cfg.diffusion_block_size, mask_id=cfg.resolved_mask_token_id,
            clean_context=clean_context, t_min=t_min), w.num_rows, batch)
    m = out.pop("explain").astype(bool)
    if not m.any():
        raise MetricUnavailable(f"no token of the {w.num_rows} held-out windows to explain "
                                f"(none is followed by a token of its document, or masked)")
    return {k: v[m] for k, v in out.items()}


def logit_shares(model: ConceptBottleneckLM, windows: HeldoutWindows, *, seed: int = 0,
                 batch: int = 8, clean_context: bool = True) -> LogitShares:
    c = contributions(model, windows, seed=seed, batch=batch, clean_context=clean_context)
    return summarize(c["known"], c["unknown"], c["eps"], c["logit"])
