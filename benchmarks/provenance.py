"""Chunk provenance measured against planted facts, BM25, and at 1M keys.

  python benchmarks/provenance.py --workdir runs/demo/train [--out provenance.json]
      [--methods provenance,bm25,gradient] [--scale_keys 1000000] [--overhead_steps 20]

1. Recall@1 / Recall@10 / MRR of the one training chunk stating each planted
   fact, for verbatim (the statement) and paraphrased (held-out) queries, per
   method: the provenance index (each built index: logged and/or re-keyed),
   BM25, and the projected-gradient reference when built (cbm_lm/provenance/evaluate.py).
2. Source accuracy: argmax of the source distribution on held-out chunks, with
   each concept x source mass the build kept (the train step's, the re-keying pass's).
3. Scale: query latency p50/p95 (one query, k=10) and index bytes per chunk
   for an index of ``--scale_keys`` synthetic unit keys built with the run's
   provenance config (IVF-PQ above provenance.exact_max_keys).
4. Logging overhead: the run's train step without and with training-time key
   logging, timed side by side (``logging_overhead``; target <= 5%).
Needs tools/build_provenance_index.py --workdir DIR first. Prints a table and
writes JSON.
"""

import json
import time

import numpy as np
from absl import app, flags, logging

from cbm_lm.provenance.build import provenance_config, root
from cbm_lm.provenance.evaluate import evaluate_methods
from cbm_lm.provenance.index import KeyIndex
from cbm_lm.train.checkpoint import load_model

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir with a provenance index.",
                               required=True)
_OUT = flags.DEFINE_string("out", None, "JSON output (default WORKDIR/provenance/benchmark.json).")
_METHODS = flags.DEFINE_list("methods", ["provenance", "bm25", "gradient"],
                             "Methods to compare (gradient: when its index is built).")
_SCALE = flags.DEFINE_integer("scale_keys", 1_000_000, "Synthetic keys for the latency part "
                              "(0 skips it).")
_SOURCE_CHUNKS = flags.DEFINE_integer("source_chunks", 1000, "Held-out chunks for source accuracy.")
_QUERIES = flags.DEFINE_integer("latency_queries", 200, "Queries timed at scale.")
_OVERHEAD = flags.DEFINE_integer("overhead_steps", 20, "Train steps per timed block for the "
                                 "logging overhead (0 skips it).")
_ROUNDS = flags.DEFINE_integer("overhead_rounds", 3, "Interleaved timed rounds (medians).")
_COMPARE = flags.DEFINE_list("compare", [], "Also time logging with each of these provenance "
                             "overrides, side by side (e.g. hashed_vectors=gaussian,"
                             "max_chunks_per_row=64).")


