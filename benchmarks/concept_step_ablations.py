"""Which part of the concept train step costs what: variants of the step, side by side.

    python -m benchmarks.concept_step_ablations [--rounds 5] [--variants no_independence ...]
                                               [--heads_only]

Every variant is the concept-bottleneck train step of benchmarks/concept_overhead.py
(the benchmark shape, tiny.py's loss) with one thing changed; all of them and the plain
backbone step run interleaved, round by round, two steps each, and each reports its
minimum and median step time and both over the plain step's. A variant is a config
override or a loss term replaced by zero for this process (a patch of the term's
function while the step is traced: the library has no switch that skips a term's
compute, since weight 0 still computes it). The variants measured on 2026-12-05
(docs/performance.md "the selection without its score matrix") moved the step by less
than one run's noise (about 1%) each.

--heads_only runs both steps with the transformer blocks skipped (h = the token
embeddings; the blocks' parameters stay, so both optimizers update the same trees), so
each variant's difference to the plain step is the rewrite layer, its losses and its
tables' optimizer update alone, on a step of ~0.48 s instead of ~1.9 s: about 5-10 ms
of noise instead of about 20, enough to resolve terms of ~1% of the full step
(docs/performance.md "the independence term in rank space").
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks.configs import steerling_proportions_config
from benchmarks.plain_backbone import make_plain_step
from cbm_lm.config import MeshConfig, ModelConfig, logical_rules_from_config
from cbm_lm.data.synthetic import synthetic_batch
from cbm_lm.model.backbone import Backbone
from cbm_lm.parallel.mesh import make_mesh
from cbm_lm.train import losses
from cbm_lm.train.optimizer import make_optimizer
from cbm_lm.train.state import init_train_state
from cbm_lm.train.step import make_train_step


def _zero(*_, **__):
    return jnp.zeros((), jnp.float32)


def _zero_concept_loss(*_, **__):
    zero = _zero()
    return zero, {"pos_loss": zero, "neg_loss": zero, "pos_detected": zero, "pooled_loss": zero}


def _embedding_only(self, tokens=None, **_):
    """Backbone.__call__ under --heads_only: h = the token embeddings, no blocks."""
    return self.embed(tokens)


# name -> (config override, [(module, attribute, replacement) patched while tracing])
VARIANTS = {
    "base": (None, []),
    "no_unknown_head": (lambda c: setattr(c.model.concepts, "n_unknown", 0), []),
    "no_concept_loss": (None, [(losses.obj, "chunk_concept_loss", _zero_concept_loss)]),
    "no_independence": (None, [(losses.obj, "independence_loss", _zero),
                                (losses.obj, "independence_loss_factorized", _zero)]),
    "no_reconstruction": (None, [(losses.obj, "reconstruction_loss", _zero)]),
    "no_share_metrics": (None, [(losses, "_logit_shares", lambda *a, **k: {}),
                                (losses, "_dead_fraction", _zero)]),
    "no_residual_energy": (lambda c: setattr(c.loss, "epsilon_weight", 0.0), []),
    "no_pooled_concept": (lambda c: setattr(c.loss, "concept_pooled_weight", 0.0), []),
    "negatives_64": (lambda c: setattr(c.loss, "concept_negatives", 64), []),
    "xla_kernels": (lambda c: setattr(c.model.concepts, "kernels", "xla"), []),
}


@contextlib.contextmanager
def _patched(patches):
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    for mod, name, fn in patches:
        setattr(mod, name, fn)
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def _timed(fn):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def measure(names, rounds: int = 5, steps: int = 2) -> dict:
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    runs, built = {}, {}
    for name in names:             # built outside the mesh, as concept_overhead.py does
        override, patches = VARIANTS[name]
        config = steerling_proportions_config()
        if override:
            override(config)
        model_cfg = ModelConfig.from_config(config.model)
        tx, schedule = make_optimizer(config.optimizer, 1000)
        graphdef, state, shardings = init_train_state(
            model_cfg, tx, 0, mesh, logical_rules_from_config(config.rules))
        batch = synthetic_batch(model_cfg, config.data.batch_size, config.data.seq_len,
                                config.data.max_chunk_concepts)
        step = make_train_step(graphdef, tx, schedule, config, model_cfg, shardings,
                               NamedSharding(mesh, P()))
        built[name] = (step, {"state": state}, batch, patches)
    # the plain step from the unmodified config, whichever variant was built last
    base = steerling_proportions_config()
    base_model = ModelConfig.from_config(base.model)
    plain, params, opt_state = make_plain_step(base_model, base.optimizer, 1000)
    plain_batch = synthetic_batch(base_model, base.data.batch_size, base.data.seq_len,
                                  base.data.max_chunk_concepts)
    pbox = {"p": params, "o": opt_state}

    def run_plain():
        pbox["p"], pbox["o"], loss = plain(pbox["p"], pbox["o"], plain_batch)
        return loss

    with jax.set_mesh(mesh):
        for name, (step, box, b, patches) in built.items():
            def run(step=step, box=box, b=b):
                box["state"], m = step(box["state"], b)
                return m["loss"]

            with _patched(patches):   # compiled now, with the patch in place
                jax.block_until_ready(run())
            runs[name] = run
        jax.block_until_ready(run_plain())
        runs["plain"] = run_plain
        times = {name: [] for name in runs}
        for _ in range(rounds):
            for name, fn in runs.items():
                times[name] += [_timed(fn) for _ in range(steps)]
    p_min, p_med = min(times["plain"]), statistics.median(times["plain"])
    return {name: {"min_s": min(t), "median_s": statistics.median(t),
                   "min_over_plain": min(t) / p_min,
                   "median_over_plain": statistics.median(t) / p_med} for name, t in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--heads_only", action="store_true",
                    help="skip the transformer blocks in both steps (module docstring)")
    args = ap.parse_args(argv)
    names = ["base"] + [v for v in args.variants if v != "base"]
    with _patched([(Backbone, "__call__", _embedding_only)] if args.heads_only else []):
        results = measure(names, args.rounds)
    plain = results["plain"]
    for name, r in results.items():
        print(f"{name:<20} min {r['min_s']:.3f} s  median {r['median_s']:.3f} s  over plain: "
              f"min {r['min_over_plain']:.3f}  median {r['median_over_plain']:.3f}  minus plain: "
              f"min {1e3 * (r['min_s'] - plain['min_s']):.1f} ms  "
              f"median {1e3 * (r['median_s'] - plain['median_s']):.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
