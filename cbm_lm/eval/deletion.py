"""Deletion test of input attributions: does removing the top-attributed context hurt most?

For an explained token y with context positions P (|P| = n) and an order
pi over P (by attribution, highest first, or uniformly random), delete
(replace with MASK) the first round(f n) positions of pi for f on a grid
0 = f_0 < ... < f_K = 1 and track

  curve(f) = log p(y | context with those positions deleted).

  AUC = integral_0^1 curve(f) df    (trapezoid rule on the grid)

A faithful attribution drives log p(y) down fastest, so its AUC is lower
than the random order's. Reported: the mean AUC over explained tokens for
both orders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class DeletionResult:
    attribution_auc: float
    random_auc: float
    num_tokens: int
    fractions: list[float]
    attribution_curve: list[float]   # mean curve over explained tokens
    random_curve: list[float]


def deleted_inputs(tokens: np.ndarray, order: np.ndarray, counts: np.ndarray,
                   mask_id: int) -> np.ndarray:
    """tokens [T], order [n] positions, counts [K+1] -> [K+1,T] with order[:c] masked."""
    out = np.repeat(tokens[None], len(counts), 0)
    for k, c in enumerate(counts):
        out[k, order[:c]] = mask_id
    return out


def trapezoid_auc(fractions: np.ndarray, curve: np.ndarray) -> np.ndarray:
    """integral over fractions of curve [..., K+1] (trapezoid) -> [...]."""
    return np.trapezoid(curve, fractions, axis=-1)


def deletion_auc(log_prob_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
                 tokens: np.ndarray, context: list[np.ndarray], attributions: list[np.ndarray],
                 mask_id: int, *, num_steps: int = 10, seed: int = 0) -> DeletionResult:
    """Deletion AUCs for E explained tokens.

    log_prob_fn(inputs [M,T], example [M]) -> log p(y_e | inputs) [M] for the
      explained token of example e (its target and read position are the caller's).
    tokens [E,T]: each example's input; context[e]: its deletable positions [n_e];
    attributions[e]: a score per context position [n_e] (higher = more important).
    """
    rng = np.random.default_rng(seed)
    fractions = np.linspace(0.0, 1.0, num_steps + 1)
    curves = {"attribution": [], "random": []}
    for e in range(len(tokens)):
        ctx = np.asarray(context[e])
        counts = np.round(fractions * len(ctx)).astype(int)
        orders = {"attribution": ctx[np.argsort(-np.asarray(attributions[e]), kind="stable")],
                  "random": rng.permutation(ctx)}
        for name, order in orders.items():
            inputs = deleted_inputs(tokens[e], order, counts, mask_id)
            curves[name].append(np.asarray(log_prob_fn(inputs, np.full(len(inputs), e))))
    att, rnd = np.stack(curves["attribution"]), np.stack(curves["random"])
    return DeletionResult(float(trapezoid_auc(fractions, att).mean()),
                          float(trapezoid_auc(fractions, rnd).mean()), len(tokens),
                          fractions.tolist(), att.mean(0).tolist(), rnd.mean(0).tolist())
