"""Tokens per second of the grain data pipeline next to the train steps it feeds.

    python benchmarks/data_throughput.py --data_dir runs/demo/corpus \
        --batch_size 8 --seq_len 256 --batches 200 --worker_count 0

Prints one JSON line. ``pipeline_tokens_per_sec`` counts token slots (B*T
per batch) delivered by the iterator; ``pipeline_real_tokens_per_sec`` counts
non-padding tokens. ``<model>_train_step_tokens_per_sec`` is the jitted train
step of gin_configs/<model>.py at the same batch shape, measured in the same
run (benchmarks/train_step_throughput.py), and ``pipeline_over_<model>_train_step``
says how many times faster the input pipeline is than the step it feeds
(target: >= 10).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from cbm_lm.data.pipeline import make_pipeline  # noqa: E402
from cbm_lm.default_config import load_config_file  # noqa: E402
from benchmarks.train_step_throughput import measure_train_step_tokens_per_sec  # noqa: E402


def _load_config(name: str):
    return load_config_file(pathlib.Path(__file__).resolve().parents[1] / "gin_configs" / f"{name}.py")


def measure_pipeline_tokens_per_sec(data_dir, split: str = "train", batch_size: int = 8,
                                    seq_len: int = 256, batches: int = 200, warmup: int = 10,
                                    worker_count: int = 0, max_chunk_concepts: int = 8,
                                    seed: int = 0) -> dict:
    """Drains ``batches`` batches after ``warmup``; returns throughput numbers."""
    it = make_pipeline(str(data_dir), split, batch_size, seq_len, seed=seed,
                       max_chunk_concepts=max_chunk_concepts, worker_count=worker_count)
    for _ in range(warmup):
        next(it)
    real = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        real += int((b["segment_ids"] != 0).sum())
    dt = time.perf_counter() - t0
    if hasattr(it, "close"):
        it.close()
    slots = batches * batch_size * seq_len
    return {"batches": batches, "seconds": round(dt, 3),
            "pipeline_tokens_per_sec": round(slots / dt),
            "pipeline_real_tokens_per_sec": round(real / dt),
            "packing_efficiency": round(real / slots, 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data_dir", default="runs/demo/corpus")
    ap.add_argument("--split", default="train")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--worker_count", type=int, default=0)
    ap.add_argument("--max_chunk_concepts", type=int, default=8)
    ap.add_argument("--models", default="tiny,small", help="gin_configs to time the step of")
    ap.add_argument("--train_steps", type=int, default=5)
    args = ap.parse_args(argv)
    out = measure_pipeline_tokens_per_sec(
        args.data_dir, args.split, args.batch_size, args.seq_len, args.batches,
        worker_count=args.worker_count, max_chunk_concepts=args.max_chunk_concepts)
    out.update(batch_size=args.batch_size, seq_len=args.seq_len, worker_count=args.worker_count)

    # The model side: the tiny and small configs' train steps at the same
    # batch shape, measured in this same run, so the ratios compare like with like.
    for name in args.models.split(","):
        cfg = _load_config(name)
        cfg.data.batch_size, cfg.data.seq_len = args.batch_size, args.seq_len
        step = measure_train_step_tokens_per_sec(cfg, steps=args.train_steps)
        out[f"{name}_train_step_tokens_per_sec"] = step["train_step_tokens_per_sec"]
        out[f"pipeline_over_{name}_train_step"] = round(
            out["pipeline_tokens_per_sec"] / step["train_step_tokens_per_sec"], 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
