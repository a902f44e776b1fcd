"""The compiled CPU kernels (cbm_lm/model/cpu_kernels.py) against XLA:CPU's own ops.

Side by side in one run, interleaved round by round, each timing the least-disturbed
(minimum) of its rounds, at the benchmark shape (benchmarks/configs.py: 2048 tokens):

  top-k:  ids of x [2048, n] f32 at the two selections: known n 2785, k 32; unknown
          n 8192, k 128 (model/topk_cpu.py against lax.top_k)
  rows:   the known head's feature mix sum_s w[n,s] E[ids[n,s]] and selected-logit
          recompute q[n] . K[ids[n,s]] (32 of 2785 rows of 512 per token), forward and
          forward + backward (model/sparse_rows_cpu.py against jnp.take + einsum)
          op_speedup = XLA time / kernel time
  select: a head's whole selection, scores to (ids, picked logits), straight-through cap
          at 15: "xla" (matmul, cap, lax.top_k, gather), "separate" (matmul, cap, the
          top-k kernel, gather: the path before the fused kernels) and "fused"
          (matmul, then model/topk_cpu.top_k_capped for the known head;
          model/factorized_topk_cpu.factorized_top_k, no [2048, 8192] z, for the unknown)
  step:   the concept train step with model.concepts.kernels "xla" and "auto"
          step_speedup = step time (xla) / step time (auto)

Usage: python -m benchmarks.cpu_kernels [--rounds 5] [--skip_step] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

OP_SHAPES = {"known": (2048, 2785, 32), "unknown": (2048, 8192, 128)}


def _best(f, *args, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def _race(fns: dict, args, rounds: int) -> dict:
    """{name: best seconds}, the candidates interleaved round by round."""
    t = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            t[name] = min(t[name], _best(f, *args))
    return t


def measure_rows(rounds: int = 5, n: int = 2048, s: int = 32, c: int = 2785, v: int = 512) -> dict:
    from cbm_lm.model.sparse_rows_cpu import gather_mix, gather_pick
    rng = np.random.default_rng(0)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape).astype(np.float32))  # noqa: E731
    w, table, q, g, gs = f(n, s), f(c, v), f(n, v), f(n, v), f(n, s)
    ids = jnp.asarray(rng.integers(0, c, (n, s)), jnp.int32)
    ops = {"mix": (lambda k: lambda w_, t_: gather_mix(w_, ids, t_, k), (w, table), g),
           "pick": (lambda k: lambda q_, t_: gather_pick(q_, t_, ids, k), (q, table), gs)}
    out = {}
    for name, (make, args, cot) in ops.items():
        fwd = {k: jax.jit(make(k)) for k in ("xla", "auto")}
        both = {k: jax.jit(lambda *a, k=k: jax.vjp(make(k), *a)[1](cot)) for k in ("xla", "auto")}
        np.testing.assert_allclose(fwd["xla"](*args), fwd["auto"](*args), rtol=1e-4, atol=1e-3)
        tf, tb = _race(fwd, args, rounds), _race(both, args, rounds)
        out[name] = {"xla_fwd_ms": 1e3 * tf["xla"], "kernel_fwd_ms": 1e3 * tf["auto"],
                     "xla_fwd_bwd_ms": 1e3 * tb["xla"], "kernel_fwd_bwd_ms": 1e3 * tb["auto"],
                     "op_speedup": tb["xla"] / tb["auto"]}
    return out


def measure_topk(rounds: int = 5) -> dict:
    from cbm_lm.model.topk_cpu import top_k_ids
    out = {}
    rng = np.random.default_rng(0)
    for name, (rows, n, k) in OP_SHAPES.items():
        x = jnp.asarray(rng.standard_normal((rows, n)).astype(np.float32))
        fns = {kern: jax.jit(lambda v, kern=kern: top_k_ids(v, k, kern)) for kern in ("xla", "auto")}
        np.testing.assert_array_equal(np.asarray(fns["xla"](x)), np.asarray(fns["auto"](x)))
        t = _race(fns, (x,), rounds)
        out[name] = {"rows": rows, "n": n, "k": k, "xla_ms": 1e3 * t["xla"],
                     "kernel_ms": 1e3 * t["auto"], "op_speedup": t["xla"] / t["auto"]}
    return out


def measure_selection(rounds: int = 5, rank: int = 32, d: int = 512) -> dict:
    from cbm_lm.model.concept_topk import cap_logits
    from cbm_lm.model.factorized_topk_cpu import factorized_top_k
    from cbm_lm.model.topk_cpu import top_k_capped, top_k_ids
    rng = np.random.default_rng(0)
    out = {}
    for name, (rows, n, k) in OP_SHAPES.items():
        width = d if name == "known" else rank
        q = jnp.asarray(rng.standard_normal((rows, width)).astype(np.float32))
        keys = jnp.asarray((rng.standard_normal((n, width)) / np.sqrt(width)).astype(np.float32))

        def unfused(kern):
            def f(q_, keys_):
                z = q_ @ keys_.T
                ids = top_k_ids(cap_logits(z, 15.0, "straight_through"), k, kern)
                return ids, jnp.take_along_axis(z, ids, axis=-1)
            return f

        if name == "known":
            fused = lambda q_, keys_: top_k_capped(q_ @ keys_.T, k, 15.0, "straight_through")  # noqa: E731
        else:
            fused = lambda q_, keys_: factorized_top_k(q_, keys_.T, k, 15.0, "straight_through")  # noqa: E731
        fns = {"xla": jax.jit(unfused("xla")), "separate": jax.jit(unfused("auto")),
               "fused": jax.jit(fused)}
        ids_x, _ = fns["xla"](q, keys)
        ids_f = fns["fused"](q, keys)[0]
        t = _race(fns, (q, keys), rounds)
        out[name] = {"rows": rows, "n": n, "k": k, **{f"{m}_ms": 1e3 * v for m, v in t.items()},
                     "fused_over_separate": t["separate"] / t["fused"],
                     # the fused unknown head sums its rank-32 products in its own order
                     "ids_equal_fraction": float(np.mean(np.asarray(ids_x) == np.asarray(ids_f)))}
    return out


def measure_step(rounds: int = 5, steps: int = 3) -> dict:
    from jax.sharding import NamedSharding, PartitionSpec as P

    from benchmarks.configs import steerling_proportions_config
    from cbm_lm.config import MeshConfig, ModelConfig, logical_rules_from_config
    from cbm_lm.data.synthetic import synthetic_batch
    from cbm_lm.parallel.mesh import make_mesh
    from cbm_lm.train.optimizer import make_optimizer
    from cbm_lm.train.state import init_train_state
    from cbm_lm.train.step import make_train_step

    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    runs = {}
    for kern in ("xla", "auto"):
        cfg = steerling_proportions_config()
        cfg.model.concepts.kernels = kern
        model_cfg = ModelConfig.from_config(cfg.model)
        rules = logical_rules_from_config(cfg.rules)
        tx, schedule = make_optimizer(cfg.optimizer, (rounds + 1) * steps)
        graphdef, state, shardings = init_train_state(model_cfg, tx, 0, mesh, rules)
        batch = synthetic_batch(model_cfg, cfg.data.batch_size, cfg.data.seq_len,
                                cfg.data.max_chunk_concepts)
        step = make_train_step(graphdef, tx, schedule, cfg, model_cfg, shardings,
                               NamedSharding(mesh, P()))
        runs[kern] = {"step": step, "state": state, "batch": batch, "times": [], "loss": []}

    def run(r, record):
        for _ in range(steps):
            t0 = time.perf_counter()
            r["state"], m = r["step"](r["state"], r["batch"])
            loss = float(jax.block_until_ready(m["loss"]))
            if record:
                r["times"].append(time.perf_counter() - t0)
                r["loss"].append(loss)

    with jax.set_mesh(mesh):
        for r in runs.values():
            run(r, False)                                   # compile + warm up
        for _ in range(rounds):
            for r in runs.values():
                run(r, True)
    xla, auto = min(runs["xla"]["times"]), min(runs["auto"]["times"])
    return {"xla_step_seconds": xla, "kernel_step_seconds": auto, "step_speedup": xla / auto,
            # same init, same batch, same selection: the two trajectories must agree
            "max_loss_difference": float(np.max(np.abs(np.subtract(runs["xla"]["loss"],
                                                                   runs["auto"]["loss"]))))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--skip_step", action="store_true", help="the op only (seconds, not minutes)")
    args = ap.parse_args(argv)
    res = {"topk": measure_topk(args.rounds), "rows": measure_rows(args.rounds),
           "select": measure_selection(args.rounds)}
    for name, r in res["topk"].items():
        print(f"top-k {name:<8} top-{r['k']} of {r['n']} x {r['rows']} rows: lax.top_k "
              f"{r['xla_ms']:.1f} ms, kernel {r['kernel_ms']:.1f} ms, speedup {r['op_speedup']:.2f}")
    for name, r in res["rows"].items():
        print(f"rows  {name:<8} forward: XLA {r['xla_fwd_ms']:.1f} ms, kernel {r['kernel_fwd_ms']:.1f} ms;"
              f" forward + backward: XLA {r['xla_fwd_bwd_ms']:.1f} ms, kernel "
              f"{r['kernel_fwd_bwd_ms']:.1f} ms, speedup {r['op_speedup']:.2f}")
    for name, r in res["select"].items():
        print(f"select {name:<7} top-{r['k']} of {r['n']} x {r['rows']} rows: XLA {r['xla_ms']:.1f}"
              f" ms, separate kernels {r['separate_ms']:.1f} ms, fused {r['fused_ms']:.1f} ms, "
              f"speedup {r['fused_over_separate']:.2f} (ids equal {r['ids_equal_fraction']:.4f})")
    if not args.skip_step:
        res["step"] = s = measure_step(args.rounds)
        print(f"concept train step: xla {s['xla_step_seconds']:.3f} s, kernel "
              f"{s['kernel_step_seconds']:.3f} s, speedup {s['step_speedup']:.3f} "
              f"(max loss difference {s['max_loss_difference']:.2e})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
