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

from functools import partial
from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp
from jax._src import dispatch
from jax._src.core import ShapedArray
from jax._src.custom_partitioning_sharding_rule import (sdy_sharding_rule_to_mlir,
                                                        str_to_sdy_sharding_rule)
from jax.interpreters import batching, mlir

from cbm_lm.model.cpu_kernels import KERNELS, register

_TARGET = "cbm_lm_topk_indices"
SOURCE = Path(__file__).with_name("topk_cpu.cc")


def available() -> bool:
    """Builds and registers the kernel once per process (model/cpu_kernels.py)."""
    return register(SOURCE, {_TARGET: "CbmTopKIndices"}, batch_partitionable=[_TARGET])


def _xla_ids(x: jax.Array, k: int) -> jax.Array:
    return jax.lax.top_k(x, k)[1].astype(jnp.int32)


# One primitive, lowered per platform: the FFI kernel for CPU, lax.top_k for the rest.
# A primitive (not a bare ffi_call) so its lowering can carry the batch-partitioning
# annotations (num_batch_dims for GSPMD, an sdy rule "... n -> ... k" for Shardy) that
# keep sharded leading dims sharded; without them the partitioner all-gathers x.
topk_ids_p = jax.extend.core.Primitive("cbm_lm_topk_ids")
topk_ids_p.def_impl(partial(dispatch.apply_primitive, topk_ids_p))
topk_ids_p.def_abstract_eval(
    lambda x, *, k: ShapedArray(x.shape[:-1] + (k,), jnp.int32))


def _batch(args, dims, *, k):
    (x,), (d,) = args, dims
    return topk_ids_p.bind(jnp.moveaxis(x, d, 0), k=k), 0


def _cpu_lowering(ctx, x, *, k):
    (aval_in,), (aval_out,) = ctx.avals_in, ctx.avals_out
    n_batch = len(aval_in.shape) - 1
    attrs = {"mhlo.frontend_attributes": mlir.ir_attribute({"num_batch_dims": str(n_batch)})}
    if jax.config.jax_use_shardy_partitioner:
        rule = str_to_sdy_sharding_rule("... n -> ... k" if n_batch else "n -> k")
        attrs["sdy.sharding_rule"] = sdy_sharding_rule_to_mlir(
            rule, [mlir.aval_to_ir_type(ctx.module_context, aval_in)],
            [mlir.aval_to_ir_type(ctx.module_context, aval_out)])
    return jax.ffi.ffi_lowering(_TARGET, extra_attributes=attrs)(ctx, x)


batching.primitive_batchers[topk_ids_p] = _batch
mlir.register_lowering(topk_ids_p, mlir.lower_fun(lambda x, *, k: _xla_ids(x, k),
                                                  multiple_results=False))
mlir.register_lowering(topk_ids_p, _cpu_lowering, platform="cpu")


def top_k_ids(x: jax.Array, k: int, kernel: str = "auto") -> jax.Array:
    """Indices [...,k] int32 of the k largest entries of x [...,n] along its last axis,
    ordered as ``lax.top_k`` orders them. No gradient flows (indices only)."""
    if kernel not in KERNELS:
        raise ValueError(f"top-k kernel must be one of {KERNELS}, got {kernel!r}")
    x = jax.lax.stop_gradient(x)
    if (kernel == "xla" or x.dtype != jnp.float32 or k == 0 or x.size == 0
            or not available()):
        return _xla_ids(x, k)
    return topk_ids_p.bind(x, k=k)
