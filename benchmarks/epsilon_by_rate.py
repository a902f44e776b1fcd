"""Where a trained run's epsilon share comes from: by masking rate, and in absolute logits.

    python benchmarks/epsilon_by_rate.py RUN [RUN ...]

Eval only: restores each RUN's newest checkpoint, draws 128 of the attribution-eval
binary's held-out windows (seed 0) and decomposes every explained logit exactly
(cbm_lm.eval.logit_shares) into c_known + c_unknown + c_eps. Explained tokens: next
tokens (autoregressive), or the masked tokens of one mask draw with the block rate
t ~ U(0, 1) (diffusion: the whole range, where the eval binary draws t ~ U(0.5, 1)),
two-stream clean context as trained. Prints per run the mean shares and the mean
absolute contributions |logit_y|, |c_eps|, |c_known + c_unknown|, and for diffusion the
same per bucket of t (tenths). Reading: a share that is flat in t is not set by how much
of the block is hidden; |c_eps| against |logit_y| says whether epsilon is large or the
concept-carried logit small.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from cbm_lm.eval.forward import map_rows  # noqa: E402
from cbm_lm.eval.heldout import heldout_windows  # noqa: E402
from cbm_lm.eval.logit_shares import (_ar_contributions, _group_contributions,  # noqa: E402
                                      shares_from_contributions)
from cbm_lm.eval.perplexity import two_stream_inputs  # noqa: E402
from cbm_lm.eval.target import load_target  # noqa: E402
from cbm_lm.objectives.diffusion import corrupt  # noqa: E402


@nnx.jit(static_argnames=("block_size", "mask_id", "clean_context"))
def _diffusion_all_rates(model, tokens, positions, segment_ids, key, *, block_size, mask_id,
                         clean_context):
    noisy, masked, rate = corrupt(key, tokens, segment_ids, positions, block_size=block_size,
                                  mask_id=mask_id, t_min=0.0)
    if clean_context:
        x, p, s, stream = two_stream_inputs(noisy, tokens, positions, segment_ids)
        out = model(x, positions=p, segment_ids=s, stream=stream)
        out = jax.tree.map(lambda a: a[:, :tokens.shape[1]] if a.ndim >= 2 else a, out)
    else:
        out = model(noisy, positions=positions, segment_ids=segment_ids)
    d = _group_contributions(model, out, tokens, masked & (segment_ids > 0))
    d["rate"] = rate
    return d


def _summary(c) -> str:
    sh = shares_from_contributions(c["known"], c["unknown"], c["eps"]).mean(0)
    return (f"n {len(c['eps']):6d}  shares known/unknown/eps {sh[0]:.3f}/{sh[1]:.3f}/{sh[2]:.3f}"
            f"  |logit| {np.abs(c['logit']).mean():.2f}  |c_eps| {np.abs(c['eps']).mean():.2f}"
            f"  |c_known+c_unknown| {np.abs(c['known'] + c['unknown']).mean():.2f}")


def main(runs: list[str]) -> None:
    for run in runs:
        tgt = load_target(workdir=run)
        model, cfg = tgt.model, tgt.model.config
        w = heldout_windows(tgt.corpus, 128, model.config.max_seq_len, 0)
        rows = lambda r: (jnp.asarray(w.tokens[r]), jnp.asarray(w.positions[r]),  # noqa: E731
                          jnp.asarray(w.segment_ids[r]))
        if cfg.objective == "autoregressive":
            out = map_rows(lambda r: _ar_contributions(model, *rows(r)), w.num_rows, 8)
        else:
            clean = bool((tgt.config.get("loss", {}) or {}).get("diffusion_clean_context", True))
            out = map_rows(lambda r: _diffusion_all_rates(
                model, *rows(r), jax.random.fold_in(jax.random.key(0), int(r[0])),
                block_size=cfg.diffusion_block_size, mask_id=cfg.resolved_mask_token_id,
                clean_context=clean), w.num_rows, 8)
        m = out["explain"].astype(bool)
        c = {k: np.asarray(v)[m] for k, v in out.items() if k != "explain"}
        print(f"{run} ({cfg.objective}, step {tgt.step})\n  all          {_summary(c)}")
        if "rate" in c:
            for lo in np.arange(0.0, 1.0, 0.1):
                sel = (c["rate"] >= lo) & (c["rate"] < lo + 0.1)
                if sel.any():
                    print(f"  t {lo:.1f}-{lo + 0.1:.1f}    "
                          f"{_summary({k: v[sel] for k, v in c.items()})}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
