"""Laying prompts of different lengths out as one right-padded batch.

Sequence b occupies [0, P_b + N) of a row of length L (N = max_new_tokens):
its prompt, then N generation slots; positions from P_b + N on are padding.
Padding sits in segment 0 and the document in segment 1, so attention never
mixes them (model/attention.py) and every row computes exactly what it would
alone. L is rounded up to a multiple of ``bucket`` so that prompts of nearby
lengths share one compiled program (one jax.jit per shape bucket).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cbm_lm.config import round_up


def as_prompt_list(prompts) -> list[np.ndarray]:
    """A [B,P] array, one sequence, or a list of sequences -> list of int32 arrays."""
    if hasattr(prompts, "__array__"):           # numpy or jax: its rank says which
        prompts = np.asarray(prompts)
        if prompts.ndim == 2:
            return [np.asarray(p, np.int32) for p in prompts]
        if prompts.ndim > 2:
            raise ValueError(f"prompts: expected token ids [P] or a batch [B,P], got an array "
                             f"of shape {prompts.shape}")
        return [np.asarray(prompts, np.int32).reshape(-1)]
    if len(prompts) and np.ndim(prompts[0]) == 0:   # a flat sequence of ids (ints, 0-d arrays)
        return [np.asarray(prompts, np.int32)]
    return [np.asarray(p, np.int32).reshape(-1) for p in prompts]


def layout(prompts: Sequence[Sequence[int]], max_new_tokens: int, *, vocab_size: int,
           fill_id: int, pad_id: int, bucket: int = 64, max_len: int | None = None):
    """-> x [B,L] int32 (prompt, fill_id in the N slots, pad_id after), prompt_lens [B], seg [B,L].

    Raises ValueError naming the prompt when one is empty, holds ids outside
    [0, vocab_size), or does not fit ``max_len`` with the new tokens.
    """
    prompts = as_prompt_list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if p.size == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        if p.min() < 0 or p.max() >= vocab_size:
            bad = int(p[(p < 0) | (p >= vocab_size)][0])
            raise ValueError(f"prompt {i} holds id {bad}, outside the vocabulary [0, {vocab_size})")
    lens = np.asarray([len(p) for p in prompts], np.int32)
    need = int(lens.max()) + max_new_tokens
    if max_len is not None and need > max_len:
        raise ValueError(f"prompt {int(lens.argmax())} has {int(lens.max())} tokens; with "
                         f"max_new_tokens={max_new_tokens} that is {need} > the model's "
                         f"max_seq_len={max_len}")
    length = round_up(need, bucket) if bucket else need      # bucket 0: no bucketing
    if max_len is not None:
        length = min(length, max(max_len, need))
    x = np.full((len(prompts), length), pad_id, np.int32)
    pos = np.arange(length)[None, :]
    window = lens[:, None] + max_new_tokens
    x = np.where(pos < window, fill_id, x)
    for b, p in enumerate(prompts):
        x[b, : len(p)] = p
    return x, lens, (pos < window).astype(np.int32)


_SHAPES = {1: "[T]", 2: "[B,T]"}


def load_prompt_ids(path, *, vocab_size: int | None = None,
                    ndims: tuple[int, ...] = (1, 2)) -> np.ndarray:
    """Token ids from a .npy file -> an int32 array of rank in ``ndims`` ([T] or [B,T]).

    Raises FileNotFoundError when ``path`` does not exist, and ValueError naming the file
    when it is not a .npy array, its dtype is not integer, its rank is not in ``ndims``,
    it is empty, or an id is negative (or >= ``vocab_size`` when given).
    """
    import io

    from etils import epath

    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file (expected a .npy array of token ids)")
    try:
        ids = np.load(io.BytesIO(p.read_bytes()), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy array ({e})") from None
    if not isinstance(ids, np.ndarray):     # an .npz archive
        raise ValueError(f"{path}: an .npz archive; expected one .npy array of token ids")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{path}: ids must be integers, got dtype {ids.dtype}")
    if ids.ndim not in ndims:
        want = " or ".join(_SHAPES.get(n, f"rank {n}") for n in ndims)
        raise ValueError(f"{path}: ids must have shape {want}, got {list(ids.shape)}"
                         + (" (a single sequence: save ids[None])"
                            if ids.ndim == 1 and 2 in ndims else ""))
    if ids.size == 0:
        raise ValueError(f"{path}: ids are empty (shape {list(ids.shape)})")
    lo, hi = int(ids.min()), int(ids.max())
    top = np.iinfo(np.int32).max + 1 if vocab_size is None else vocab_size
    if lo < 0 or hi >= top:
        bad = np.argwhere((ids < 0) | (ids >= top))[0].tolist()
        where = "[b,t]" if ids.ndim == 2 else "[t]"
        what = (f"the vocabulary [0, {vocab_size})" if vocab_size is not None
                else f"[0, {top}) (token ids are non-negative int32)")
        raise ValueError(f"{path}: id {int(ids[tuple(bad)])} at {where}={bad} is outside {what} "
                         f"(ids span [{lo}, {hi}])")
    return ids.astype(np.int32)


def single_prompt_ids(ids: np.ndarray, path) -> np.ndarray:
    """[T] or [1,T] ids -> [T]; ValueError naming ``path`` and the shape for a batch B != 1."""
    if ids.ndim == 2 and ids.shape[0] != 1:
        raise ValueError(f"{path}: expected one sequence ([T] or [1,T]), got a batch of shape "
                         f"{list(ids.shape)}; save the row to explain, e.g. ids[i:i+1]")
    return ids.reshape(-1)


def random_prompt_ids(vocab_size: int, length: int, seed: int = 0) -> np.ndarray:
    """``length`` uniform random ids in [0, vocab_size): a prompt when no text is at hand."""
    return np.random.default_rng(seed).integers(0, vocab_size, size=length).astype(np.int32)
