"""Row-wise top-k indices: a compiled XLA:CPU kernel where it helps, ``lax.top_k`` elsewhere.

  top_k_ids(x [...,n] f32, k) -> ids [...,k] int32,   x[..., ids] descending

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

from cbm_lm.model.cpu_kernels import cpu_primitive, register, use_kernel

_TARGET = "cbm_lm_topk_indices"
SOURCE = Path(__file__).with_name("topk_cpu.cc")


def available() -> bool:
    """Builds and registers the kernel once per process (model/cpu_kernels.py)."""
    return register(SOURCE, {_TARGET: "CbmTopKIndices"}, batch_partitionable=[_TARGET])


def _xla_ids(x: jax.Array, *, k: int) -> jax.Array:
    return jax.lax.top_k(x, k)[1].astype(jnp.int32)


def _batch(args, dims, *, k):
    """vmap keeps the kernel: the mapped axis is one more leading (row) dim."""
    (x,), (d,) = args, dims
    return topk_ids_p.bind(jnp.moveaxis(x, d, 0), k=k), 0


def _cpu_lowering(ctx, x, *, k):
    """The FFI call with batch-partitioning annotations (num_batch_dims for GSPMD, an sdy
    rule "... n -> ... k" for Shardy), so sharded leading dims stay sharded; without them
    the partitioner all-gathers x."""
    (aval_in,), (aval_out,) = ctx.avals_in, ctx.avals_out
    n_batch = len(aval_in.shape) - 1
    attrs = {"mhlo.frontend_attributes": mlir.ir_attribute({"num_batch_dims": str(n_batch)})}
    if jax.config.jax_use_shardy_partitioner:
        rule = str_to_sdy_sharding_rule("... n -> ... k" if n_batch else "n -> k")
        attrs["sdy.sharding_rule"] = sdy_sharding_rule_to_mlir(
            rule, [mlir.aval_to_ir_type(ctx.module_context, aval_in)],
            [mlir.aval_to_ir_type(ctx.module_context, aval_out)])
    return jax.ffi.ffi_lowering(_TARGET, extra_attributes=attrs)(ctx, x)


# One primitive, lowered per platform: the kernel for CPU, lax.top_k for the rest.
topk_ids_p = cpu_primitive("cbm_lm_topk_ids",
                           lambda x, *, k: ShapedArray(x.shape[:-1] + (k,), jnp.int32),
                           _xla_ids, cpu_lowering=_cpu_lowering, batcher=_batch)


def top_k_ids(x: jax.Array, k: int, kernel: str = "auto") -> jax.Array:
    """Indices [...,k] int32 of the k largest entries of x [...,n] along its last axis,
    ordered as ``lax.top_k`` orders them. No gradient flows (indices only)."""
    x = jax.lax.stop_gradient(x)
    if not use_kernel(kernel, available, x, what="top-k kernel") or k == 0 or x.size == 0:
        return _xla_ids(x, k=k)
    return topk_ids_p.bind(x, k=k)
