"""Integrated gradients over replayed generation steps: completeness, locality,
exact zeros where the model cannot look, sharded == single device, and the
per-chunk aggregation against a hand computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attribution_fixtures import hand_trace, steerings
from cbm_lm.attribution.input_attribution import InputAttribution, input_attribution
from cbm_lm.attribution.integrated_gradients import (LogitQuery, active_sets, integrated_gradients,
                                                    query_logits, read_hidden)
from cbm_lm.attribution.replay import replay_for
from cbm_lm.config import MeshConfig
from cbm_lm.default_config import DEFAULT_RULES
from cbm_lm.parallel.mesh import make_mesh
from cbm_lm.parallel.sharding import state_shardings
from model_fixtures import make_model, tiny_config

# Each case compiles its own IG program; the identity matrix over every case is in
# test_concept_attribution.py.
CASES = [("diffusion", "none"),
         pytest.param("diffusion", "intervene", marks=pytest.mark.slow),
         pytest.param("autoregressive", "inject", marks=pytest.mark.slow)]


def _model(objective):
    cfg = tiny_config(objective=objective,
                      attention="causal" if objective == "autoregressive" else "block_causal")
    return cfg, make_model(cfg)


def _replayed_logit(model, trace, b, p, s):
    kw = trace.model_inputs([b], [s])
    kw = {k: tuple(jnp.asarray(a) for a in v) if isinstance(v, tuple) else v for k, v in kw.items()}
    return float(model(**kw).logits[0, trace.logit_pos[b, p], trace.tokens[b, p]])


@pytest.mark.parametrize("objective,steer", CASES)
def test_completeness_on_replayed_steps(objective, steer):
    cfg, model = _model(objective)
    trace = hand_trace(cfg, objective, steerings(cfg)[steer])
    coarse = input_attribution(model, trace, n_steps=8)
    fine = input_attribution(model, trace, n_steps=256)
    # f(x) is the logit of the pass that committed the token, recomputed independently.
    for q in range(0, fine.replay.num, 3):
        b, p, s = fine.replay.batch[q], fine.replay.position[q], fine.replay.step[q]
        assert abs(fine.f_input[q] - _replayed_logit(model, trace, b, p, s)) < 1e-4
    delta = np.abs(fine.f_input - fine.f_baseline)
    assert delta.max() > 0.1                                   # a non-trivial path
    gap_fine, gap_coarse = np.abs(fine.completeness_gap()), np.abs(coarse.completeness_gap())
    assert np.all(gap_fine <= 1e-2 * (1 + delta)), gap_fine.max()
    assert gap_fine.mean() < gap_coarse.mean() / 8             # the Riemann sum converges


def test_attribution_concentrates_on_the_only_visible_context_token():
    """The read position shares an attention segment with one context token only, so
    the logit is a function of that token alone (its own slot is the MASK baseline)."""
    cfg, model = _model("diffusion")
    length, j, r = 10, 2, 7
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size - 2, (1, length)).astype(np.int32)
    tokens[0, r] = cfg.resolved_mask_token_id
    seg = np.full((1, length), 2, np.int32)
    seg[0, [j, r]] = 1
    q = LogitQuery(jnp.asarray(tokens), jnp.asarray([r]), jnp.asarray([5]),
                   segment_ids=jnp.asarray(seg))
    res = integrated_gradients(model, q, n_steps=64, batch_size=1)
    a = np.asarray(res.attributions[0])
    others = np.delete(np.arange(length), j)
    assert np.all(a[others] == 0.0)
    assert abs(a[j]) > 1e-3
    np.testing.assert_allclose(a[j], res.f_input[0] - res.f_baseline[0], rtol=0.02)


def test_positions_the_model_cannot_see_get_exactly_zero():
    cfg, model = _model("diffusion")
    trace = hand_trace(cfg, "diffusion")
    attr = input_attribution(model, trace, n_steps=2)
    for q in range(attr.replay.num):
        snap = attr.replay.take(np.array([q])).tokens[0]
        assert np.all(attr.attributions[q][snap == trace.mask_id] == 0.0)   # MASK == baseline
        assert np.all(attr.attributions[q][snap == trace.pad_id] == 0.0)    # other segment
        assert np.abs(attr.attributions[q]).sum() > 0


def test_batched_attribution_equals_one_token_at_a_time():
    cfg, model = _model("diffusion")
    trace = hand_trace(cfg, "diffusion", steerings(cfg)["inject"])
    full = input_attribution(model, trace, n_steps=2)
    for q in (0, 7):
        alone = input_attribution(model, full.replay.select(np.arange(full.replay.num) == q),
                                  n_steps=2)
        assert alone.replay.num == 1 and len(alone.replay.input_batch) == 1
        np.testing.assert_allclose(alone.attributions[0], full.attributions[q], atol=1e-6)


@pytest.mark.slow
def test_autoregressive_future_positions_get_exactly_zero():
    cfg, model = _model("autoregressive")
    trace = hand_trace(cfg, "autoregressive")
    attr = input_attribution(model, trace, n_steps=2)
    assert len(attr.replay.input_batch) == trace.batch_size    # one shared pass per sequence
    for q in range(attr.replay.num):
        assert np.all(attr.attributions[q][attr.replay.position[q]:] == 0.0)


@pytest.mark.slow
def test_sharded_attribution_equals_single_device():
    # Dimensions divisible by the mesh; streaming top-k over the tensor-sharded concepts.
    cfg = tiny_config(vocab_size=128, n_heads=8, n_kv_heads=4,
                      concepts=dict(n_known=64, n_unknown=96, dense_threshold=32))
    model = make_model(cfg)
    trace = hand_trace(cfg, "diffusion", steerings(cfg)["inject"])
    single = input_attribution(model, trace, n_steps=4, batch_size=8)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, state_shardings(state, mesh, DEFAULT_RULES))
    sharded_model = nnx.merge(graphdef, state)
    assert len(sharded_model.backbone.embedding[...].sharding.device_set) == 8
    with nnx.logical_axis_rules(DEFAULT_RULES):
        sharded = input_attribution(sharded_model, trace, n_steps=4, batch_size=8, mesh=mesh)
    np.testing.assert_allclose(sharded.attributions, single.attributions, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(sharded.f_input, single.f_input, atol=2e-5)


def test_chunk_scores_follow_steerlings_normalization():
    """Each output token gets equal mass over the scope, then the mean; by hand."""
    cfg = tiny_config()
    trace = hand_trace(cfg, "diffusion")
    replay = replay_for(make_model(cfg), trace)
    rng = np.random.default_rng(1)
    a = rng.normal(size=(replay.num, trace.length)).astype(np.float32)
    attr = InputAttribution(replay, a, np.zeros(replay.num), np.zeros(replay.num))
    b, start, end = 1, 5, 8
    got = attr.chunk_scores(b, start, end, scope="prompt")
    rows = [q for q in range(replay.num)
            if replay.batch[q] == b and start <= replay.position[q] < end]
    assert len(rows) == 3
    want = np.zeros(trace.length)
    for q in rows:
        v = a[q, :5]                                     # prompt of sequence 1: 5 tokens
        want[:5] += v / np.abs(v).sum() / len(rows)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    top = attr.top_tokens(b, start, end, k=2, scope="prompt")
    assert [t["position"] for t in top] == list(np.argsort(-want[:5])[:2])
    assert top[0]["token_id"] == trace.tokens[b, top[0]["position"]]
    with pytest.raises(ValueError, match="scope"):
        attr.chunk_scores(b, start, end, scope="context")


@pytest.mark.parametrize("concepts", [dict(), dict(n_unknown=0), dict(unknown_rank=0)],
                         ids=["factorized_unknown", "no_unknown", "dense_unknown"])
def test_integrated_function_equals_the_model_logit(concepts):
    """query_logits (no stop-gradients, active sets held) is the model's logit in value,
    with and without a weight intervention, for every rewrite form."""
    cfg = tiny_config(concepts=concepts)
    model = make_model(cfg)
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, 8)), jnp.int32)
    read, tgt = jnp.asarray([1, 4, 7]), jnp.asarray([3, 50, 9])
    ids = jnp.broadcast_to(jnp.asarray([3, 11], jnp.int32), (3, 8, 2))
    vals = jnp.broadcast_to(jnp.asarray([0.9, 0.0], jnp.float32), (3, 8, 2))
    for iv in (None, (ids, vals)):
        ref = model(tokens, intervene_known=iv).logits[jnp.arange(3), read, tgt]
        q = LogitQuery(tokens, read, tgt, known_ids=None if iv is None else ids,
                       known_vals=None if iv is None else vals,
                       drop_epsilon=jnp.full((3,), iv is not None))
        e = model.backbone.embed(tokens)
        active = active_sets(model, read_hidden(model, e, q))
        got = query_logits(model, e, q, active=active)
        np.testing.assert_allclose(got, ref, atol=1e-5)
        if iv is not None:
            assert float(jnp.abs(ref - model(tokens).logits[jnp.arange(3), read, tgt]).max()) > 1e-3


@pytest.mark.slow
def test_straight_through_clip_is_integrated_with_its_true_gradient():
    """Training's straight-through cap has the values of the hard cap but gradient 1 past
    it; IG must use the true gradient (0 there) or completeness breaks under steering."""
    results = {}
    for mode in ("hard", "straight_through"):
        cfg = tiny_config(init_std=0.6, concepts=dict(clip_mode=mode, logit_clip=1.0))
        model = make_model(cfg)
        trace = hand_trace(cfg, "diffusion", steerings(cfg)["intervene"])
        # 512 steps: the Riemann sum's own error on this init_std=0.6 model is 0.69
        # at 128 steps and 0.025 at 512 (the gradient is exact either way)
        results[mode] = input_attribution(model, trace, n_steps=512)
    np.testing.assert_allclose(results["straight_through"].attributions,
                               results["hard"].attributions, atol=1e-5)
    gap = np.abs(results["straight_through"].completeness_gap())
    delta = np.abs(results["hard"].f_input - results["hard"].f_baseline)
    assert np.all(gap <= 0.05 * (1 + delta)), gap.max()
