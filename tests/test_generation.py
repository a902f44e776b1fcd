"""Generation: determinism, exact replay of every committing pass, batching, meshes.

Independent truths: a trace snapshot replayed through a plain forward pass must
give the logits the sampler committed with; the decomposition identity must hold
on the committing pass; a batch must equal its rows run alone; a sharded run
must equal a single-device run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cbm_lm.attribution.decomposition import decompose_logits
from cbm_lm.inference import steered_call
from cbm_lm.inference.diffusion_schedule import blocks, schedule
from cbm_lm.inference.generate import generate
from cbm_lm.inference.logit_processing import SamplingConfig, sample_tokens
from cbm_lm.inference.steer_spec import Steering
from cbm_lm.inference.steered_call import diffusion_steered
from cbm_lm.inference.steering import amplify, combine, make_intervention, relu_logit_mask
from model_fixtures import make_model, tiny_config

PAD = 95
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11, 12]]


def capture(model, out, b, p, tok):
    """The committed token's logits row and its decomposition, from the committing pass."""
    d = decompose_logits(model, out, b, p, tok)
    return {"logits": out.logits[b, p], "total": d.total(), "logit": d.logit}


@pytest.fixture(scope="module")
def models():
    return {"diffusion": make_model(tiny_config(), seed=0),
            # Dream's shift (model/lm.py): row i is still token i's prediction
            "diffusion_shift": make_model(tiny_config(diffusion_shift=True), seed=0),
            "autoregressive": make_model(tiny_config(attention="causal",
                                                     objective="autoregressive"), seed=1)}


def _sampling(**kw):
    base = dict(max_new_tokens=8, block_size=4, banned_ids=(96, PAD), top_p=0.9)
    return SamplingConfig(**{**base, **kw})


def _steering(model, kind):
    if kind == "none":
        return Steering()
    iv = make_intervention(model, known={3: 0.9, 7: 0.2}, unknown={5: 1.5})
    amp = amplify(model, [2, 4], target=4.0, layer=1, cutoff_tokens=5)
    return combine(Steering(intervention=iv), amp,
                   Steering(logit_mask=relu_logit_mask(model, {9: 3.0})))


def _replay(model, kw):
    """Logits of model(**kw); the Python scalars of kw (layer, flags) stay static."""
    arrays = {k: tuple(map(jnp.asarray, v)) if isinstance(v, tuple) else jnp.asarray(v)
              for k, v in kw.items() if isinstance(v, (tuple, np.ndarray))}
    static = {k: v for k, v in kw.items() if k not in arrays}
    return nnx.jit(lambda m, a: m(**a, **static).logits)(model, arrays)


@pytest.mark.parametrize("objective", ["diffusion", "diffusion_shift", "autoregressive"])
@pytest.mark.parametrize("kind", ["none", "steered"])
def test_replay_decomposition_and_determinism(models, objective, kind):
    model = models[objective]
    diffusion = objective.startswith("diffusion")
    cfg = _sampling(seed=3, cfg_scale=0.5 if kind == "steered" and diffusion else 0)
    st = _steering(model, kind)
    tr = generate(model, PROMPTS, cfg, st, pad_id=PAD, capture_fn=capture, bucket=8)
    gen = tr.generated_mask()
    assert (tr.gen_lens == 8).all() and gen.sum() == 24
    assert not np.isin(tr.tokens[gen], [96, PAD]).any()

    # The decomposition identity on every generated token, from the committing pass.
    np.testing.assert_allclose(tr.capture["total"][gen], tr.capture["logit"][gen], atol=1e-4)
    # Replaying each token's snapshot reproduces the committing pass's logits.
    rows, cols = np.nonzero(gen)
    got = _replay(model, tr.model_inputs(rows, tr.committed_step[rows, cols]))
    got = np.asarray(got)[np.arange(len(rows)), tr.logit_pos[rows, cols]]
    np.testing.assert_allclose(got, tr.capture["logits"][rows, cols], atol=1e-5, rtol=0)
    # A snapshot at the committing step still has the token masked (diffusion) or
    # not yet written (AR), and the prompt intact.
    snap = tr.snapshot(tr.committed_step[rows, cols], rows)
    if diffusion:
        assert (snap[np.arange(len(rows)), cols] == tr.mask_id).all()

    # Deterministic for a seed; another seed gives other tokens.
    again = generate(model, PROMPTS, cfg, st, pad_id=PAD, capture_fn=capture, bucket=8)
    np.testing.assert_array_equal(again.tokens, tr.tokens)
    np.testing.assert_array_equal(again.committed_step, tr.committed_step)
    other = generate(model, PROMPTS, cfg.replace(seed=4), st, pad_id=PAD, capture_fn=capture,
                     bucket=8)
    assert (other.tokens != tr.tokens).any()


