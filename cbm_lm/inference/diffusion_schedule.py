"""Which block each diffusion step works on, and how many tokens it commits.

The N generated positions [P, P+N) of a sequence are unmasked block by block.
Two block grids:

  steerling: blocks start at the prompt's end, [P + k b, P + (k+1) b)
             (SteerlingGenerator; its attention blocks still sit on multiples
             of b, so a generation block straddles two attention blocks
             unless b divides P).
  training:  blocks on multiples of b, [k b, (k+1) b) cut to [P, P+N): the
             first block may be partial. This is the grid cbm_lm's masked-
             diffusion training uses (objectives/diffusion.py draws one noise
             level per attention block of b positions, and the two-stream
             clean context is block-aligned), so a model trained here sees at
             generation time the same kind of partially masked blocks it was
             trained on.

A block of m masked tokens gets S_k = ceil(m S / b) steps (S = steps per full
block; S_k = S for a full block) and step i of the block commits
n_i = m // S_k + [i < m mod S_k] tokens: Steerling's linear schedule.
Sequences advance through their own blocks at one step per forward pass, so
a sequence's schedule never depends on the other rows of the batch.
"""

from __future__ import annotations

import math

import numpy as np


def blocks(prompt_len: int, n_new: int, block: int, grid: str) -> list[tuple[int, int]]:
    """[(start, end)] of the unmasking blocks of one sequence."""
    end = prompt_len + n_new
    if grid == "steerling":
        edges = list(range(prompt_len, end, block)) + [end]
    elif grid == "training":
        first = (prompt_len // block + 1) * block
        edges = [prompt_len] + list(range(first, end, block)) + [end]
    else:
        raise ValueError(f"unknown block grid {grid!r}; expected steerling|training")
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def schedule(prompt_lens, n_new: int, block: int, steps_per_block: int, grid: str) -> dict:
    """Step tables [B,T_s] (T_s = the longest schedule): start, length, n_commit, last.

    Row b at step s works on the block [start, start + length), commits
    n_commit of its still-masked positions, and ``last`` marks the block's
    final step (when stop tokens are checked). Rows whose schedule is shorter
    are padded with length = n_commit = 0.
    """
    rows = []
    for p in np.asarray(prompt_lens).tolist():
        steps = []
        for a, b in blocks(int(p), n_new, block, grid):
            m = b - a
            s_k = math.ceil(m * steps_per_block / block)
            for i in range(s_k):
                steps.append((a, m, m // s_k + (i < m % s_k), i == s_k - 1))
        rows.append(steps)
    t_s = max(len(r) for r in rows)
    out = {k: np.zeros((len(rows), t_s), np.int32) for k in ("start", "length", "n_commit")}
    out["last"] = np.zeros((len(rows), t_s), bool)
    for i, r in enumerate(rows):
        for s, (a, m, n, last) in enumerate(r):
            out["start"][i, s], out["length"][i, s], out["n_commit"][i, s] = a, m, n
            out["last"][i, s] = last
    return out


def max_commits_per_step(block: int, steps_per_block: int) -> int:
    """Upper bound of n_commit over every block size: ceil(b / S)."""
    return -(-block // steps_per_block)
