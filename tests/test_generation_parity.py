"""Generation and steering against the Steerling reference on a tiny random checkpoint.

Greedy (top_p small enough to keep one token) diffusion generation on Steerling's
block grid must commit the same tokens as SteerlingGenerator.generate_full, plain,
with classifier-free guidance, and with either steering preset; a forward pass
with an intervention or an injection must give Steerling's logits (1e-4).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("steerling.inference.causal_diffusion")

import jax.numpy as jnp  # noqa: E402
from steerling.configs.generation import GenerationConfig  # noqa: E402
from steerling.configs.steering import SteeringConfig  # noqa: E402
from steerling.inference.causal_diffusion import SteerlingGenerator  # noqa: E402

from cbm_lm.inference.generate import generate  # noqa: E402
from cbm_lm.inference.logit_processing import SamplingConfig  # noqa: E402
from cbm_lm.inference.steering import amplify, injection, intervene, suppress  # noqa: E402
from cbm_lm.interop import import_steerling  # noqa: E402
from steerling_fixtures import VOCAB, make_steerling, save_steerling  # noqa: E402

MASK, PAD, EOS = VOCAB - 1, VOCAB - 4, VOCAB - 3
PROMPTS = [[5, 17, 250, 3, 99], [7, 7, 120, 64, 1, 2, 8, 33, 12]]
N = 16


class _Tokenizer:
    mask_token_id, pad_token_id, eos_token_id, eot_id = MASK, PAD, EOS, None

    def decode(self, ids, **_):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref, cfg, ccfg = make_steerling({}, {}, seed=5)
    path = tmp_path_factory.mktemp("steerling_gen")
    save_steerling(ref, cfg, ccfg, str(path))
    ours, _ = import_steerling(str(path))
    gen = SteerlingGenerator(ref, _Tokenizer(), cfg, is_interpretable=True, device="cpu")
    return ref, gen, ours


def _theirs(gen, prompt, steering=None, cfg_scale=0.0):
    config = GenerationConfig(max_new_tokens=N, top_p=1e-6, seed=0, cfg_scale=cfg_scale)
    out = gen.generate_full(torch.tensor([prompt]), config, steering=steering)
    return out.tokens.numpy()


def _ours(model, steering=None, cfg_scale=0.0):
    cfg = SamplingConfig(max_new_tokens=N, top_p=1e-6, grid="steerling", cfg_scale=cfg_scale,
                         banned_ids=(MASK, PAD, EOS))
    return generate(model, PROMPTS, cfg, steering, pad_id=PAD, bucket=8)


@pytest.mark.parity
@pytest.mark.parametrize("case", ["plain", "cfg", "amplify", "suppress"])
def test_greedy_generation_matches_steerling(pair, case):
    _, gen, ours = pair
    steer_ours = steer_theirs = None
    if case == "amplify":
        steer_ours = amplify(ours, [3, 11], target=6.0, layer=1, cutoff_tokens=6)
        steer_theirs = SteeringConfig.injection([3, 11], mai_lm_target=6.0, inject_layer=1,
                                                cutoff_tokens=6)
    elif case == "suppress":
        steer_ours = suppress(ours, 4, group=[9], target=-3.0, layer=1, relu_strength=5.0)
        steer_theirs = SteeringConfig.injection_relu(4, [9], mai_lm_target=-3.0, inject_layer=1,
                                                     relu_strength=5.0)
    cfg_scale = 0.7 if case == "cfg" else 0.0
    tr = _ours(ours, steer_ours, cfg_scale)
    plain = _ours(ours) if case != "plain" else tr
    for b, prompt in enumerate(PROMPTS):
        want = _theirs(gen, prompt, steer_theirs, cfg_scale)
        got = tr.tokens[b, : len(prompt) + N]
        np.testing.assert_array_equal(got, want, err_msg=f"{case}: prompt {b}")
        if case != "plain":      # the setting really changed the generation
            assert (plain.tokens[b, : len(prompt) + N] != got).any(), case


@pytest.mark.parity
def test_intervention_logits_match_steerling(pair):
    ref, _, ours = pair
    ids = np.random.default_rng(0).integers(0, VOCAB - 4, size=(2, 24)).astype(np.int32)
    ids[:, 16:] = MASK
    where = np.zeros((2, 24), bool)
    where[:, 10:20] = True
    known, unknown = {3: 0.8, 40: 2.0}, {7: 1.5}
    with torch.no_grad():
        want, _ = ref.intervene(torch.from_numpy(ids).long(), known=known, unknown=unknown,
                                positions=torch.from_numpy(where))
        base, _ = ref(torch.from_numpy(ids).long())
    got = intervene(ours, ids, known=known, unknown=unknown, positions=where).logits
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-4, rtol=0)
    assert np.abs(want.numpy() - base.numpy()).max() > 1e-2      # the override matters
    # Steerling keeps epsilon when only unknown concepts are overridden: no change at all.
    with torch.no_grad():
        only_unknown, _ = ref.intervene(torch.from_numpy(ids).long(), unknown=unknown)
    np.testing.assert_allclose(only_unknown.numpy(), base.numpy(), atol=1e-5)
    same = intervene(ours, ids, unknown=unknown, drop_epsilon=False).logits
    np.testing.assert_allclose(np.asarray(same), base.numpy(), atol=1e-4)


@pytest.mark.parity
@pytest.mark.parametrize("calibrate", [True, False])
def test_injection_logits_match_steerling(pair, calibrate):
    ref, gen, ours = pair
    ids = np.random.default_rng(1).integers(0, VOCAB - 4, size=(2, 24)).astype(np.int32)
    ids[:, 13:] = MASK
    inj = injection(ours, [2, 8, 30], 5.0, layer=1, calibrate=calibrate)
    cfg = SteeringConfig(concept_ids=[2, 8, 30], mai_lm_target=5.0, inject_layer=1,
                         normalize_mai_lm_target=calibrate)
    with torch.no_grad():
        direction, alpha, layer = gen._prepare_steering(cfg)
    assert layer == inj.layer and abs(alpha - inj.alpha) < 1e-5 * max(1.0, abs(alpha))
    np.testing.assert_allclose(inj.direction, direction.numpy(), atol=1e-6)
    x = torch.from_numpy(ids).long()
    with torch.no_grad():
        want, _ = ref(x, position_injection=gen._position_injection(x, direction),
                      steering_inject_layer=layer, steering_inject_alpha=alpha)
    steered = ids == MASK
    got = ours(jnp.asarray(ids), injection=jnp.asarray(inj.field(steered, np.full(2, inj.alpha))),
               inject_layer=inj.layer).logits
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parity
def test_concept_top_tokens_and_embeddings_match_steerling(pair):
    from cbm_lm.inference.concept_search import concept_top_tokens, pooled_embedding

    ref, gen, ours = pair
    want = gen.concept_top_tokens(12, k=7)
    ids, scores = concept_top_tokens(ours, 12, k=7)
    assert [str(i) for i in ids] == [t for t, _ in want]
    np.testing.assert_allclose(scores, [s for _, s in want], atol=1e-5)
    text = "5 17 250 3 99 300 300"
    gen.tokenizer.encode = lambda t, add_special_tokens=False: [int(w) for w in t.split()]
    ids = np.asarray([[int(w) for w in text.split()]])
    for kind in ("hidden", "composed", "known", "unknown"):
        for pooling in ("mean", "last", "none"):
            with torch.no_grad():
                want = gen.get_embeddings(text, pooling=pooling, embedding_type=kind).numpy()
            got = pooled_embedding(ours, ids, kind, pooling)[0]
            np.testing.assert_allclose(got, want, atol=1e-4, err_msg=f"{kind}/{pooling}")