@pytest.mark.parametrize("objective", ["diffusion", "autoregressive"])
def test_batched_equals_one_at_a_time(models, objective):
    model = models[objective]
    cfg = _sampling(seed=11, grid="training")
    st = _steering(model, "steered") if objective == "autoregressive" else Steering()
    # capture_fn only lets the batch reuse the replay test's compiled sampler
    batch = generate(model, PROMPTS, cfg, st, pad_id=PAD, capture_fn=capture, bucket=8)
    for b, p in enumerate(PROMPTS):
        one = generate(model, [p], cfg, st, pad_id=PAD, seeds=[b], bucket=8)
        n = len(p) + 8
        np.testing.assert_array_equal(one.tokens[0, :n], batch.tokens[b, :n])
        np.testing.assert_array_equal(one.committed_step[0, :n], batch.committed_step[b, :n])


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_generation_under_a_mesh_equals_single_device(models):
    from cbm_lm.config import MeshConfig
    from cbm_lm.default_config import DEFAULT_RULES
    from cbm_lm.parallel.mesh import make_mesh
    from cbm_lm.parallel.sharding import state_shardings

    # dimensions divisible by the mesh: vocab and heads over tensor, batch over data
    model = make_model(tiny_config(vocab_size=128, n_heads=8, n_kv_heads=4), seed=2)
    prompts = PROMPTS + [[13]]
    cfg = _sampling(seed=5)
    ref = generate(model, prompts, cfg, pad_id=PAD, bucket=8)
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
    graphdef, state = nnx.split(model)
    sharded = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh, DEFAULT_RULES)))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
        got = generate(sharded, prompts, cfg, pad_id=PAD, bucket=8)
    assert len(sharded.backbone.embedding[...].addressable_shards) == 8
    np.testing.assert_array_equal(got.tokens, ref.tokens)


def test_block_grids_and_linear_schedule():
    assert blocks(5, 10, 4, "steerling") == [(5, 9), (9, 13), (13, 15)]
    assert blocks(5, 10, 4, "training") == [(5, 8), (8, 12), (12, 15)]
    assert blocks(4, 8, 4, "training") == [(4, 8), (8, 12)]
    sch = schedule([3], 8, 4, 2, "steerling")      # 2 blocks x 2 steps, 2 tokens per step
    assert sch["n_commit"].tolist() == [[2, 2, 2, 2]] and sch["start"].tolist() == [[3, 3, 7, 7]]
    sch = schedule([5], 3, 4, 4, "training")       # a partial block of 3: 3 steps of 1
    assert sch["n_commit"].tolist() == [[1, 1, 1]] and sch["last"].tolist() == [[False, False, True]]
    torch = pytest.importorskip("torch")
    from steerling.inference.causal_diffusion import _get_num_transfer_tokens
    for m, s in [(64, 64), (64, 10), (7, 3), (13, 5)]:
        want = _get_num_transfer_tokens(torch.ones(1, m, dtype=torch.bool), s)[0].tolist()
        got = schedule([1], m, m, s, "steerling")["n_commit"][0].tolist()
        assert got == want, (m, s)


def test_top_p_samples_only_inside_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    cfg = SamplingConfig(top_p=0.7, use_entropy_sampling=False, temperature=1.0)
    draws = np.concatenate([np.asarray(sample_tokens(jax.random.key(i), logits, cfg))
                            for i in range(200)])
    # preceding mass 0, .5 <= .7 keep tokens 0, 1; token 2's preceding mass .8 > .7
    assert set(draws.tolist()) == {0, 1}
    assert 0.5 < (draws == 0).mean() < 0.75          # renormalized 0.5/0.8 = 0.625
    greedy = SamplingConfig(top_p=1e-6)
    assert int(sample_tokens(jax.random.key(0), logits, greedy)[0]) == 0


