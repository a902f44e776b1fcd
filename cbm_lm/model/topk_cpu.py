"""Row-wise top-k indices: a compiled XLA:CPU kernel where it helps, ``lax.top_k`` elsewhere.

  top_k_ids(x [...,n] f32, k) -> ids [...,k] int32,   x[..., ids] descending
  top_k_capped(z [...,n] f32, k, clip, mode) -> (ids [...,k], z[..., ids])
      ids = top_k_ids(cap_logits(z, clip, mode), k): the concept heads' selection, ranked
      on the capped logits without writing them out, and the raw z at the winners

The same ids as ``jax.lax.top_k(x, k)[1]``, ties and NaN included (descending IEEE total
order, lower index first on ties; tests/test_topk_cpu.py holds the two equal). Why our
own: XLA:CPU runs TopK as a single-threaded ``std::partial_sort`` per row, about 100 ms of
the concept step at Steerling's proportions (2048 rows x 8192 concepts, k 128); the
kernel in ``topk_cpu.cc`` is O(n + k log k) per row and uses XLA's intra-op thread pool
(measured side by side in benchmarks/cpu_kernels.py).

The choice is made when the computation is lowered (one primitive, a lowering per
platform): CPU lowerings call the kernel, TPU/GPU lowerings (an AOT compile for a TPU
topology included) keep ``lax.top_k``. The CPU lowering is annotated batch-partitionable,
so sharded leading dims stay sharded; the ranked axis is gathered whole. It is compiled on first
use (model/cpu_kernels.py); where no compiler is found or the build fails, a warning is
logged once and ``lax.top_k`` is used.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from jax._src.core import ShapedArray
from jax._src.custom_partitioning_sharding_rule import (sdy_sharding_rule_to_mlir,
                                                        str_to_sdy_sharding_rule)
from jax.interpreters import mlir
import numpy as np

from cbm_lm.model.concept_topk import cap_logits
from cbm_lm.model.cpu_kernels import cpu_primitive, register, use_kernel

_TARGET = "cbm_lm_topk_indices"
_CAPPED = "cbm_lm_topk_capped"
SOURCE = Path(__file__).with_name("topk_cpu.cc")
# cap_logits' modes the kernels apply themselves (topk_row.h CapMode); "soft" stays XLA's.
KERNEL_CAP_MODES = {None: 0, "hard": 1, "straight_through": 2}


def available() -> bool:
    """Builds and registers the kernels once per process (model/cpu_kernels.py)."""
    return register(SOURCE, {_TARGET: "CbmTopKIndices", _CAPPED: "CbmTopKCapped"},
                    batch_partitionable=[_TARGET, _CAPPED])


def _batch_rule_attrs(ctx, rule: str, need_replication: tuple[str, ...] = ()) -> dict:
    """MLIR attrs that keep a batch-partitionable row kernel's leading (token) dims
    sharded: ``num_batch_dims`` for XLA's partitioner of such calls, and for Shardy the
    rule, with the factors in ``need_replication`` (the ranked axis) gathered whole."""
    n_batch = len(ctx.avals_in[0].shape) - 1
    attrs = {"mhlo.frontend_attributes": mlir.ir_attribute({"num_batch_dims": str(n_batch)})}
    if jax.config.jax_use_shardy_partitioner:
        sdy = str_to_sdy_sharding_rule(rule, need_replication_factors=need_replication)
        attrs["sdy.sharding_rule"] = sdy_sharding_rule_to_mlir(
            sdy, [mlir.aval_to_ir_type(ctx.module_context, a) for a in ctx.avals_in],
            [mlir.aval_to_ir_type(ctx.module_context, a) for a in ctx.avals_out])
    return attrs


def _xla_ids(x: jax.Array, *, k: int) -> jax.Array:
    return jax.lax.top_k(x, k)[1].astype(jnp.int32)


def _batch(args, dims, *, k):
    """vmap keeps the kernel: the mapped axis is one more leading (row) dim."""
    (x,), (d,) = args, dims
    return topk_ids_p.bind(jnp.moveaxis(x, d, 0), k=k), 0


def _cpu_lowering(ctx, x, *, k):
    """The FFI call with batch-partitioning annotations, so sharded leading dims stay
    sharded; without them the partitioner all-gathers x."""
    rule = "... n -> ... k" if len(ctx.avals_in[0].shape) > 1 else "n -> k"
    attrs = _batch_rule_attrs(ctx, rule, need_replication=("n",))
    return jax.ffi.ffi_lowering(_TARGET, extra_attributes=attrs)(ctx, x)


# One primitive, lowered per platform: the kernel for CPU, lax.top_k for the rest.
topk_ids_p = cpu_primitive("cbm_lm_topk_ids",
                           lambda x, *, k: ShapedArray(x.shape[:-1] + (k,), jnp.int32),
                           _xla_ids, cpu_lowering=_cpu_lowering, batcher=_batch)


def _xla_capped(z, *, k, clip, mode):
    ids = _xla_ids(cap_logits(z, clip, mode) if mode is not None else z, k=k)
    return ids, jnp.take_along_axis(z, ids, axis=-1)


def _capped_batch(args, dims, **params):
    (z,), (d,) = args, dims
    return topk_capped_p.bind(jnp.moveaxis(z, d, 0), **params), (0, 0)


def _capped_lowering(ctx, z, *, k, clip, mode):
    rule = "... n -> ... k, ... k" if len(ctx.avals_in[0].shape) > 1 else "n -> k, k"
    attrs = _batch_rule_attrs(ctx, rule, need_replication=("n",))
    return jax.ffi.ffi_lowering(_CAPPED, extra_attributes=attrs)(
        ctx, z, clip=np.float32(clip), mode=np.int32(KERNEL_CAP_MODES[mode]))


topk_capped_p = cpu_primitive(
    "cbm_lm_topk_capped",
    lambda z, *, k, clip, mode: (ShapedArray(z.shape[:-1] + (k,), jnp.int32),
                                 ShapedArray(z.shape[:-1] + (k,), jnp.float32)),
    _xla_capped, cpu_lowering=_capped_lowering, batcher=_capped_batch, multiple_results=True)


def top_k_capped(z: jax.Array, k: int, clip: float, mode: str | None,
                 kernel: str = "auto") -> tuple[jax.Array, jax.Array]:
    """(ids [...,k] int32, z[..., ids] [...,k]) with ids = top_k_ids(cap_logits(z, clip,
    mode), k): ranked on the capped logits, valued raw. ``mode`` None ranks z itself; a
    cap the kernel does not apply (soft) is formed by XLA. No gradient flows (the concept
    heads recompute the winners' logits for theirs)."""
    z = jax.lax.stop_gradient(z)
    check_k(k, z.shape[-1] if z.ndim else 0, "top_k_capped")
    if (use_kernel(kernel, available, z, what="top-k kernel")
            and mode in KERNEL_CAP_MODES and k > 0 and z.size > 0):
        ids, vals = topk_capped_p.bind(z, k=k, clip=float(clip), mode=mode)
        return ids, vals
    # the soft cap (or no kernel): XLA forms cap(z), top_k_ids ranks it (its own kernel or
    # lax.top_k, as ``kernel`` allows)
    ids = top_k_ids(z if mode is None else cap_logits(z, clip, mode), k, kernel)
    return ids, jnp.take_along_axis(z, ids, axis=-1)


def check_k(k: int, n: int, what: str) -> None:
    """Refuses k outside [0, n] when traced (the kernels would refuse it only when run)."""
    if not 0 <= k <= n:
        raise ValueError(f"{what}: need 0 <= k <= n, got k={k} for n={n}")


def top_k_ids(x: jax.Array, k: int, kernel: str = "auto") -> jax.Array:
    """Indices [...,k] int32 of the k largest entries of x [...,n] along its last axis,
    ordered as ``lax.top_k`` orders them. No gradient flows (indices only)."""
    x = jax.lax.stop_gradient(x)
    if not use_kernel(kernel, available, x, what="top-k kernel") or k == 0 or x.size == 0:
        return _xla_ids(x, k=k)
    return topk_ids_p.bind(x, k=k)
