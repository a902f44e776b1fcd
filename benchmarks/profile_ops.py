"""Per-op XLA time of the benchmark train steps and forward (jax.profiler trace).

    python benchmarks/profile_ops.py [--what step|forward|both] [--steps 2] [--top 30]

Traces the concept-bottleneck train step and the plain-backbone step of
benchmarks/concept_overhead.py (and/or the jitted forward of
benchmarks/steerling_forward.py), then reads the trace back
(jax._src.profiler.ProfileData) and prints, per jitted program, the ops with the
most time: each op's minimum over the traced steps (other work on a shared machine
only adds time), its share of the program's summed op time, and its HLO category.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import pathlib
import re
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402


def _op_times(trace_dir: str):
    """{program: {op: [durations ms per occurrence group]}} from the newest xplane.pb."""
    from jax._src.profiler import ProfileData
    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    pd = ProfileData.from_file(path)
    per = collections.defaultdict(lambda: collections.defaultdict(list))
    for plane in pd.planes:
        for line in plane.lines:
            for ev in line.events:
                stats = dict(ev.stats)
                prog = stats.get("hlo_module") or stats.get("program_id")
                if prog is None:
                    continue
                per[prog][ev.name].append(ev.duration_ns / 1e6)
    return per


def _describe(hlo_text: str) -> dict:
    """{module name: {instruction name: its shape and op}} from a compiled module's text."""
    out = {}
    module = hlo_text.split(None, 2)[1].rstrip(",")
    for line in hlo_text.splitlines():
        line = line.strip()
        if line.startswith("ROOT "):
            line = line[5:]
        if not line.startswith("%") or " = " not in line:
            continue
        name, rest = line[1:].split(" = ", 1)
        rest = re.sub(r", metadata=.*", "", rest)
        out.setdefault(name, rest[:150])
    return {module: out}


def report(per, steps: int, top: int, only=None, hlo: dict | None = None):
    hlo = hlo or {}
    for prog, ops in per.items():
        if only and not any(o in str(prog) for o in only):
            continue
        desc = hlo.get(str(prog), {})
        # each op runs a fixed number of times per step: per-step time = sum / steps,
        # minimum over steps approximated by sorting occurrences into steps
        rows = []
        for name, ds in ops.items():
            n = len(ds) // steps or 1
            chunks = [sum(ds[i * n:(i + 1) * n]) for i in range(max(len(ds) // n, 1))]
            rows.append((min(chunks), n, name))
        total = sum(r[0] for r in rows)
        rows.sort(reverse=True)
        print(f"\n== {prog}: summed op time {total:.0f} ms/step over {len(rows)} ops")
        for t, n, name in rows[:top]:
            print(f"{t:9.1f} ms {100 * t / total:5.1f}%  x{n:<3d} {name[:40]:<40} "
                  f"{desc.get(name, '')[:150]}")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", default="both")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp()
    if args.what in ("step", "both"):
        from benchmarks.configs import steerling_proportions_config
        from benchmarks.plain_backbone import make_plain_step
        from cbm_lm.config import MeshConfig, ModelConfig, logical_rules_from_config
        from cbm_lm.data.synthetic import synthetic_batch
        from cbm_lm.parallel.mesh import make_mesh
        from cbm_lm.train.optimizer import make_optimizer
        from cbm_lm.train.state import init_train_state
        from cbm_lm.train.step import make_train_step
        from jax.sharding import NamedSharding, PartitionSpec as P
        config = steerling_proportions_config()
        model_cfg = ModelConfig.from_config(config.model)
        mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
        rules = logical_rules_from_config(config.rules)
        tx, schedule = make_optimizer(config.optimizer, 100)
        graphdef, state, shardings = init_train_state(model_cfg, tx, 0, mesh, rules)
        batch = synthetic_batch(model_cfg, config.data.batch_size, config.data.seq_len,
                                config.data.max_chunk_concepts)
        cbm_step = make_train_step(graphdef, tx, schedule, config, model_cfg, shardings,
                                   NamedSharding(mesh, P()))
        plain_step, params, opt_state = make_plain_step(model_cfg, config.optimizer, 100)
        with jax.set_mesh(mesh):
            state, m = cbm_step(state, batch)
            jax.block_until_ready(m)
            params, opt_state, loss = plain_step(params, opt_state, batch)
            jax.block_until_ready(loss)
            d = f"{tmp}/step"
            with jax.profiler.trace(d):
                for _ in range(args.steps):
                    state, m = cbm_step(state, batch)
                    jax.block_until_ready(m)
                    params, opt_state, loss = plain_step(params, opt_state, batch)
                    jax.block_until_ready(loss)
        hlo = {**_describe(cbm_step.lower(state, batch).compile().as_text()),
               **_describe(plain_step.lower(params, opt_state, batch).compile().as_text())}
        report(_op_times(d), args.steps, args.top, hlo=hlo)
    if args.what in ("forward", "both"):
        import jax.numpy as jnp
        import numpy as np
        from flax import nnx
        from benchmarks.steerling_forward import _save, _steerling_model
        from cbm_lm.interop import import_steerling
        ref, cfg, ccfg = _steerling_model(8192, 512, 4, 256)
        with tempfile.TemporaryDirectory() as t2:
            _save(ref, cfg, ccfg, 8192, t2)
            ours, _ = import_steerling(t2)
        ids = jnp.asarray(np.random.default_rng(0).integers(0, 8191, size=(8, 256)), jnp.int32)

        @nnx.jit
        def fwd(model, x):
            return model(x).logits
        fwd(ours, ids).block_until_ready()
        d = f"{tmp}/fwd"
        with jax.profiler.trace(d):
            for _ in range(args.steps):
                fwd(ours, ids).block_until_ready()
        report(_op_times(d), args.steps, args.top,
               hlo=_describe(fwd.lower(ours, ids).compile().as_text()))


if __name__ == "__main__":
    main()
