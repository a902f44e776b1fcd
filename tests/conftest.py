"""Test setup: 8 simulated CPU devices, so sharded results can be compared
with single-device results (DESIGN.md section 8), and one XLA compilation
cache shared by the whole run."""

import os
import shutil
import tempfile

# LLVM -O0 for the suite's own programs: tests check values, not speed (benchmarks/ keep XLA's
# default), and at the suite's tiny shapes compiling dominates. Measured on test_objective_switches
# + test_generation (30 tests): 219 -> 131 CPU s. XLA's elemental emitters in place of its fusion
# emitters compile the tiny loss gradient in 2.2 s instead of 5.4 s (it then runs 20 vs 18 ms).
# Whole suite, with `--dist loadfile` (Makefile): 34.6 -> 25.9 CPU minutes. The flags change
# codegen, not the HLO XLA runs.
_FLAGS = {"--xla_force_host_platform_device_count": "8", "--xla_backend_optimization_level": "0",
          "--xla_cpu_use_fusion_emitters": "false"}
_have = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_have] + [f"{k}={v}" for k, v in _FLAGS.items() if k not in _have]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The suite compiles the same tiny train step, forward and sampler many times over, in both
# xdist workers and in every trainer subprocess (resume, multihost, init_from, the eval binary).
# A persistent compilation cache made here, before xdist spawns its workers, is inherited by all
# of them through the environment, so each distinct program compiles once per run. It lives and
# dies with this run (never reused across runs, so timings and results stay those of a clean run).
_OWNS_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ
if _OWNS_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="cbm_lm_test_xla_cache_")
    # Every program, however quick to compile: tests rebuild the same small jitted functions
    # (fresh closures miss jit's in-memory cache, the HLO hits this one). Measured on
    # test_input_attribution + test_objective_switches + test_generation: 166 -> 147 s at 0
    # against the 0.5 s threshold.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_unconfigure(config):
    if _OWNS_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Modules holding `slow` tests run first (modules stay contiguous, order within a module
    kept), so on two xdist workers the long end-to-end tests start early and the short ones fill
    the tail, instead of one worker finishing a multi-minute test while the other idles."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow_modules)