@pytest.mark.parametrize("objective", ["diffusion", "autoregressive"])
def test_too_long_a_request_is_refused_before_compiling(models, objective):
    model = models[objective]
    limit = model.config.max_seq_len
    with pytest.raises(ValueError, match=rf"max_seq_len={limit}"):
        generate(model, [[1, 2, 3]], _sampling(max_new_tokens=limit), pad_id=PAD)


def test_guidance_is_refused_for_autoregressive_generation(models):
    with pytest.raises(ValueError, match="cfg_scale"):
        generate(models["autoregressive"], PROMPTS, _sampling(cfg_scale=1.0), pad_id=PAD)


def test_steered_positions_under_the_shift_by_hand():
    """Where a diffusion pass injects: the masked positions; under diffusion_shift also the
    position before each masked one in the same document (hand-written rows)."""
    m = 9
    tokens = np.array([[1, 2, m, m, 3, m, 0, 0],
                       [m, 4, 5, 6, m, m, m, m]])
    seg = np.array([[1, 1, 1, 1, 1, 1, 0, 0],
                    [1, 1, 1, 2, 2, 2, 2, 2]])
    plain = np.array([[0, 0, 1, 1, 0, 1, 0, 0],
                      [1, 0, 0, 0, 1, 1, 1, 1]], bool)
    shifted = np.array([[0, 1, 1, 1, 1, 1, 0, 0],     # 1 reads 2's token, 4 reads 5's
                        [1, 0, 0, 1, 1, 1, 1, 1]], bool)  # 2 -> 3 crosses documents: not
    np.testing.assert_array_equal(diffusion_steered(tokens, seg, m, False), plain)
    np.testing.assert_array_equal(diffusion_steered(tokens, seg, m, True), shifted)
    np.testing.assert_array_equal(
        np.asarray(diffusion_steered(jnp.asarray(tokens), jnp.asarray(seg), m, True)), shifted)


def test_shifted_diffusion_steers_every_masked_prediction(models):
    """Under diffusion_shift token i is read from position i-1, so a block's first masked
    token is predicted from the previous (committed) block's last position: an injection
    must change the prediction of every masked token, that one included."""
    model = models["diffusion_shift"]
    b = model.config.diffusion_block_size
    mask = model.config.resolved_mask_token_id
    x = np.arange(1, 3 * b + 1, dtype=np.int32)[None]
    x[:, b:] = mask                                     # blocks 2 and 3 masked
    seg = np.ones_like(x)
    st = amplify(model, [2, 4], target=4.0, layer=1)
    static, arrays = steered_call.prepare(st, 1, x.shape[1])
    steered = steered_call.diffusion_steered(jnp.asarray(x), jnp.asarray(seg), mask, True)
    alpha = steered_call.injection_alpha(static, arrays, jnp.zeros(1, jnp.int32))
    got = nnx.jit(lambda m, t, s, st_: steered_call.call(m, t, s, static, arrays, steered=st_,
                                                         alpha=alpha).logits)(
        model, jnp.asarray(x), jnp.asarray(seg), steered)
    base = nnx.jit(lambda m, t, s: m(t, segment_ids=s).logits)(model, jnp.asarray(x),
                                                              jnp.asarray(seg))
    change = np.abs(np.asarray(got) - np.asarray(base)).max(-1)[0]
    assert (change[b:] > 1e-3).all(), change


@pytest.mark.parametrize("objective", ["diffusion", "autoregressive"])
def test_never_samples_mask_or_pad_whatever_the_caller_bans(models, objective):
    """A drawn <|mask|> would leave its position masked (a hole in the span, or drawn
    again), and a drawn pad reads as the row's end; both samplers ban MASK and PAD
    themselves. The logit mask (subtracted from the logits) is set to make both the
    likeliest tokens by far."""
    model = models[objective]
    mask = model.config.resolved_mask_token_id
    lure = np.zeros(model.config.vocab_size, np.float32)
    lure[[mask, PAD]] = -1e4
    tr = generate(model, PROMPTS, _sampling(banned_ids=()), Steering(logit_mask=lure),
                  pad_id=PAD, bucket=8)
    gen = tr.generated_mask()
    assert (tr.gen_lens == 8).all() and gen.sum() == 24
    assert not np.isin(tr.tokens[gen], [mask, PAD]).any()