def scale_benchmark(prov, n: int, n_queries: int) -> dict:
    """Latency and bytes of the index kind the config picks for ``n`` random unit keys.

    Built in slices (train on a sample, then add 100k keys at a time), so memory
    stays at the index's own size, not n x d_p floats.
    """
    import dataclasses

    rng = np.random.default_rng(0)

    def keys(m):
        x = rng.standard_normal((m, prov.d_p), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    nlist = prov.ivf_nlist or int(np.sqrt(n))
    t0 = time.time()
    if n <= prov.exact_max_keys:
        idx = KeyIndex.build(np.arange(n, dtype=np.int64), keys(n), prov, center=False)
    else:   # the same IVF-PQ that KeyIndex.build makes for n keys, trained on its sample size
        sample = keys(min(n, 64 * nlist))
        idx = KeyIndex.build(np.arange(len(sample), dtype=np.int64), sample,
                             dataclasses.replace(prov, exact_max_keys=0, ivf_nlist=nlist),
                             center=False)
        for s in range(len(sample), n, 100_000):
            idx.index.add(keys(min(100_000, n - s)))
        idx.ids = np.arange(n, dtype=np.int64)
    build_s = time.time() - t0
    queries = keys(n_queries)
    times = []
    for q in queries:
        t = time.perf_counter()
        idx.search(q[None], 10)
        times.append(time.perf_counter() - t)
    return {"keys": n, "kind": idx.meta["kind"], "build_seconds": build_s,
            "query_p50_ms": 1e3 * float(np.percentile(times, 50)),
            "query_p95_ms": 1e3 * float(np.percentile(times, 95)),
            "index_bytes_per_chunk": idx.nbytes() / n}


def _override(prov, spec: str) -> tuple[str, object]:
    """"field=value" -> (field, value typed like provenance.field); unknown fields refused."""
    field, sep, value = spec.partition("=")
    if not sep or field not in prov:
        raise ValueError(f"--compare {spec!r}: expected provenance_field=value, one of "
                         f"{sorted(prov.keys())}")
    kind = type(prov[field])
    return field, (value.lower() in ("1", "true") if kind is bool else kind(value))


def logging_overhead(config, steps: int, rounds: int = 3, compare=()) -> dict:
    """Train-step time of the run's config without and with provenance, side by side.

    Jitted steps on one device and one synthetic batch of the data contract
    (with source and 64-bit chunk ids): ``base`` (no source ids: no mass), ``mass``
    (the concept x source mass only, what every run pays), ``keys`` (mass + the chunk
    keys computed in the step and dropped: ``key_compute_overhead``), ``logged`` (mass +
    chunk keys + the host writer appending them to a key store in a temporary
    directory, as the loop does; ``key_writing_overhead`` is logged over keys), and
    ``logged[<field>=<value>]`` for each of ``compare`` (the same with that provenance
    override; ``logging_overhead[...]`` is it over mass). Each round times
    ``steps`` steps of each, in turn (each round starting one variant later), blocking
    once per block as the loop does between log steps; medians over rounds.
    """
    import tempfile

    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from cbm_lm.config import MeshConfig, ModelConfig
    from cbm_lm.data.synthetic import synthetic_batch
    from cbm_lm.default_config import DEFAULT_RULES
    from cbm_lm.parallel.mesh import make_mesh
    from cbm_lm.train.chunk_keys import ChunkKeyLogger, split_ids
    from cbm_lm.train.optimizer import make_optimizer
    from cbm_lm.train.state import init_train_state
    from cbm_lm.train.step import make_train_step

    model_cfg = ModelConfig.from_config(config.model)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    rules = DEFAULT_RULES      # one device: the rules only name axes (config.json's do not parse)
    b, t = config.data.batch_size, config.data.seq_len
    batch = dict(synthetic_batch(model_cfg, b, t, config.data.max_chunk_concepts))
    rng = np.random.default_rng(0)
    sources = np.repeat(rng.integers(0, 4, (b, 1)), t, 1).astype(np.int32)
    ids = (np.int64(3) << 40) + np.arange(b * t, dtype=np.int64).reshape(b, t) // 32
    with_ids = dict(batch, source_ids=sources, **split_ids(ids))
    kind = config.provenance.get("hashed_vectors", "signs")
    # name: (keys computed in the step, keys written on the host, batch, provenance overrides)
    variants = {"base": (False, False, batch, {}), "mass": (False, False, with_ids, {}),
                "keys": (True, False, with_ids, {}), "logged": (True, True, with_ids, {})}
    variants.update({f"logged[{spec}]": (True, True, with_ids,
                                         dict([_override(config.provenance, spec)]))
                     for spec in compare})
    tmp = tempfile.TemporaryDirectory()
    runs = {}
    for i, (name, (log, write, data, overrides)) in enumerate(variants.items()):
        cfg = config.copy_and_resolve_references()
        cfg.provenance.log_keys = log
        cfg.provenance.update(overrides)
        tx, schedule = make_optimizer(cfg.optimizer, 10**6)
        graphdef, state, sh = init_train_state(model_cfg, tx, 0, mesh, rules,
                                               cfg.provenance.max_sources)
        step = make_train_step(graphdef, tx, schedule, cfg, model_cfg, sh,
                               NamedSharding(mesh, P()))
        logger = ChunkKeyLogger(f"{tmp.name}/{i}", log=lambda m: None) if write else None
        runs[name] = [step, state, data, logger, [], []]
    with jax.set_mesh(mesh):
        names = list(runs)
        for k in range(rounds + 1):            # the first round compiles and warms up
            # each round starts one variant later, so no variant always follows the same one
            for name in names[k % len(names):] + names[:k % len(names)]:
                r = runs[name]
                step, state, data, logger, times, cpu = r
                t0, c0 = time.perf_counter(), time.process_time()
                for i in range(steps):
                    out = step(state, data)
                    state = out[0]
                    if logger is not None:
                        logger.record(i + 1, out[2])
                if logger is not None:
                    logger.flush()
                jax.block_until_ready(state.params)
                times.append((time.perf_counter() - t0) / steps)
                cpu.append((time.process_time() - c0) / steps)
                r[1] = state
    tmp.cleanup()
    ms = {name: 1e3 * float(np.median(r[4][1:])) for name, r in runs.items()}
    # CPU seconds of this process (all its threads) per step: on a shared machine other
    # processes stretch the wall time of whichever block they overlap, much less its CPU time.
    cpu_ms = {name: 1e3 * float(np.median(r[5][1:])) for name, r in runs.items()}
    compared = {f"logging_overhead[{spec}]": ms[f"logged[{spec}]"] / ms["mass"] - 1
                for spec in compare}
    round_ms = {name: [round(1e3 * x, 2) for x in r[4][1:]] for name, r in runs.items()}
    return {**compared, "step_ms": ms, "step_cpu_ms": cpu_ms, "round_ms": round_ms,
            "steps_per_block": steps,
            "rounds": rounds, "hashed_vectors": kind,
            "mass_overhead": ms["mass"] / ms["base"] - 1,
            "logging_overhead": ms["logged"] / ms["mass"] - 1,
            "key_compute_overhead": ms["keys"] / ms["mass"] - 1,
            "key_writing_overhead": ms["logged"] / ms["keys"] - 1,
            "total_overhead": ms["logged"] / ms["base"] - 1,
            "logging_overhead_cpu": cpu_ms["logged"] / cpu_ms["mass"] - 1}


def measure(config_file: str = "gin_configs/tiny.py", scale_keys: int = 1_000_000,
            latency_queries: int = 200, overhead_steps: int = 20, rounds: int = 3) -> dict:
    """The two numbers benchmarks/run_all.py reports, from a config alone (no trained
    workdir): query p50 at ``scale_keys`` synthetic keys (part 3) and the logging
    overhead of the config's train step (part 4)."""
    import pathlib

    from cbm_lm.default_config import load_config_file
    config = load_config_file(pathlib.Path(__file__).resolve().parents[1] / config_file)
    scale = scale_benchmark(provenance_config(config), scale_keys, latency_queries)
    overhead = logging_overhead(config, overhead_steps, rounds)
    return {"provenance_query_p50_ms": scale["query_p50_ms"],
            "provenance_logging_overhead": overhead["logging_overhead"],
            "provenance": {"config": config_file, "scale": scale, "logging": overhead}}


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    model, config = load_model(_WORKDIR.value)
    prov = provenance_config(config)
    built = sorted(p.name for p in (root(_WORKDIR.value) / "index").iterdir())
    methods = [m for m in _METHODS.value if m != "gradient"
               or (root(_WORKDIR.value) / "gradient" / "index").exists()]
    if methods != list(_METHODS.value):
        print("no gradient reference index (tools/build_provenance_index.py --gradient): skipped")
    res = {"quality": evaluate_methods(_WORKDIR.value, model, config, tuple(methods),
                                       indexes=tuple(built), source_chunks=_SOURCE_CHUNKS.value),
           "config": {k: getattr(prov, k) for k in prov.__dataclass_fields__}}
    for name in built:
        meta = KeyIndex.load(root(_WORKDIR.value) / "index" / name)
        res["quality"][f"provenance/{name}"]["index_bytes_per_chunk"] = meta.nbytes() / len(meta.ids)
    if _SCALE.value:
        res["scale"] = scale_benchmark(prov, _SCALE.value, _QUERIES.value)
    if _OVERHEAD.value:
        res["logging"] = logging_overhead(config, _OVERHEAD.value, _ROUNDS.value,
                                          tuple(_COMPARE.value))

    print(f"\n{'method':22s} {'query':12s} {'R@1':>6s} {'R@10':>6s} {'MRR':>6s}")
    for name, r in res["quality"].items():
        if name.startswith("sources"):
            continue
        for kind in ("verbatim", "paraphrased"):
            print(f"{name:22s} {kind:12s} {r[kind]['recall@1']:6.3f} {r[kind]['recall@10']:6.3f} "
                  f"{r[kind]['mrr']:6.3f}")
    for name, s in res["quality"].items():
        if name.startswith("sources"):
            mass = name.partition("/")[2] or "default"
            print(f"source accuracy (held-out, argmax, {mass} mass): {s['source_accuracy']:.3f} "
                  f"over {s['source_n']}")
    if "scale" in res:
        sc = res["scale"]
        print(f"{sc['keys']} keys ({sc['kind']}): p50 {sc['query_p50_ms']:.2f} ms, p95 "
              f"{sc['query_p95_ms']:.2f} ms, {sc['index_bytes_per_chunk']:.1f} bytes/chunk, "
              f"built in {sc['build_seconds']:.0f}s")
    if "logging" in res:
        lo = res["logging"]
        print("train step ms: " + ", ".join(f"{k} {v:.1f}" for k, v in lo["step_ms"].items())
              + f"; logging overhead {100 * lo['logging_overhead']:+.1f}% (vs mass only), "
              f"mass {100 * lo['mass_overhead']:+.1f}%, total {100 * lo['total_overhead']:+.1f}%; "
              f"in CPU time {100 * lo['logging_overhead_cpu']:+.1f}% "
              f"({lo['hashed_vectors']} hashed vectors); of it, the keys' compute in the "
              f"step {100 * lo['key_compute_overhead']:+.1f}%, their writing on the host "
              f"{100 * lo['key_writing_overhead']:+.1f}%")
        for spec in _COMPARE.value:
            print(f"  with provenance.{spec}: logging overhead "
                  f"{100 * lo[f'logging_overhead[{spec}]']:+.1f}% (vs mass only)")
    out = _OUT.value or str(root(_WORKDIR.value) / "benchmark.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
