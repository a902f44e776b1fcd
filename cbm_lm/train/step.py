"""The jitted train and eval steps.

train_step(state, batch) -> (state, metrics[, chunk keys]):
  rng_s   = fold_in(state.rng, state.step)
  grads   = sum_i n_i d loss_i / d params / sum_i n_i over the A micro-batches
            (lax.scan, A = grad_accum_steps; n_i = micro-batch i's ``lm_tokens``)
  params <- AdamW(clip(grads))                                  (optax)
  source_mass += concept x source mass of the batch, and with provenance.log_keys the
  step also returns its chunks' keys and ids, both from the same pass (train/chunk_keys.py)
When the model carries the learned key head (``trains_key_head``) the loss has its
contrastive term (objectives/key_contrastive.py), which trains the head's W alone.
A non-finite update never reaches the params: make_optimizer wraps it in
``optax.apply_if_finite``, which leaves params and moments
untouched for that step. The step counts it in state.skipped and reports
``finite`` (update and loss finite); the loop then stops naming the step
(nan_policy=stop) or goes on (skip) up to train.max_skipped_steps.

Gradient accumulation (A > 1) weights each micro-batch by the count its LM loss is
normalised by, n_i = ``lm_tokens`` (next-token pairs, autoregressive; real tokens, diffusion
with the ELBO weighting; masked real tokens, diffusion with uniform weighting), as MaxText
does, instead of averaging the A per-micro-batch means:

  loss = sum_i n_i loss_i / sum_i n_i,   grads = sum_i n_i g_i / sum_i n_i
  (loss_i, g_i: micro-batch i's loss and gradient, each a mean over its own tokens)

For a term L = sum_i S_i / sum_i n_i with L_i = S_i / n_i normalised by that same count,
sum_i n_i L_i / sum_i n_i = L: the step equals the full batch whatever the padding,
document ends or random masking of each micro-batch. That makes exact: L_lm, and the
metrics normalised by the LM's own positions (next_token_acc; the logit shares; with
uniform diffusion weighting masked_ce, masked_acc, masked_ce_t*; with the ELBO weighting
the reconstruction loss, normalised by real tokens too). Every other term and metric is
a token-weighted approximation of its full-batch value (exact when each micro-batch has
the same ratio of its own count to n_i): the reconstruction loss (real tokens) under the
autoregressive objective, masked_ce/masked_acc/logit shares under the ELBO weighting, the
concept loss (positive / negative pairs), the residual energy (a ratio of sums), steering
(its positions) and the per-sequence rates (cfg_dropped, epsilon_dropped); the
independence loss (a batch covariance), the provenance InfoNCE (in-batch negatives) and
dead_known_fraction are batch statistics no micro-batching reproduces. Count metrics
(``COUNT_METRICS``: real_tokens, lm_tokens, ...) are summed over the micro-batches, so they
count the whole batch. A step whose micro-batches score no LM token at all (sum_i n_i = 0)
gets zero gradient and loss. A = 1 runs the one pass unchanged.

``make_train_step`` returns the function jitted with explicit in/out
shardings and the state donated, to be called under ``jax.set_mesh``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cbm_lm.model.provenance import placed_tables, trains_key_head
from cbm_lm.provenance.build import provenance_config
from cbm_lm.train.chunk_keys import step_outputs
from cbm_lm.train.losses import compute_losses
from cbm_lm.train.state import TrainState


# metrics that count (tokens, chunks, positions) in the batch: summed over micro-batches
COUNT_METRICS = frozenset({"real_tokens", "lm_tokens", "provenance_view_chunks",
                           "steering_positions"})


def is_count_metric(name: str) -> bool:
    return name in COUNT_METRICS or name.endswith("_count")


def add_weighted_metrics(total: dict, m: dict) -> dict:
    """total + one micro-batch's metrics: counts added, the rest weighted by its n_i =
    ``lm_tokens`` (module docstring); finish with ``weighted_metrics_mean``."""
    n = m["lm_tokens"]
    return {k: total[k] + (v if is_count_metric(k) else (n * v).astype(v.dtype))
            for k, v in m.items()}


def weighted_metrics_mean(total: dict) -> dict:
    """Summed micro-batch metrics -> the batch's: sum_i n_i m_i / sum_i n_i, counts as summed."""
    n = jnp.maximum(total["lm_tokens"], 1.0)
    return {k: v if is_count_metric(k) else (v / n).astype(v.dtype) for k, v in total.items()}


def _split_micro(batch, n: int):
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} does not split into {n} micro-batches "
                             f"(train.grad_accum_steps)")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])
    return jax.tree.map(split, batch)


