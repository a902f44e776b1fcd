"""Build and register the project's XLA:CPU FFI kernels (``model/*_cpu.cc``).

Each kernel source is compiled on first use with the system C++ compiler
(``$CXX``, else g++ / c++) against the XLA FFI headers that ship with jaxlib, into a
per-machine cache (``$CBM_LM_KERNEL_CACHE``, else ``~/.cache/cbm_lm/kernels``) keyed by
the source and the headers beside it, jaxlib's version, the flags and the CPU's feature
flags (``-march=native``).
The write is atomic, so concurrent processes never load a half-written library. Where
no compiler is found or the build fails, ``register`` logs a warning once and returns
False, and callers keep their XLA path: a kernel is an optimization, never a dependency.

``cpu_primitive`` wraps a kernel as a primitive lowered per platform and ``use_kernel``
decides, per call, between it and the caller's XLA form (model/topk_cpu.py,
model/sparse_rows_cpu.py).

Why our own kernels at all: some ops XLA:CPU runs poorly at the concept heads' shapes
(its TopK is a single-threaded partial_sort per row; row gathers materialize [N,S,V]);
the model lowers to them only where XLA lowers for CPU (``platform="cpu"`` lowerings).
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
from jax.interpreters import batching, mlir

KERNELS = ("auto", "xla")   # auto: the compiled kernels where XLA lowers for CPU; xla: never
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_lock = threading.Lock()
_registered: dict[str, bool] = {}     # source name -> registered
errors: dict[str, str] = {}           # source name -> why it is unavailable


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


def library_path(source: Path) -> Path:
    """Where the library built from ``source`` for this jaxlib, flag set and CPU is cached."""
    import jaxlib
    digest = hashlib.sha256()
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]   # the sources include
    for part in (source.read_bytes(), *headers, jaxlib.__version__.encode(),
                 " ".join(FLAGS).encode(), platform.machine().encode(),
                 _cpu_fingerprint().encode()):
        digest.update(part)
        digest.update(b"\0")
    return _cache_dir() / f"{source.stem}-{digest.hexdigest()[:16]}.so"


def build(source: Path) -> Path:
    """Compiles ``source`` (if not cached) and returns the shared library's path.

    Raises RuntimeError naming the compiler command and its output when the build fails."""
    path = library_path(source)
    if path.exists():
        return path
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=path.parent)
    os.close(fd)
    cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(source), "-o", tmp]
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
    logging.info("compiled %s in %.1f s: %s", source.name, time.perf_counter() - start, path)
    return path


def register(source: Path, targets: dict[str, str], batch_partitionable=()) -> bool:
    """Builds ``source`` and registers each FFI target {name: exported symbol} for CPU,
    once per process. False (and a warning, once) where it cannot be built or loaded."""
    with _lock:
        key = source.name
        if key not in _registered:
            try:
                lib = ctypes.cdll.LoadLibrary(str(build(source)))
                for name, symbol in targets.items():
                    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                                platform="cpu")
                for name in batch_partitionable:
                    jax.ffi.register_ffi_target_as_batch_partitionable(name)
                _registered[key] = True
            except Exception as e:   # noqa: BLE001 - any build/load failure means: fall back
                _registered[key], errors[key] = False, str(e)
                logging.warning("CPU kernel %s unavailable, keeping XLA's ops: %s", key, e)
        return _registered[key]


def use_kernel(kernel: str, registered, *arrays, what: str = "kernel") -> bool:
    """Whether to call a compiled kernel: ``kernel`` is "auto", every array is fp32 and
    ``registered()`` (the module's build-and-register) succeeds. Other names are refused."""
    if kernel not in KERNELS:
        raise ValueError(f"{what} must be one of {KERNELS}, got {kernel!r}")
    return kernel == "auto" and all(a.dtype == jnp.float32 for a in arrays) and registered()


def cpu_primitive(name: str, abstract_eval, xla_fn, cpu_lowering=None, batcher=None,
                  multiple_results: bool = False):
    """A primitive lowered per platform, so the choice follows the platform XLA compiles
    for (an AOT compile for TPU on this CPU included), not the host:

      CPU:       ``cpu_lowering``, by default the FFI target ``name`` on the operands
                 (params only shape the result; the kernel reads sizes from its buffers)
      elsewhere: ``xla_fn(*operands, **params)``, XLA's own ops
      vmap:      ``batcher``, by default ``xla_fn`` vmapped

    ``multiple_results``: abstract_eval and xla_fn return a tuple of arrays.
    """
    p = jax.extend.core.Primitive(name)
    p.multiple_results = multiple_results
    p.def_impl(partial(dispatch.apply_primitive, p))
    p.def_abstract_eval(abstract_eval)
    mlir.register_lowering(p, mlir.lower_fun(xla_fn, multiple_results=multiple_results))
    if cpu_lowering is None:
        ffi_rule = jax.ffi.ffi_lowering(name)
        cpu_lowering = lambda ctx, *args, **_: ffi_rule(ctx, *args)   # noqa: E731
    mlir.register_lowering(p, cpu_lowering, platform="cpu")
    out_axes = (lambda out: (out, tuple(0 for _ in out))) if multiple_results else (
        lambda out: (out, 0))
    batching.primitive_batchers[p] = batcher or (lambda args, dims, **params: out_axes(
        jax.vmap(partial(xla_fn, **params), in_axes=dims)(*args)))
    return p
