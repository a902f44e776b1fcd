"""The known-key refit (train/key_refit.py): it fits the keys and the unknown head only, on
fixed states; its concept term falls; the unknown head takes up the residual the new keys
leave; configs outside its scope are refused; the trainer runs it after the last step."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cbm_lm.config_validation import ConfigError, validate_config
from cbm_lm.default_config import base_config
from cbm_lm.objectives import chunk_concept_loss, residual_energy
from cbm_lm.train.checkpoint import load_model
from cbm_lm.train import key_refit
from cbm_lm.train.key_refit import collect_states, known_key_path, refit_known_keys
from model_fixtures import make_model, tiny_config
from train_fixtures import run, tiny_corpus, train_args

B, T, K = 4, 32, 2


def _batches(cfg, n, seed=0):
    """n batches whose chunk labels follow the chunk's first token (learnable from h)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(0, cfg.vocab_size - 1, (B, T))
        chunk = (np.arange(T) // 8 + 1)[None].repeat(B, 0).astype(np.int32)
        ids = np.full((B, T, K), -1)
        first = tokens[:, ::8].repeat(8, axis=1)
        ids[..., 0] = first % cfg.concepts.n_known
        out.append({"tokens": jnp.asarray(tokens, jnp.int32),
                    "segment_ids": jnp.ones((B, T), jnp.int32),
                    "positions": jnp.asarray(np.broadcast_to(np.arange(T), (B, T)), jnp.int32),
                    "concept_ids": jnp.asarray(ids, jnp.int32),
                    "chunk_segment_ids": jnp.asarray(chunk)})
    return out


def _loss_cfg():
    c = base_config().loss
    c.concept_positives, c.concept_negatives = "token", 64
    return c


def _concept_loss(graphdef, params, states, loss_cfg, balance="none"):
    """The concept term under ``balance`` over every state, the same negatives for every
    params (one rng per state)."""
    head = nnx.merge(graphdef, params).rewrite.known_head
    return float(np.mean([chunk_concept_loss(
        head, s["hidden"], s["concept_ids"], s["chunk_segment_ids"], None, jax.random.key(i),
        n_negatives=loss_cfg.concept_negatives, positives="token", balance=balance,
        with_auroc=False)[0]
        for i, s in enumerate(states)]))


def _energy(graphdef, params, states):
    total = 0.0
    for s in states:
        rw = nnx.merge(graphdef, params).rewrite(s["hidden"])
        total += float(residual_energy(s["hidden"], rw.known.features, rw.unknown_features,
                                       s["scored"]))
    return total / len(states)


@pytest.fixture(scope="module")
def refit():
    cfg = tiny_config()
    graphdef, state = nnx.split(make_model(cfg), nnx.Param)
    params = state.to_pure_dict()
    states = collect_states(graphdef, params, _batches(cfg, 6), "autoregressive")
    new, stats = refit_known_keys(graphdef, params, states, _loss_cfg(), steps=150, lr=3e-2,
                                  seed=0)
    return cfg, graphdef, params, new, states, stats


def test_only_the_keys_and_the_unknown_head_move(refit):
    _, _, params, new, _, _ = refit
    key_path = known_key_path(params)
    moved = []
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(params),
                                 jax.tree_util.tree_leaves_with_path(new)):
        names = tuple(k.key for k in path)
        if names == key_path or names[:2] == ("rewrite", "unknown_head"):
            moved.append(not np.array_equal(a, b))
        else:
            np.testing.assert_array_equal(a, b, err_msg=f"{names} changed")
    assert moved and all(moved)


def test_the_residual_is_scored_where_the_lm_reads_it():
    """The unknown head refits the residual at the positions that predict a next token of
    their own document (as the training's residual energy counts them): not a document's
    last position, not padding."""
    cfg = tiny_config()
    graphdef, state = nnx.split(make_model(cfg), nnx.Param)
    batch = dict(_batches(cfg, 1)[0])
    seg = np.ones((B, T), np.int32)
    seg[0, 10:] = 2                      # two documents: positions 9 and 31 end them
    seg[1, 20:] = 0                      # padding after position 19
    batch["segment_ids"] = jnp.asarray(seg)
    scored = np.asarray(collect_states(graphdef, state.to_pure_dict(), [batch],
                                       "autoregressive")[0]["scored"])
    want = np.ones((B, T), bool)
    want[:, -1] = False
    want[0, 9] = False
    want[1, 19:] = False
    np.testing.assert_array_equal(scored, want)


def test_concept_term_falls_and_the_unknown_head_takes_the_residual(refit):
    _, graphdef, params, new, states, stats = refit
    loss_cfg = _loss_cfg()
    assert _concept_loss(graphdef, new, states, loss_cfg) < 0.8 * _concept_loss(
        graphdef, params, states, loss_cfg)
    # the new keys with the old unknown head leave more residual than with the refit one
    keys_only = jax.tree.map(lambda x: x, new)
    keys_only["rewrite"]["unknown_head"] = params["rewrite"]["unknown_head"]
    assert _energy(graphdef, new, states) < _energy(graphdef, keys_only, states)
    assert stats["key_refit_last_concept_loss"] < stats["key_refit_first_concept_loss"]


