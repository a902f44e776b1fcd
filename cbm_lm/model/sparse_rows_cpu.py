"""Gathered-row products of the concept heads, by compiled kernels on CPU.

  gather_mix(w [N,S], ids [N,S], T [C,V])  = sum_s w[n,s] T[ids[n,s]]      -> [N,V]
  gather_pick(q [N,V], T [C,V], ids [N,S]) = q[n] . T[ids[n,s]]            -> [N,S]

the known head's feature mix and selected-logit recompute under
``model.concepts.scoring="gather"``, with their gradients

  mix:  dw = gather_pick(g, T, ids),   dT = scatter(w, ids, g)
  pick: dq = gather_mix(g, ids, T),    dT = scatter(g, ids, q)
  scatter(a, ids, b)[c] = sum_{n,s: ids[n,s]=c} a[n,s] b[n]              -> [C,V]

Why our own: XLA:CPU forms the [N,S,V] rows (2048 tokens x 32 concepts x 512 floats,
134 MB, at the benchmark shape) for each product and scatter-adds as much back in the
backward; ``sparse_rows_cpu.cc`` reads each row in place (measured in
benchmarks/cpu_kernels.py's step comparison). Each op is a primitive lowered per platform: the
FFI kernel where XLA lowers for CPU, the same jnp gather ops as before on TPU/GPU (so
AOT compiles for TPU are unchanged). Ids outside [0, C) contribute nothing (jnp.take
would count a negative id from the end and fill a too-large one with NaN; the model
never passes either). Sharded operands are gathered
whole for the CPU kernel (a custom call's default partitioning). Where the kernel
cannot be built (model/cpu_kernels.py), the jnp ops run everywhere.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from jax._src.core import ShapedArray

from cbm_lm.model.cpu_kernels import cpu_primitive, register, use_kernel

SOURCE = Path(__file__).with_name("sparse_rows_cpu.cc")
_TARGETS = {"cbm_lm_rows_mix": "CbmRowsMix", "cbm_lm_rows_pick": "CbmRowsPick",
            "cbm_lm_rows_scatter": "CbmRowsScatter"}


def available() -> bool:
    return register(SOURCE, _TARGETS)


# -- the XLA forms (TPU/GPU lowerings, vmap, and the fallback) -------------------------
def _xla_mix(w, ids, table):
    """Rows cast to fp32 after the gather (a no-op for fp32), never the whole table."""
    return jnp.einsum("ns,nsv->nv", w.astype(jnp.float32),
                      jnp.take(table, ids, axis=0).astype(jnp.float32))


def _xla_pick(q, ids, table):
    return jnp.einsum("nv,nsv->ns", q.astype(jnp.float32),
                      jnp.take(table, ids, axis=0).astype(jnp.float32))


def _xla_scatter(a, ids, b, *, n_rows):
    return jnp.zeros((n_rows, b.shape[-1]), jnp.float32).at[ids].add(a[..., None] * b[:, None, :])


# per-example gradients (provenance/gradient.py) vmap them: cpu_primitive's default batcher
_mix_p = cpu_primitive("cbm_lm_rows_mix", lambda w, ids, t: ShapedArray(
    (w.shape[0], t.shape[1]), jnp.float32), _xla_mix)
_pick_p = cpu_primitive("cbm_lm_rows_pick", lambda q, ids, t: ShapedArray(
    ids.shape, jnp.float32), _xla_pick)
_scatter_p = cpu_primitive("cbm_lm_rows_scatter", lambda a, ids, b, *, n_rows: ShapedArray(
    (n_rows, b.shape[1]), jnp.float32), _xla_scatter)


# -- the differentiable products -------------------------------------------------------
@jax.custom_vjp
def _mix(w, ids, table):
    return _mix_p.bind(w, ids, table)


def _mix_fwd(w, ids, table):
    return _mix(w, ids, table), (w, ids, table)


def _mix_bwd(res, g):
    w, ids, table = res
    return (_pick_p.bind(g, ids, table), None,
            _scatter_p.bind(w, ids, g, n_rows=table.shape[0]))


_mix.defvjp(_mix_fwd, _mix_bwd)


@jax.custom_vjp
def _pick(q, table, ids):
    return _pick_p.bind(q, ids, table)


def _pick_fwd(q, table, ids):
    return _pick(q, table, ids), (q, table, ids)


def _pick_bwd(res, g):
    q, table, ids = res
    return (_mix_p.bind(g, ids, table), _scatter_p.bind(g, ids, q, n_rows=table.shape[0]),
            None)


_pick.defvjp(_pick_fwd, _pick_bwd)


def gather_mix(w: jax.Array, ids: jax.Array, table: jax.Array, kernel: str = "auto") -> jax.Array:
    """sum_s w[n,s] table[ids[n,s]]: w [N,S], ids [N,S] int, table [C,V] -> [N,V] fp32.
    Other dtypes keep the gather (rows cast to fp32 after it, never the whole table)."""
    if not use_kernel(kernel, available, w, table):
        return _xla_mix(w, ids, table)
    return _mix(w, ids.astype(jnp.int32), table)


def gather_pick(q: jax.Array, table: jax.Array, ids: jax.Array, kernel: str = "auto") -> jax.Array:
    """q[n] . table[ids[n,s]]: q [N,V], table [C,V], ids [N,S] int -> [N,S] fp32.
    Other dtypes keep the gather (rows cast to fp32 after it, never the whole table)."""
    if not use_kernel(kernel, available, q, table):
        return _xla_pick(q, ids, table)
    return _pick(q, table, ids.astype(jnp.int32))
