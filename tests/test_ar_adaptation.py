"""AR-to-diffusion adaptation: the phase schedule, the annealed attention mask, the shift.

Truths used: hand-built masks (numpy loops over (q, kv) pairs), a numpy loop for the
shift, and the library's own autoregressive / plain-diffusion losses on the same params
(the AR phase of a diffusion run must be exactly an AR model's training loss).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cbm_lm import objectives as obj
from cbm_lm.config import ConfigError
from cbm_lm.config_validation import validate_config
from cbm_lm.default_config import base_config
from cbm_lm.model.attention import attention_mask
from cbm_lm.model.attention_kernels import two_stream_attention
from cbm_lm.model.lm import shift_to_predictions
from cbm_lm.train.losses import compute_losses
from model_fixtures import make_model, random_tokens, tiny_config
from test_attention_kernels import _numpy_attention, _packed

B = 4   # diffusion block size of these tests


def test_phase_is_ar_before_the_boundary_and_diffusion_after():
    # 1200 steps, 25% warmup: steps 0..299 are AR, 300.. diffusion (also after a resume).
    phase = [bool(obj.in_ar_phase(s, 0.25, 1200)) for s in (0, 1, 299, 300, 301, 900, 1199)]
    assert phase == [True, True, True, False, False, False, False]
    assert not bool(obj.in_ar_phase(0, 0.0, 1200))


def test_lookahead_anneals_from_causal_to_block_causal():
    # AR to step 300, anneal over 240 steps: w = floor(4 (s - 300) / 240), capped at 3.
    w = {s: int(obj.mask_lookahead(s, 0.25, 0.2, 1200, B)) for s in
         (0, 299, 300, 359, 360, 420, 480, 539, 540, 1199)}
    assert w == {0: 0, 299: 0, 300: 0, 359: 0, 360: 1, 420: 2, 480: 3, 539: 3, 540: 3, 1199: 3}


def _hand_mask(pos, seg, visible):
    t = len(pos)
    return np.array([[seg[q] == seg[k] and visible(pos[q], pos[k]) for k in range(t)]
                     for q in range(t)])


def test_annealed_mask_is_causal_at_start_and_block_causal_at_end():
    pos = np.array([0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4])
    seg = np.array([1] * 7 + [2] * 5)
    causal = _hand_mask(pos, seg, lambda q, k: k <= q)
    block = _hand_mask(pos, seg, lambda q, k: k // B <= q // B)
    between = _hand_mask(pos, seg, lambda q, k: k // B <= q // B and k <= q + 1)

    def mask(w):
        return np.asarray(attention_mask(jnp.asarray(pos)[None], jnp.asarray(seg)[None],
                                         "block_causal", B, lookahead=jnp.asarray(w)))[0, 0]

    np.testing.assert_array_equal(mask(0), causal)
    np.testing.assert_array_equal(mask(B - 1), block)
    np.testing.assert_array_equal(mask(1), between)
    with pytest.raises(ValueError, match="block_causal only"):
        attention_mask(jnp.asarray(pos)[None], jnp.asarray(seg)[None], "causal", B,
                       lookahead=jnp.asarray(0))


@pytest.mark.parametrize("w", [0, 1, B - 1])
def test_two_stream_kernel_follows_the_annealed_mask(w):
    """Noisy q: clean keys of earlier blocks + noisy keys of its block at most w ahead;
    clean q: clean keys block-causally, at most w ahead (hand-built mask)."""
    b, t, h, g, hd = 2, 19, 4, 2, 8
    ks = jax.random.split(jax.random.PRNGKey(w), 3)
    q = jax.random.normal(ks[0], (b, 2 * t, h, hd))
    k = jax.random.normal(ks[1], (b, 2 * t, g, hd))
    v = jax.random.normal(ks[2], (b, 2 * t, g, hd))
    pos, seg = _packed(b, t, 7)
    pos2, seg2 = jnp.concatenate([pos, pos], 1), jnp.concatenate([seg, seg], 1)
    p2, s2 = np.asarray(pos2), np.asarray(seg2)
    hand = np.zeros((b, 1, 2 * t, 2 * t), bool)
    for r in range(b):
        for qi in range(2 * t):
            for ki in range(2 * t):
                qp, kp = p2[r, qi], p2[r, ki]
                same = s2[r, qi] == s2[r, ki]
                if qi < t and ki < t:        # noisy -> noisy: own block, <= w ahead
                    ok = kp // B == qp // B and kp <= qp + w
                elif qi < t:                 # noisy -> clean: strictly earlier blocks
                    ok = kp // B < qp // B
                elif ki >= t:                # clean -> clean
                    ok = kp // B <= qp // B and kp <= qp + w
                else:
                    ok = False
                hand[r, 0, qi, ki] = same and ok
    stream = jnp.concatenate([jnp.zeros_like(seg), jnp.ones_like(seg)], 1)
    dense = attention_mask(pos2, seg2, "block_causal", B, stream, lookahead=jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(dense), hand)
    got = two_stream_attention(q, k, v, pos2, seg2, B, lookahead=jnp.asarray(w))
    np.testing.assert_allclose(got, _numpy_attention(q, k, v, hand), atol=2e-5)


def test_shift_reads_the_previous_position_of_the_same_document():
    pos = np.array([[0, 1, 2, 3, 4, 5, 0, 1, 2, 0]])
    seg = np.array([[1, 1, 1, 1, 1, 1, 2, 2, 2, 0]])
    h = np.arange(10, dtype=np.float32)[None, :, None] + 100.0      # row i holds 100 + i
    clean = h + 1000.0
    got1 = np.asarray(shift_to_predictions(jnp.asarray(h), jnp.asarray(pos), jnp.asarray(seg)))
    got2 = np.asarray(shift_to_predictions(jnp.asarray(h), jnp.asarray(pos), jnp.asarray(seg),
                                           jnp.asarray(clean), B))
    for i in range(10):
        first = pos[0, i] == 0
        assert got1[0, i, 0] == (h[0, i, 0] if first else h[0, i - 1, 0])
        # crossing into a new block (position 4 of document 1) reads the clean state
        src = h if first else (clean if pos[0, i] % B == 0 else h)
        assert got2[0, i, 0] == src[0, i if first else i - 1, 0]


def test_shifted_model_predicts_each_token_from_the_previous_position():
    """Row i of a shifted model's output is the unshifted model's row i-1 (same params)."""
    plain_cfg = tiny_config(attention="block_causal")
    plain = make_model(plain_cfg)
    shifted = nnx.merge(nnx.graphdef(make_model(plain_cfg.replace(diffusion_shift=True))),
                        nnx.state(plain))
    tokens = random_tokens(plain_cfg, 2, 12)
    pos = jnp.asarray([list(range(7)) + list(range(5))] * 2, jnp.int32)
    seg = jnp.asarray([[1] * 7 + [2] * 5] * 2, jnp.int32)
    a = nnx.jit(lambda m: m(tokens, positions=pos, segment_ids=seg))(plain)
    s = nnx.jit(lambda m: m(tokens, positions=pos, segment_ids=seg))(shifted)
    src = [0, 0, 1, 2, 3, 4, 5, 7, 7, 8, 9, 10]      # document starts keep their own row
    for field in ("logits", "composed", "known_features", "epsilon"):
        np.testing.assert_allclose(getattr(s, field), getattr(a, field)[:, src], atol=1e-5)


_PARAMS = {}
_COMPILED = {}


def _setup(ar_fraction, anneal=0.0, objective="diffusion"):
    attention = "causal" if objective == "autoregressive" else "block_causal"
    model_cfg = tiny_config(attention=attention, objective=objective,
                            diffusion_shift=objective == "diffusion")
    loss_cfg = base_config().loss
    loss_cfg.update(dict(ar_warmup_fraction=ar_fraction, mask_anneal_fraction=anneal,
                         schedule_steps=100, concept_negatives=5))
    return model_cfg, loss_cfg


def _batch(model_cfg, t=16):
    return {"tokens": random_tokens(model_cfg, 2, t, seed=3),
            "segment_ids": jnp.ones((2, t), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t)),
            "concept_ids": jnp.full((2, t, 2), -1, jnp.int32).at[:, :, 0].set(3),
            "chunk_segment_ids": jnp.ones((2, t), jnp.int32)}


def _loss(step, ar_fraction, anneal=0.0, objective="diffusion", train=True):
    """compute_losses of one shared set of params (a diffusion model's) at ``step``; the
    step is traced, so each config compiles once for every step asked."""
    key = (ar_fraction, anneal, objective, train)
    if key not in _COMPILED:
        model_cfg, loss_cfg = _setup(ar_fraction, anneal, objective)
        graphdef = nnx.graphdef(make_model(model_cfg))

        def f(state, s):   # with the views the train step asks for (provenance)
            total, m, views = compute_losses(nnx.merge(graphdef, state), _batch(model_cfg),
                                             jax.random.PRNGKey(5), s, loss_cfg=loss_cfg,
                                             model_cfg=model_cfg, train=train,
                                             return_views=True)
            if objective == "diffusion":      # a diffusion model's views in both phases
                assert views.nll is None and views.hidden.shape == (2, 16, model_cfg.d_model)
            return total, m
        _COMPILED[key] = jax.jit(f)
    if "params" not in _PARAMS:
        _PARAMS["params"] = nnx.state(make_model(_setup(0.0)[0]))
    total, m = _COMPILED[key](_PARAMS["params"], jnp.asarray(step, jnp.int32))
    return float(total), {k: float(v) for k, v in m.items()}


@pytest.mark.parametrize("step", [0, 29])
def test_ar_phase_is_exactly_the_autoregressive_loss(step):
    total, m = _loss(step, 0.3)
    ref_total, ref = _loss(step, 0.0, objective="autoregressive")   # same params, an AR model
    assert m["ar_phase"] == 1.0
    np.testing.assert_allclose(m["lm_loss"], ref["lm_loss"], rtol=1e-5)
    np.testing.assert_allclose(total, ref_total, rtol=1e-5)
    assert m["masked_ce"] == 0.0      # the diffusion-only metrics are zero-filled


@pytest.mark.parametrize("step", [30, 99])
def test_after_the_boundary_is_plain_diffusion(step):
    """Past the warmup (as after a resume there) the loss is the diffusion model's own."""
    total, m = _loss(step, 0.3)
    ref_total, ref = _loss(step, 0.0)
    assert m["ar_phase"] == 0.0
    np.testing.assert_allclose(m["masked_ce"], ref["masked_ce"], rtol=1e-5)
    np.testing.assert_allclose(total, ref_total, rtol=1e-5)


def test_eval_always_scores_diffusion_with_the_final_mask():
    _, m = _loss(0, 0.3, anneal=0.3, train=False)
    _, ref = _loss(0, 0.0, train=False)
    assert "ar_phase" not in m
    np.testing.assert_allclose(m["masked_ce"], ref["masked_ce"], rtol=1e-6)


def test_anneal_changes_the_loss_only_before_it_ends():
    # AR to step 30, anneal over steps 30..59: w = 0 (a causal mask) at step 31.
    during = [_loss(31, 0.3, anneal=anneal)[1]["masked_ce"] for anneal in (0.3, 0.0)]
    after = [_loss(70, 0.3, anneal=anneal)[1]["masked_ce"] for anneal in (0.3, 0.0)]
    assert abs(during[0] - during[1]) > 1e-4
    np.testing.assert_allclose(after[0], after[1], rtol=1e-6)


@pytest.mark.parametrize("overrides,field", [
    ({"loss.ar_warmup_fraction": 1.0}, "loss.ar_warmup_fraction"),
    ({"loss.ar_warmup_fraction": -0.1}, "loss.ar_warmup_fraction"),
    ({"loss.mask_anneal_fraction": 1.5}, "loss.mask_anneal_fraction"),
    ({"loss.ar_warmup_fraction": 0.6, "loss.mask_anneal_fraction": 0.5},
     "loss.mask_anneal_fraction"),
    ({"loss.ar_warmup_fraction": 0.3, "model.objective": "autoregressive",
      "model.attention": "causal"}, "loss.ar_warmup_fraction"),
    ({"model.diffusion_shift": True, "model.objective": "autoregressive",
      "model.attention": "causal"}, "model.diffusion_shift"),
])
def test_validation_names_the_bad_field(overrides, field):
    c = base_config()
    for path, value in overrides.items():
        section, name = path.split(".")
        c[section][name] = value
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_config(c)