def test_refit_balance_chooses_the_objective_the_keys_fit():
    """With one concept labelled on every chunk beside each chunk's own, the plain mean over
    positive pairs and the per-concept mean are different objectives: the keys refit under
    each reach a lower value of their own than the keys refit under the other."""
    cfg = tiny_config()
    graphdef, state = nnx.split(make_model(cfg), nnx.Param)
    params = state.to_pure_dict()
    batches = _batches(cfg, 4)
    for b in batches:                      # concept 0 on every token, beside the chunk's own
        ids = np.asarray(b["concept_ids"]).copy()
        ids[..., 1] = np.where(ids[..., 0] == 0, -1, 0)
        b["concept_ids"] = jnp.asarray(ids)
    states = collect_states(graphdef, params, batches, "autoregressive")
    fits = {b: refit_known_keys(graphdef, params, states, _loss_cfg(), steps=60, lr=3e-2,
                                seed=0, balance=b)[0] for b in ("none", "concept")}
    own = {b: _concept_loss(graphdef, fits[b], states, _loss_cfg(), b) for b in fits}
    other = {b: _concept_loss(graphdef, fits["concept" if b == "none" else "none"], states,
                              _loss_cfg(), b) for b in fits}
    assert own["none"] < other["none"] and own["concept"] < other["concept"], (own, other)
    # "loss" takes loss.concept_balance: the same fit as naming it
    loss_cfg = _loss_cfg()
    loss_cfg.concept_balance = "concept"
    same = refit_known_keys(graphdef, params, states, loss_cfg, steps=60, lr=3e-2, seed=0,
                            balance="loss")[0]
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(fits["concept"])):
        np.testing.assert_array_equal(a, b)


def test_run_key_refit_passes_the_train_fields(monkeypatch):
    """The trainer's refit stage hands train.key_refit_* to the fit (steps, rate, balance)
    and collects states of key_refit_batches batches."""
    seen = {}

    def fake_refit(graphdef, params, states, loss_cfg, **kw):
        seen.update(kw, n_states=len(states))
        return params, {}

    monkeypatch.setattr(key_refit, "global_batch", lambda batch, sharding: batch)
    monkeypatch.setattr(key_refit, "collect_states", lambda g, p, batches, o: list(batches))
    monkeypatch.setattr(key_refit, "refit_known_keys", fake_refit)
    c = base_config()
    c.train.key_refit_steps, c.train.key_refit_batches = 7, 3
    c.train.key_refit_lr, c.train.key_refit_balance = 0.05, "concept"

    class State:
        params = {}

        def replace(self, params):
            return self

    key_refit.run_key_refit(State(), None, c, iter(range(10)), None)
    assert seen == {"steps": 7, "lr": 0.05, "seed": int(c.seed), "balance": "concept",
                    "n_states": 3}


@pytest.mark.parametrize("field,value", [("key_refit_steps", -1), ("key_refit_batches", 0),
                                         ("key_refit_lr", 0.0), ("key_refit_balance", "chunk")])
def test_bad_refit_settings_are_refused(field, value):
    c = base_config()
    c.train[field] = value
    with pytest.raises(ConfigError, match=f"train.{field}"):
        validate_config(c)


@pytest.mark.parametrize("field,value,needle", [
    ("objective", "diffusion", "model.objective=autoregressive"),
    ("epsilon_correction", False, "epsilon_correction=True")])
def test_refit_outside_its_scope_is_refused(field, value, needle):
    """A diffusion model's residual lives on its noisy stream; without epsilon the LM reads
    k + u, which the refit would change."""
    c = base_config()
    c.model.objective, c.model.attention = "autoregressive", "causal"
    c.train.key_refit_steps = 10
    validate_config(c)
    if field == "objective":
        c.model.objective, c.model.attention = "diffusion", "block_causal"
    else:
        c.model.concepts.epsilon_correction = value
    with pytest.raises(ConfigError, match=f"train.key_refit_steps.*{needle}"):
        validate_config(c)


def _saved_params(workdir):
    model, _ = load_model(workdir)
    return {tuple(k.key for k in path): np.asarray(v) for path, v in
            jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param).to_pure_dict())}


@pytest.mark.slow
def test_trainer_refits_after_the_last_step(tmp_path):
    """The last checkpoint holds the refit keys and unknown head; everything else is the
    same run's without the refit, bitwise."""
    corpus = tiny_corpus(tmp_path / "corpus")
    ar = {"model.objective": "autoregressive", "model.attention": "causal",
          "train.num_steps": 3}
    proc = run(train_args(corpus, tmp_path / "refit", **ar, **{"train.key_refit_steps": 4,
                                                                "train.key_refit_batches": 2}))
    run(train_args(corpus, tmp_path / "plain", **ar))
    assert "key refit: 4 steps on 2 batches' states" in proc.stdout + proc.stderr
    records = [json.loads(line) for line in
               (tmp_path / "refit" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "key_refit_seconds" in r] == [3]
    refit, plain = _saved_params(tmp_path / "refit"), _saved_params(tmp_path / "plain")
    assert refit.keys() == plain.keys()
    for name in refit:
        if name == ("rewrite", "known_head", "predictor") or name[:2] == ("rewrite",
                                                                           "unknown_head"):
            assert not np.array_equal(refit[name], plain[name]), name
        else:
            np.testing.assert_array_equal(refit[name], plain[name], err_msg=str(name))