def train_step(state: TrainState, batch, tables=None, *, graphdef, tx, schedule, config):
    """tables: the key head's fixed tables (``placed_tables``) with provenance.log_keys or a
    trained key head."""
    model_cfg, loss_cfg = config["model_cfg"], config["loss_cfg"]
    accum = config["grad_accum_steps"]
    if not isinstance(state.opt_state, optax.ApplyIfFiniteState):
        raise TypeError("train_step needs an optax.apply_if_finite optimizer (make_optimizer)")
    rng = jax.random.fold_in(state.rng, state.step)

    log_keys = config.get("log_keys", False)

    def loss_fn(params, micro, key):
        model = nnx.merge(graphdef, params)
        total, metrics, views = compute_losses(model, micro, key, state.step, loss_cfg=loss_cfg,
                                               model_cfg=model_cfg, train=True,
                                               return_views=True, key_tables=tables)
        prov = (step_outputs(views, micro, config["prov_cfg"], model_cfg, log_keys, tables,
                             head=getattr(model, "provenance_head", None))
                if config.get("prov_cfg") is not None else {})
        return total, (metrics, prov.get("mass"), prov.get("keys"))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
        (_, (metrics, mass, keys)), grads = grad_fn(state.params, batch, rng)
    else:
        micro = _split_micro(batch, accum)

        def body(carry, xs):
            g_sum, m_sum, mass_sum = carry
            mb, i = xs
            (_, (m, mass_i, keys_i)), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
            n = m["lm_tokens"]   # micro-batch i's weight n_i (module docstring)
            g_sum = jax.tree.map(lambda s, x: s + (n * x).astype(s.dtype), g_sum, g)
            return (g_sum, add_weighted_metrics(m_sum, m),
                    jax.tree.map(jnp.add, mass_sum, mass_i)), keys_i

        zeros_g = jax.tree.map(jnp.zeros_like, state.params)
        aux_shape = jax.eval_shape(
            lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), rng)[0][1])
        zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)  # noqa: E731
        (grads, metrics, mass), keys = jax.lax.scan(
            body, (zeros_g, zeros(aux_shape[0]), zeros(aux_shape[1])), (micro, jnp.arange(accum)))
        total_n = jnp.maximum(metrics["lm_tokens"], 1.0)   # sum_i n_i
        grads = jax.tree.map(lambda g: (g / total_n).astype(g.dtype), grads)
        metrics = weighted_metrics_mean(metrics)
        # [A, B/A, ...] -> [B, ...]: the micro-batches were consecutive rows
        keys = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), keys)

    grad_norm = optax.tree.norm(grads)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)   # zero updates when not finite
    finite = new_opt.last_finite & jnp.isfinite(metrics["loss"])
    new_state = state.replace(step=state.step + 1, params=new_params, opt_state=new_opt,
                              skipped=state.skipped + (~new_opt.last_finite).astype(jnp.int32))
    if state.source_mass is not None and mass is not None:   # a skipped step adds no mass
        new_state = new_state.replace(
            source_mass=jnp.where(finite, state.source_mass + mass, state.source_mass))
    # the rate this step applies: the optimizer's count skips the non-finite steps
    # (optax.apply_if_finite holds its inner state), so it trails state.step by them
    metrics = dict(metrics, grad_norm=grad_norm, learning_rate=schedule(state.step - state.skipped),
                   finite=finite.astype(jnp.float32),
                   skipped_steps=new_state.skipped.astype(jnp.float32))
    if log_keys:
        return new_state, metrics, keys
    return new_state, metrics


def eval_step(params, batch, *, graphdef, config):
    """Held-out losses with a fixed rng (same masks every eval), no dropout/teacher forcing."""
    model = nnx.merge(graphdef, params)
    _, metrics = compute_losses(model, batch, jax.random.PRNGKey(1234), jnp.zeros((), jnp.int32),
                                loss_cfg=config["loss_cfg"], model_cfg=config["model_cfg"],
                                train=False)
    return metrics


def step_config(model_cfg, config) -> dict:
    """The static pieces the step closes over (hashable-free; captured by closure)."""
    prov = provenance_config(config)
    return {"model_cfg": model_cfg, "loss_cfg": config.loss,
            "grad_accum_steps": config.train.grad_accum_steps,
            "nan_policy": config.train.nan_policy,
            "prov_cfg": prov, "log_keys": prov.log_keys}


class _WithTables:
    """step(state, batch) -> jitted(state, batch, tables): the key head's fixed tables
    drawn once and passed in, not drawn again in every step (``placed_tables``)."""

    def __init__(self, jitted, tables):
        self.jitted, self.tables = jitted, tables

    def __call__(self, state, batch):
        return self.jitted(state, batch, self.tables)

    def lower(self, state, batch):
        return self.jitted.lower(state, batch, self.tables)


def make_train_step(graphdef, tx, schedule, config, model_cfg, state_shardings, batch_sharding):
    """With provenance.log_keys the step returns (state, metrics, chunk keys) (see
    cbm_lm/train/chunk_keys.py; the keys sharded over the batch like the batch)."""
    cfg = step_config(model_cfg, config)
    fn = functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule, config=cfg)
    if not (cfg["log_keys"] or trains_key_head(cfg["prov_cfg"])):
        return jax.jit(fn, in_shardings=(state_shardings, batch_sharding),
                       out_shardings=(state_shardings, None), donate_argnums=(0,))
    tables = placed_tables(cfg["prov_cfg"], model_cfg, batch_sharding.mesh)
    outs = (state_shardings, None) + ((batch_sharding,) if cfg["log_keys"] else ())
    jitted = jax.jit(fn, in_shardings=(state_shardings, batch_sharding,
                                       jax.tree.map(lambda x: x.sharding, tables)),
                     out_shardings=outs, donate_argnums=(0,))
    return _WithTables(jitted, tables)


def make_eval_step(graphdef, config, model_cfg, param_shardings, batch_sharding):
    fn = functools.partial(eval_step, graphdef=graphdef, config=step_config(model_cfg, config))
    return jax.jit(fn, in_shardings=(param_shardings, batch_sharding))
