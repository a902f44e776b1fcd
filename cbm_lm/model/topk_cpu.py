"""Row-wise top-k indices: a compiled XLA:CPU kernel where it helps, ``lax.top_k`` elsewhere.

  top_k_ids(x [...,n] f32, k) -> ids [...,k] int32,   x[..., ids] descending

The same ids as ``jax.lax.top_k(x, k)[1]``, ties and NaN included (descending IEEE total
order, lower index first on ties; tests/test_topk_cpu.py holds the two equal). Why our
own: XLA:CPU runs TopK as a single-threaded ``std::partial_sort`` per row, about 100 ms of
the concept step at Steerling's proportions (2048 rows x 8192 concepts, k 128); the
kernel in ``topk_cpu.cc`` is O(n + k log k) per row and uses XLA's intra-op thread pool
(measured side by side in benchmarks/topk.py).

The choice is made when the computation is lowered (one primitive, a lowering per
platform): CPU lowerings call the kernel, TPU/GPU lowerings (an AOT compile for a TPU
topology included) keep ``lax.top_k``. The CPU lowering is annotated batch-partitionable,
so sharded leading dims stay sharded; the ranked axis is gathered whole. It is compiled on first
use with the system C++ compiler into a per-machine cache; where no compiler is found or
the build fails, a warning is logged once and ``lax.top_k`` is used.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp
from absl import logging
from jax._src import dispatch
from jax._src.core import ShapedArray
from jax._src.custom_partitioning_sharding_rule import (sdy_sharding_rule_to_mlir,
                                                        str_to_sdy_sharding_rule)
from jax.interpreters import batching, mlir

KERNELS = ("auto", "xla")     # auto: the compiled kernel on CPU; xla: lax.top_k everywhere
_TARGET = "cbm_lm_topk_indices"
_SOURCE = Path(__file__).with_name("topk_cpu.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_lock = threading.Lock()
_state: dict[str, object] = {}     # "registered": bool, "error": str


def _cpu_fingerprint() -> str:
    """-march=native code runs only on CPUs with these features: part of the cache key."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("CBM_LM_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cbm_lm", "kernels")
    return Path(root)


def library_path() -> Path:
    """Where the kernel for this source, jaxlib, compiler flags and CPU is cached."""
    import jaxlib
    digest = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), jaxlib.__version__.encode(), " ".join(_FLAGS).encode(),
                 platform.machine().encode(), _cpu_fingerprint().encode()):
        digest.update(part)
        digest.update(b"\0")
    return _cache_dir() / f"topk_cpu-{digest.hexdigest()[:16]}.so"


def build() -> Path:
    """Compiles topk_cpu.cc (if not cached) and returns the shared library's path.

    Raises RuntimeError naming the compiler and its output when the build fails."""
    path = library_path()
    if path.exists():
        return path
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=path.parent)
    os.close(fd)
    cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                               f"{done.stderr[-2000:]}")
        os.replace(tmp, path)     # atomic: a concurrent build never sees a half-written .so
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logging.info("compiled the CPU top-k kernel in %.1f s: %s", time.perf_counter() - start, path)
    return path


def available() -> bool:
    """Builds and registers the kernel once per process; False (warned once) if it cannot."""
    with _lock:
        if "registered" not in _state:
            try:
                lib = ctypes.cdll.LoadLibrary(str(build()))
                jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.CbmTopKIndices),
                                            platform="cpu")
                jax.ffi.register_ffi_target_as_batch_partitionable(_TARGET)
                _state["registered"] = True
            except Exception as e:   # noqa: BLE001 - any build/load failure means: fall back
                _state["registered"], _state["error"] = False, str(e)
                logging.warning("CPU top-k kernel unavailable, using lax.top_k: %s", e)
        return bool(_state["registered"])


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
