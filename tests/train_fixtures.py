"""A tiny corpus and trainer command line shared by the training tests."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from data_fixtures import build

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_corpus(tmp: pathlib.Path) -> pathlib.Path:
    return build(tmp, heldout_fraction=0.3)


def train_args(corpus: pathlib.Path, workdir: pathlib.Path, **overrides) -> list[str]:
    cfg = {"data.dir": str(corpus), "model.vocab_size": 512, "model.d_model": 32,
           "model.n_heads": 2, "model.n_kv_heads": 1, "model.mlp_dim": 64,
           "model.concepts.n_known": 16, "model.concepts.known_topk": 4,
           "model.concepts.n_unknown": 32, "model.concepts.unknown_rank": 4,
           "model.concepts.unknown_topk": 4, "model.concepts.block_size": 16,
           "data.seq_len": 32, "data.batch_size": 4, "train.num_steps": 8,
           "train.log_every": 1, "train.eval_every": 0, "checkpoint.every_steps": 2,
           "train.key_refit_steps": 0,   # tiny.py refits the keys after its last step
           "checkpoint.async_save": False, "mesh.data": 1,
           # The diffusion path draws the most randomness per step (masks, noise
           # levels), so it is the strictest test of determinism and resume.
           "model.objective": "diffusion", "model.attention": "block_causal",
           "model.diffusion_block_size": 8,
           # A nominal MFU denominator: without one, every launch on a CPU first times a
           # 1024^3 matmul (train/loop.py), ~0.5 s of each of the suite's ~40 launches.
           "hardware.peak_flops_per_device": 1e11}
    cfg.update(overrides)
    return ([sys.executable, str(ROOT / "launch" / "train.py"),
             "--config", str(ROOT / "gin_configs" / "tiny.py"), "--workdir", str(workdir)]
            + [f"--config.{k}={v}" for k, v in cfg.items()])


# Trainer subprocesses run a few steps of a tiny model, so XLA's compile dominates their
# cost; LLVM's -O0 halves it (tiny train step: 25 -> 14 CPU s cold), and XLA's older
# elemental emitters in place of the fusion emitters halve it again (a tiny loss gradient:
# 5.4 -> 2.2 s). Neither changes semantics (losses agree to float rounding, ~1e-7; runs
# compared bitwise share the flags). conftest.py sets the same flags for the suite itself.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def env(devices: int = 1) -> dict:
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
    e["JAX_PLATFORMS"] = "cpu"
    e["PYTHONUNBUFFERED"] = "1"
    return e


def run(args, devices: int = 1, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=env(devices), capture_output=True, text=True, timeout=300, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def losses(workdir: pathlib.Path) -> dict[int, float]:
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out
