"""Chunk provenance measured against planted facts, BM25, and at 1M keys.

  python benchmarks/provenance.py --workdir runs/demo/train [--out provenance.json]
      [--methods provenance,bm25] [--scale_keys 1000000]

1. Recall@1 / Recall@10 / MRR of the one training chunk stating each planted
   fact, for verbatim (the statement) and paraphrased (held-out) queries, per
   method: the provenance index (each built index: logged and/or re-keyed) and
   BM25 (cbm_lm/provenance/evaluate.py).
2. Source accuracy: argmax of the source distribution on held-out chunks.
3. Scale: query latency p50/p95 (one query, k=10) and index bytes per chunk
   for an index of ``--scale_keys`` synthetic unit keys built with the run's
   provenance config (IVF-PQ above provenance.exact_max_keys).
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
_METHODS = flags.DEFINE_list("methods", ["provenance", "bm25"], "Methods to compare.")
_SCALE = flags.DEFINE_integer("scale_keys", 1_000_000, "Synthetic keys for the latency part "
                              "(0 skips it).")
_SOURCE_CHUNKS = flags.DEFINE_integer("source_chunks", 1000, "Held-out chunks for source accuracy.")
_QUERIES = flags.DEFINE_integer("latency_queries", 200, "Queries timed at scale.")


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


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    model, config = load_model(_WORKDIR.value)
    prov = provenance_config(config)
    built = sorted(p.name for p in (root(_WORKDIR.value) / "index").iterdir())
    res = {"quality": evaluate_methods(_WORKDIR.value, model, config, tuple(_METHODS.value),
                                       indexes=tuple(built), source_chunks=_SOURCE_CHUNKS.value),
           "config": {k: getattr(prov, k) for k in prov.__dataclass_fields__}}
    for name in built:
        meta = KeyIndex.load(root(_WORKDIR.value) / "index" / name)
        res["quality"][f"provenance/{name}"]["index_bytes_per_chunk"] = meta.nbytes() / len(meta.ids)
    if _SCALE.value:
        res["scale"] = scale_benchmark(prov, _SCALE.value, _QUERIES.value)

    print(f"\n{'method':22s} {'query':12s} {'R@1':>6s} {'R@10':>6s} {'MRR':>6s}")
    for name, r in res["quality"].items():
        if name == "sources":
            continue
        for kind in ("verbatim", "paraphrased"):
            print(f"{name:22s} {kind:12s} {r[kind]['recall@1']:6.3f} {r[kind]['recall@10']:6.3f} "
                  f"{r[kind]['mrr']:6.3f}")
    s = res["quality"]["sources"]
    print(f"source accuracy (held-out, argmax): {s['source_accuracy']:.3f} over {s['source_n']}")
    if "scale" in res:
        sc = res["scale"]
        print(f"{sc['keys']} keys ({sc['kind']}): p50 {sc['query_p50_ms']:.2f} ms, p95 "
              f"{sc['query_p95_ms']:.2f} ms, {sc['index_bytes_per_chunk']:.1f} bytes/chunk, "
              f"built in {sc['build_seconds']:.0f}s")
    out = _OUT.value or str(root(_WORKDIR.value) / "benchmark.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
