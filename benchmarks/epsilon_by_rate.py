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

from cbm_lm.eval.heldout import heldout_windows  # noqa: E402
from cbm_lm.eval.logit_shares import contributions, shares_from_contributions  # noqa: E402
from cbm_lm.eval.target import load_target  # noqa: E402


def _summary(c) -> str:
    sh = shares_from_contributions(c["known"], c["unknown"], c["eps"]).mean(0)
    return (f"n {len(c['eps']):6d}  shares known/unknown/eps {sh[0]:.3f}/{sh[1]:.3f}/{sh[2]:.3f}"
            f"  |logit| {np.abs(c['logit']).mean():.2f}  |c_eps| {np.abs(c['eps']).mean():.2f}"
            f"  |c_known+c_unknown| {np.abs(c['known'] + c['unknown']).mean():.2f}")


def main(runs: list[str]) -> None:
    for run in runs:
        tgt = load_target(workdir=run)
        model = tgt.model
        clean = bool((tgt.config.get("loss", {}) or {}).get("diffusion_clean_context", True))
        c = contributions(model, heldout_windows(tgt.corpus, 128, model.config.max_seq_len, 0),
                          clean_context=clean, t_min=0.0)
        print(f"{run} ({model.config.objective}, step {tgt.step})\n  all          {_summary(c)}")
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
