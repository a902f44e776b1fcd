"""TrainState: everything the step updates, as one pytree with shardings.

  step       int32 []          optimizer steps taken
  params     dict              the model's nnx.Param values (pure dict, fp32 master)
  opt_state  optax state       AdamW moments, shaped like params
  rng        uint32 [2]        base key; step s uses fold_in(rng, s)
  skipped    int32 []          steps skipped for non-finite loss (nan_policy=skip)
  source_mass float32 [C_pad,S] known-concept weight mass per training source, summed over
                               every token of every step (train/chunk_keys.py); replicated

The module structure (graphdef) is static and kept beside the state; the
model is rebuilt inside the step with ``nnx.merge(graphdef, params)``.
Shardings: params follow their logical axes; optimizer moments follow the
parameter they mirror (matched by path suffix); scalars are replicated.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cbm_lm.config import ModelConfig, ProvenanceConfig
from cbm_lm.model import ConceptBottleneckLM, abstract_lm
from cbm_lm.parallel.sharding import state_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array
    source_mass: Any = None


def _dict_path(path) -> tuple:
    """The trailing run of dict keys of a pytree path (a param's own path)."""
    keys = []
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.DictKey):
            keys.append(entry.key)
        else:
            break
    return tuple(reversed(keys))


def shardings_like_params(tree, param_shardings: dict, mesh: Mesh):
    """Shardings for ``tree`` (e.g. an optax state): leaves whose trailing dict
    path names a parameter of the same shape take its sharding; others replicate."""
    by_path = {path: s for path, s in (
        (_dict_path(p), s) for p, s in jax.tree_util.tree_leaves_with_path(param_shardings))}
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        return by_path.get(_dict_path(path), replicated) if getattr(leaf, "ndim", 0) else replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def abstract_train_state(model_cfg: ModelConfig, tx: optax.GradientTransformation,
                         n_sources: int = 64, provenance: ProvenanceConfig | None = None):
    """(graphdef, TrainState of ShapeDtypeStructs, param logical State) with no allocation.

    n_sources: columns of the source mass (provenance.max_sources); provenance: the run's
    section (the params hold the learned key head's W when it is trained, model/lm.py)."""
    graphdef, abs_params = abstract_lm(model_cfg, provenance)
    pure = abs_params.to_pure_dict()
    abs_opt = jax.eval_shape(tx.init, pure)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    mass = jax.ShapeDtypeStruct((model_cfg.concepts.n_known_padded, n_sources), jnp.float32)
    state = TrainState(step=scalar, params=pure, opt_state=abs_opt,
                       rng=jax.ShapeDtypeStruct((2,), jnp.uint32), skipped=scalar,
                       source_mass=mass)
    return graphdef, state, abs_params


def train_state_shardings(abs_state: TrainState, abs_params: nnx.State, mesh: Mesh, rules):
    param_sh = state_shardings(abs_params, mesh, rules).to_pure_dict()
    replicated = NamedSharding(mesh, P())
    return TrainState(step=replicated, params=param_sh,
                      opt_state=shardings_like_params(abs_state.opt_state, param_sh, mesh),
                      rng=replicated, skipped=replicated,
                      source_mass=None if abs_state.source_mass is None else replicated)


def init_train_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, seed: int,
                     mesh: Mesh, rules, n_sources: int = 64,
                     provenance: ProvenanceConfig | None = None):
    """Initializes the state directly into its shardings (jit with out_shardings).

    Returns (graphdef, state, shardings).
    """
    graphdef, abs_state, abs_params = abstract_train_state(model_cfg, tx, n_sources, provenance)
    shardings = train_state_shardings(abs_state, abs_params, mesh, rules)

    def init():
        model = ConceptBottleneckLM(model_cfg, rngs=nnx.Rngs(seed), provenance=provenance)
        params = nnx.state(model, nnx.Param).to_pure_dict()
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params),
                          rng=jax.random.PRNGKey(seed + 1).astype(jnp.uint32),
                          skipped=jnp.zeros((), jnp.int32),
                          source_mass=jnp.zeros(abs_state.source_mass.shape, jnp.float32))

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        state = jax.jit(init, out_shardings=shardings)()
    return graphdef, state, shardings
