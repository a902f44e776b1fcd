"""Inspecting a jaxpr for large intermediates (shared by the memory tests)."""

import math

from jax.extend.core import jaxprs_in_params


def max_intermediate_with_dim(closed_jaxpr, dim: int) -> int:
    """Largest size of an equation output having an axis of length ``dim``.

    Walks sub-jaxprs too (loops, conds, custom derivatives).
    """
    best = 0

    def walk(jaxpr):
        nonlocal best
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                shape = getattr(v.aval, "shape", ())
                if dim in shape:
                    best = max(best, math.prod(shape))
            for sub in jaxprs_in_params(eqn.params):
                walk(sub)

    walk(closed_jaxpr.jaxpr)
    return best
