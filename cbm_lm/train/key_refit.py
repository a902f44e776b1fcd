"""Known-key refit: the last stage of training fits the known head's keys to the final states.

While the model trains, each known key row k_j (concept j's logistic read-out of the
backbone output, z_tj = h_t . k_j) chases a moving h at the shared rate and weight decay.
With ``train.key_refit_steps`` = S > 0, after the last step and before its checkpoint:

  1. H: the backbone output h [R,T,D] of the next R = ``train.key_refit_batches`` x
     data.batch_size training rows (the data stream continues; the eval forward: clean
     tokens, no dropout), each row's concept labels aligned to the positions that predict
     them (objectives.align_labels_to_predictions); H stays on the devices, sharded by row.
  2. S AdamW steps (rate ``train.key_refit_lr``, cosine to 0.1 x, no weight decay), each on
     one batch of H drawn at random, on two disjoint parameter sets:
       the known keys K:    L_c(K)   = objectives.chunk_concept_loss(head, H_b, labels_b), the
                            training's own concept term (the loss config's positives,
                            negatives and weights; its balance unless
                            ``train.key_refit_balance`` names one: "concept" weighs each
                            labelled concept of the batch equally, the macro mean the
                            eval's AUROC takes; no pooled term, no top-k negatives);
       the unknown head U:  L_e(U)   = ||h - k - u||^2 / ||h||^2 (objectives.residual_energy)
                            with the keys held (stop_gradient): the residual the new keys'
                            features leave, which the old U was not trained on, summed
                            where the training's residual energy sums it (positions that
                            predict a next token of their own document).
     h is fixed, so no term reaches the backbone.
  3. The fitted K and U replace theirs in the params; every other parameter is unchanged.

h depends on neither, so wherever epsilon is kept (composed = h, model/rewrite.py) the LM's
output, and so its perplexity, is exactly the trained model's. What changes is which concepts
are selected, their weights and the unknown features: the concept shares and epsilon are
measured after it (the keys refit alone moved the demo's epsilon share from 0.109 to 0.173;
with U refit too, 0.112). Memory: R x T x D floats of H (the demo: 2000 x 512 x 128 fp32, 500 MiB);
a large model refits with few batches or not at all (S = 0, the default).

Scope: autoregressive models with epsilon correction (config_validation refuses the rest:
a diffusion model's residual is measured on its noisy stream, not the clean states fitted
here, and without epsilon the LM reads k + u, which the refit changes). The refit's batches
come from the training stream, so the final checkpoint's data position is past them, and a
run resumed with a larger train.num_steps continues from the refitted keys.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cbm_lm import objectives as obj
from cbm_lm.train.device_batch import global_batch
from cbm_lm.train.losses import concept_term_options, predicted_positions
from cbm_lm.train.optimizer import known_head_keys


def known_key_path(params) -> tuple[str, ...]:
    """The params path of the known head's key rows: the one leaf the optimizer labels
    "known_keys" (train/optimizer.py, known_head_keys)."""
    paths = [tuple(k.key for k in path) for path, label in
             jax.tree_util.tree_leaves_with_path(known_head_keys(params)) if label == "known_keys"]
    if len(paths) != 1:
        raise KeyError(f"expected one known-head key leaf in the params, found {paths}")
    return paths[0]


def _with_keys(params, path, keys):
    """A copy of the pure-dict ``params`` with the leaf at ``path`` replaced by ``keys``."""
    if not path:
        return keys
    return {**params, path[0]: _with_keys(params[path[0]], path[1:], keys)}


def _leaf(params, path):
    for k in path:
        params = params[k]
    return params


def collect_states(graphdef, params, batches, objective: str) -> list[dict]:
    """Per batch {hidden [B,T,D], concept_ids [B,T,K], chunk_segment_ids [B,T], scored
    [B,T]}: the eval forward's backbone output, the labels of the positions that predict
    each token, and the positions whose residual the LM reads (those that predict a
    next token of their own document, as the training's residual energy counts them)."""
    @jax.jit
    def states(params, batch):
        model = nnx.merge(graphdef, params)
        h = model.hidden(batch["tokens"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"])
        ids, chunks = obj.align_labels_to_predictions(
            batch["concept_ids"], batch["chunk_segment_ids"], batch["segment_ids"], objective)
        # autoregressive only (config_validation refuses a diffusion refit): no mask
        _, scored = predicted_positions(batch["tokens"], batch["segment_ids"], None, False)
        return {"hidden": jax.lax.stop_gradient(h).astype(jnp.float32), "concept_ids": ids,
                "chunk_segment_ids": chunks, "scored": scored}
    return [states(params, b) for b in batches]


def refit_known_keys(graphdef, params, states: list[dict], loss_cfg, *, steps: int, lr: float,
                     seed: int, balance: str = "loss") -> tuple[dict, dict]:
    """(params with the refitted keys and unknown head, {first/last concept loss and
    residual energy}) after ``steps`` AdamW steps over batches of ``states`` drawn at
    random (module docstring)."""
    if not states:
        raise ValueError("key refit: no collected batches (train.key_refit_batches must be >= 1)")
    if steps < 1:
        raise ValueError(f"key refit: steps must be >= 1, got {steps}")
    path = known_key_path(params)
    unknown = ("rewrite", "unknown_head")
    has_unknown = "unknown_head" in params["rewrite"]
    fit = {"keys": _leaf(params, path)}
    if has_unknown:
        fit["unknown"] = _leaf(params, unknown)
    tx = optax.adamw(optax.cosine_decay_schedule(lr, steps, alpha=0.1), weight_decay=0.0)
    options = concept_term_options(loss_cfg)
    if balance != "loss":
        options["balance"] = balance

    def place(fit, hold_keys, params):
        p = _with_keys(params, path, jax.lax.stop_gradient(fit["keys"]) if hold_keys
                       else fit["keys"])
        return _with_keys(p, unknown, fit["unknown"]) if has_unknown else p

    # params is an argument of the jitted step, never a closure: a closed-over array would be
    # baked into the program as a constant (and refused when it spans several processes)
    def loss_of(fit, s, rng, params):
        head = nnx.merge(graphdef, place(fit, False, params)).rewrite.known_head
        concept, _ = obj.chunk_concept_loss(
            head, s["hidden"], s["concept_ids"], s["chunk_segment_ids"], None, rng,
            **options, with_auroc=False)
        if not has_unknown:
            return concept, (concept, jnp.zeros(()))
        # the unknown head re-fits the residual the new keys' features leave (keys held)
        rw = nnx.merge(graphdef, place(fit, True, params)).rewrite(s["hidden"])
        energy = obj.residual_energy(s["hidden"], rw.known.features, rw.unknown_features,
                                     s["scored"])
        return concept + energy, (concept, energy)

    @jax.jit
    def step(fit, opt_state, s, rng, params):
        (_, parts), g = jax.value_and_grad(loss_of, has_aux=True)(fit, s, rng, params)
        updates, opt_state = tx.update(g, opt_state, fit)
        return optax.apply_updates(fit, updates), opt_state, parts

    opt_state = tx.init(fit)
    order = np.random.default_rng(seed).integers(0, len(states), steps)
    rng = jax.random.PRNGKey(seed)
    seen = []
    for i, b in enumerate(order):
        fit, opt_state, parts = step(fit, opt_state, states[int(b)], jax.random.fold_in(rng, i),
                                     params)
        if i == 0 or i == steps - 1:
            seen.append([float(x) for x in parts])
    return place(fit, False, params), {
        "key_refit_first_concept_loss": seen[0][0], "key_refit_last_concept_loss": seen[-1][0],
        "key_refit_first_energy": seen[0][1], "key_refit_last_energy": seen[-1][1]}


def run_key_refit(state, graphdef, config, data_iter, batch_sharding):
    """The refit stage on a TrainState (module docstring) -> (state with new params, stats)."""
    t, start = config.train, time.time()
    batches = [global_batch(next(data_iter), batch_sharding)
               for _ in range(int(t.key_refit_batches))]
    states = collect_states(graphdef, state.params, batches, config.model.objective)
    params, stats = refit_known_keys(graphdef, state.params, states, config.loss,
                                     steps=int(t.key_refit_steps), lr=float(t.key_refit_lr),
                                     seed=int(config.seed),
                                     balance=t.get("key_refit_balance", "loss"))
    return state.replace(params=params), dict(stats, key_refit_seconds=time.time() - start)
