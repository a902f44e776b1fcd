"""Build and register the project's XLA:CPU FFI kernels (``model/*_cpu.cc``).

Each kernel source is compiled on first use with the system C++ compiler
(``$CXX``, else g++ / c++) against the XLA FFI headers that ship with jaxlib, into a
per-machine cache (``$CBM_LM_KERNEL_CACHE``, else ``~/.cache/cbm_lm/kernels``) keyed by
the source and the headers beside it, jaxlib's version, the flags and the CPU's feature
flags (``-march=native``).
The write is atomic, so concurrent processes never load a half-written library. Where
no compiler is found or the build fails, ``register`` logs a warning once and returns
False, and callers keep their XLA path: a kernel is an optimization, never a dependency.

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
from pathlib import Path

import jax
from absl import logging

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
