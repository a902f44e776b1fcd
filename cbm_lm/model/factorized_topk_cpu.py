"""A factorized concept head's top-k, scored and ranked without forming its logits.

  factorized_top_k(q [...,r], ut [r,n], k, clip, mode) -> (ids [...,k] int32, z[..., ids])
      z = q ut;  ids = top_k_ids(cap_logits(z, clip, mode), k)   (model/topk_cpu.py)

Why: at Steerling's proportions the unknown head's z is [2048, 8192] from a rank-32
product. XLA:CPU writes it at about a fifth of the matmul peak (the write, not the
FLOPs, bounds it), then reads it back to cap and to rank it: 48 ms of the forward in
three passes over 64 MiB. ``factorized_topk_cpu.cc`` scores 8 rows at a time into a
buffer that stays in cache and ranks them there (measured side by side in
benchmarks/cpu_kernels.py).

z is summed over the rank in order, so a row's ids do not depend on how rows are split
over threads or devices; they can differ from XLA's own product, which sums in another
order, only where two logits tie to within rounding. Elsewhere (TPU/GPU lowerings, an
AOT compile included; ``kernel="xla"``; the "soft" cap; no compiler) it is XLA's
product followed by ``top_k_capped``.

Sharding: XLA's partitioner for batch-partitionable calls splits every operand along
its leading dims, which ut does not share, so the CPU call is not marked so and a
sharded q is gathered whole. Callers that know the token axes map it over the row
shards instead (concept_topk.map_row_shards, as the concept heads do).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from jax._src.core import ShapedArray
import numpy as np

from cbm_lm.model.cpu_kernels import cpu_primitive, register, use_kernel
from cbm_lm.model.topk_cpu import KERNEL_CAP_MODES, check_k, top_k_capped

_TARGET = "cbm_lm_factorized_topk"
SOURCE = Path(__file__).with_name("factorized_topk_cpu.cc")


def available() -> bool:
    """Builds and registers the kernel once per process (model/cpu_kernels.py)."""
    return register(SOURCE, {_TARGET: "CbmFactorizedTopK"})


def _xla(q, ut, *, k, clip, mode):
    return top_k_capped(q @ ut, k, clip, mode, kernel="xla")


def _batch(args, dims, **params):
    (q, ut), (dq, dut) = args, dims
    if dut is not None:   # a batched table: XLA's form, vmapped
        return jax.vmap(lambda a, b: _xla(a, b, **params), in_axes=dims)(q, ut), (0, 0)
    return factorized_topk_p.bind(jnp.moveaxis(q, dq, 0), ut, **params), (0, 0)


def _lowering(ctx, q, ut, *, k, clip, mode):
    return jax.ffi.ffi_lowering(_TARGET)(
        ctx, q, ut, clip=np.float32(clip), mode=np.int32(KERNEL_CAP_MODES[mode]))


factorized_topk_p = cpu_primitive(
    _TARGET,
    lambda q, ut, *, k, clip, mode: (ShapedArray(q.shape[:-1] + (k,), jnp.int32),
                                     ShapedArray(q.shape[:-1] + (k,), jnp.float32)),
    _xla, cpu_lowering=_lowering, batcher=_batch, multiple_results=True)


def factorized_top_k(q: jax.Array, ut: jax.Array, k: int, clip: float, mode: str | None,
                     kernel: str = "auto") -> tuple[jax.Array, jax.Array]:
    """(ids [...,k] int32, z[..., ids] [...,k]) for z = q ut (module docstring). No
    gradient flows: the head recomputes the winners' logits for theirs."""
    q, ut = jax.lax.stop_gradient(q), jax.lax.stop_gradient(ut)
    if ut.ndim != 2 or q.ndim < 1 or q.shape[-1] != ut.shape[0]:
        raise ValueError(f"factorized_top_k: q [..., r] and ut [r, n] do not match: "
                         f"{q.shape} and {ut.shape}")
    check_k(k, ut.shape[1], "factorized_top_k")
    if (not use_kernel(kernel, available, q, ut, what="top-k kernel")
            or mode not in KERNEL_CAP_MODES or k == 0 or q.size == 0):
        return top_k_capped(q @ ut, k, clip, mode, kernel)
    ids, vals = factorized_topk_p.bind(q, ut, k=k, clip=float(clip), mode=mode)
    return ids, vals
