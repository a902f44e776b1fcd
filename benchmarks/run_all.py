"""Runs every benchmark and writes one JSON object; prints a table.

    python benchmarks/run_all.py --out b.json [--data_dir runs/demo/corpus] [--skip_aot]

Keys (ratios are measured side by side in one run: this machine is shared,
absolute times are noisy):
  concept_overhead_ratio      train step, concept-bottleneck / plain backbone (target <= 1.05)
  concept_flops_overhead_8b   XLA FLOPs at 8B, with / without the rewrite layer, minus 1 (<= 0.05)
  steerling_forward_speedup   cbm_lm jitted forward / Steerling PyTorch forward, tokens/s (>= 3)
  cpu_mfu                     model FLOPs / step time / peak fp32 matmul FLOP/s (>= 0.60)
  ceilings                    what each CPU ratio could reach on this machine, same run:
                              concept_flops_ratio (overhead at equal efficiency), plain_mfu
                              (the backbone's own MFU), speedup_ceiling (every forward
                              matmul at the peak); see concept_overhead.py, steerling_forward.py
  data_pipeline_ratio         grain pipeline tokens/s / concept-bottleneck train step tokens/s
  aot_8b                      per TPU topology: XLA per-device bytes, fit, compile s, MFU bound
  scan_depth                  train-step HLO size and compile s at 2 vs 8 layers, scanned / unrolled
  provenance_query_p50_ms     one query at 1M synthetic keys, tiny.py's index kind (IVF-PQ)
  provenance_logging_overhead tiny.py's train step with key logging / with the mass only, - 1
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# TPU topology -> the 8B config that targets it (README "Performance").
AOT_TARGETS = {"v5p:4x4x4": "gin_configs/steerling_8b.py",
               "v5e:16x16": "gin_configs/steerling_8b_v5e.py"}


def _aot(topology: str, config: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "aot.json")
        cmd = [sys.executable, str(ROOT / "tools" / "aot_compile.py"), "--config",
               str(ROOT / config), "--topology", topology, "--json", out]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"config": config, "error": f"compile did not finish in {timeout:.0f} s"}
        if proc.returncode:
            return {"config": config, "error": proc.stderr.strip().splitlines()[-1:]}
        with open(out) as f:
            return dict(json.load(f), config=config)


def _provenance() -> dict:
    from benchmarks import provenance
    try:
        return provenance.measure()
    except Exception as e:   # noqa: BLE001 -- every number measured before it is kept
        return {"provenance_query_p50_ms": None, "provenance_logging_overhead": None,
                "provenance_error": f"{type(e).__name__}: {e}"}


def _fmt(v) -> str:
    if v is None:
        return "null"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--data_dir", default="runs/demo/corpus")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip_aot", action="store_true", help="leave aot_8b out (no libtpu)")
    ap.add_argument("--budget_s", type=float, default=14 * 60,
                    help="wall-clock budget; the AOT compiles get what is left")
    args = ap.parse_args(argv)
    t_start = time.time()

    from benchmarks.concept_flops import measure_concept_flops
    from benchmarks.concept_overhead import measure_concept_overhead
    from benchmarks.configs import steerling_proportions_config
    from benchmarks.steerling_forward import measure_steerling_forward
    from cbm_lm.default_config import load_config_file

    cfg = steerling_proportions_config()
    res: dict = {"machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
                 "shape": "d 512, 4 layers, vocab 8192, B 8 x T 256, known 2785 (top-32), "
                          "unknown 8192 rank 32 (top-128)"}
    step = measure_concept_overhead(cfg, rounds=args.rounds)
    res.update(concept_overhead_ratio=step["concept_overhead_ratio"], cpu_mfu=step["cpu_mfu"],
               concept_overhead_detail=step)
    fwd = measure_steerling_forward(rounds=args.rounds)
    res.update(steerling_forward_speedup=fwd["steerling_forward_speedup"], steerling_forward=fwd)
    res["ceilings"] = {"concept_flops_ratio": step["concept_flops_ratio"],
                       "plain_mfu": step["plain_mfu"],
                       "steerling_forward_speedup_ceiling": fwd["speedup_ceiling"],
                       "cbm_forward_mfu": fwd["cbm_forward_mfu"],
                       "steerling_forward_mfu": fwd["steerling_forward_mfu"]}
    flops = measure_concept_flops(load_config_file(ROOT / "gin_configs" / "steerling_8b.py"))
    res.update(concept_flops_overhead_8b=flops["concept_flops_overhead_8b"], concept_flops_8b=flops)
    from benchmarks.scan_depth import measure_scan_depth
    # gin_configs/tiny.py: at the benchmark shape each compile takes minutes here
    res["scan_depth"] = measure_scan_depth(load_config_file(ROOT / "gin_configs" / "tiny.py"))

    res["data_pipeline_ratio"] = None
    if pathlib.Path(args.data_dir).is_dir():
        from benchmarks.data_throughput import measure_pipeline_tokens_per_sec
        pipe = measure_pipeline_tokens_per_sec(args.data_dir, batch_size=cfg.data.batch_size,
                                               seq_len=cfg.data.seq_len, batches=100)
        res["data_pipeline_ratio"] = (pipe["pipeline_tokens_per_sec"]
                                      / step["cbm_train_tokens_per_sec"])
        res["data_pipeline"] = pipe
    res.update(_provenance())

    res["aot_8b"] = None
    if not args.skip_aot:
        res["aot_8b"] = {}
        for topology, config in AOT_TARGETS.items():
            left = args.budget_s - (time.time() - t_start)
            res["aot_8b"][topology] = (_aot(topology, config, left) if left > 60 else
                                       {"config": config, "error": "no time left in --budget_s"})
    res["seconds"] = time.time() - t_start
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)

    print(f"{'benchmark':<32} {'value':>10}  target")
    for key, target in (("concept_overhead_ratio", "<= 1.05"), ("concept_flops_overhead_8b", "<= 0.05"),
                        ("steerling_forward_speedup", ">= 3"), ("cpu_mfu", ">= 0.60"),
                        ("data_pipeline_ratio", ">= 10"), ("provenance_query_p50_ms", "<= 50"),
                        ("provenance_logging_overhead", "<= 0.05")):
        print(f"{key:<32} {_fmt(res.get(key)):>10}  {target}")
    lo = (res.get("provenance") or {}).get("logging")
    if lo:
        print(f"provenance logging overhead, split: the keys' compute in the step "
              f"{lo['key_compute_overhead']:+.3f}, their writing on the host "
              f"{lo['key_writing_overhead']:+.3f}")
    c = res["ceilings"]
    print(f"ceilings: concept overhead >= {c['concept_flops_ratio']:.3f} at equal efficiency; "
          f"plain backbone MFU {c['plain_mfu']:.3f}; forward speedup <= "
          f"{c['steerling_forward_speedup_ceiling']:.2f} with every matmul at the peak "
          f"(forward MFU: cbm_lm {c['cbm_forward_mfu']:.3f}, Steerling "
          f"{c['steerling_forward_mfu']:.3f})")
    for form, d in res["scan_depth"].items():
        print(f"layers 2 -> 8, {form:<9} HLO x{d['hlo_growth']:.2f}  compile x{d['compile_growth']:.2f}")
    for topology, r in (res["aot_8b"] or {}).items():
        if "error" in r:
            print(f"aot_8b {topology:<25} error: {r['error']}")
            continue
        gib = r["bytes_per_device"]["total"] / 2 ** 30
        print(f"aot_8b {topology:<25} {gib:7.1f} GiB/chip of {r['hbm_bytes'] / 2 ** 30:.0f}  "
              f"{'fits' if r['fits'] else 'over HBM'}  compile {r['compile_seconds']:.0f} s  "
              f"MFU bound {_fmt(r['mfu_at_peak'])}")
    print(f"(load average at start {res['machine']['load_avg_1m']:.1f} on {os.cpu_count()} CPUs; "
          f"{res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
