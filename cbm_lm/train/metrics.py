"""Training metrics: metrics.jsonl, TensorBoard event files, a console line.

metrics.jsonl holds one JSON object per logged step (``step``, ``loss``, every
loss term and weight, ``tokens_per_sec``, ``mfu``, ``hfu``, concept health,
eval losses when run). Only process 0 writes. The console line shows progress
and an ETA from the recent step rate (the first line after a start or a resume:
the rate of the steps run in this process, not of the absolute step).

``tokens_per_sec`` counts real (non-padding) tokens per second, the steps'
``real_tokens`` (each step's sum over its micro-batches). ``mfu`` is model
FLOPs (3 x forward, no remat recompute counted; train/planning.py
model_train_flops_per_token) per second of every token slot, padding included,
over the devices' peak; ``hfu`` the same with hardware FLOPs (recompute
included). Both are absent on a chip with no known peak (parallel/devices.py).

Files go through etils.epath (local disk, gs://, s3://, ...). Object stores
have no append, so there each record rewrites metrics.jsonl whole (tmp +
rename); local disks append. TensorBoard's own gfile reaches URL workdirs
through fsspec, the same library epath uses for them.
"""

from __future__ import annotations

import json
import math
import time

from etils import epath
from tensorboard.summary import Writer

METRICS_FILE = "metrics.jsonl"


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    def __init__(self, workdir, total_steps: int, *, enabled: bool = True, start_step: int = 0):
        """``start_step``: the step this process starts (or resumes) from, the origin of
        the first ETA's step rate."""
        self.enabled = enabled
        self.total_steps = total_steps
        self.start_step = start_step
        self.path = epath.Path(workdir) / METRICS_FILE
        self._local = "://" not in str(self.path)
        self._tb = Writer(str(epath.Path(workdir) / "tensorboard")) if enabled else None
        self._t0 = time.time()
        self._last = None  # (time, step) of the previous console line

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "item") else v)
                       for k, v in metrics.items()})
        line = json.dumps(record, sort_keys=True) + "\n"
        if self._local:
            with self.path.open("a") as f:
                f.write(line)
        else:
            old = self.path.read_text() if self.path.exists() else ""
            tmp = self.path.parent / (self.path.name + ".tmp")
            tmp.write_text(old + line)
            tmp.replace(self.path)
        for k, v in record.items():
            if k != "step" and isinstance(v, float) and math.isfinite(v):
                self._tb.add_scalar(k, v, step=int(step))
        self._tb.flush()

    def eta_seconds(self, step: int, now: float) -> float:
        """Seconds left at ``step``: the step rate since the previous console line, or
        for the first one since this process started (``start_step``, at construction)."""
        if self._last is not None and step > self._last[1]:
            rate = (now - self._last[0]) / (step - self._last[1])
        else:
            rate = (now - self._t0) / max(step - self.start_step, 1)
        return rate * max(self.total_steps - step, 0)

    def console(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        now = time.time()
        eta = _fmt_duration(self.eta_seconds(step, now))
        self._last = (now, step)
        keys = ("loss", "lm_loss", "concept_loss", "eval_lm_loss", "tokens_per_sec", "mfu",
                "hfu")
        parts = [f"{k}={float(metrics[k]):.4g}" for k in keys if k in metrics]
        pct = 100.0 * step / max(self.total_steps, 1)
        print(f"step {step}/{self.total_steps} ({pct:.0f}%) " + " ".join(parts) + f" eta {eta}",
              flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def measured_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an n x n fp32 matmul on the default device, best of ``repeats``.

    Used as the MFU denominator where no data-sheet peak exists (CPU): the
    MFU then reads as a fraction of what this machine's matmul achieves.
    """
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best
