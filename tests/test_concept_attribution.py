"""Concept attribution of generated tokens: the exact identity on every token (with
and without steering, both objectives), a verify() that catches a wrong
decomposition, the per-chunk normalization against Steerling's own
chunk_attribution, labels and the JSON rows."""

import jax.numpy as jnp
import numpy as np
import pytest

from attribution_fixtures import hand_trace, steerings
from cbm_lm.attribution.chunk_aggregation import ConceptLabels, chunk_concepts, concept_rows
from cbm_lm.attribution.concept_attribution import concept_attribution, from_capture
from cbm_lm.attribution.replay import replay_for
from cbm_lm.data.concepts import ConceptVocab
from model_fixtures import make_model, tiny_config

CASES = [("diffusion", "none"),
         pytest.param("diffusion", "intervene", marks=pytest.mark.slow),
         pytest.param("diffusion", "inject", marks=pytest.mark.slow),
         pytest.param("autoregressive", "none", marks=pytest.mark.slow),
         pytest.param("autoregressive", "intervene", marks=pytest.mark.slow),
         pytest.param("autoregressive", "inject", marks=pytest.mark.slow)]


def _model(objective):
    cfg = tiny_config(objective=objective,
                      attention="causal" if objective == "autoregressive" else "block_causal")
    return cfg, make_model(cfg)


@pytest.fixture(scope="module")
def diffusion_attr():
    cfg, model = _model("diffusion")
    trace = hand_trace(cfg, "diffusion")
    return cfg, model, trace, concept_attribution(model, trace)


@pytest.mark.parametrize("objective,steer", CASES)
def test_identity_on_every_generated_token(objective, steer):
    cfg, model = _model(objective)
    trace = hand_trace(cfg, objective, steerings(cfg)[steer])
    attr = concept_attribution(model, trace)
    assert len(attr.batch) == int(trace.gen_lens.sum())
    check = attr.verify(atol=1e-4)
    assert check.passed, str(check)
    assert np.abs(attr.known_contrib).sum() > 1e-2 and np.abs(attr.unknown_contrib).sum() > 1e-2
    # The logit verified against is the one of the replayed pass, computed by the model.
    for n in range(0, len(attr.batch), 4):
        b, p, s = attr.batch[n], attr.position[n], attr.step[n]
        kw = trace.model_inputs([b], [s])
        kw = {k: tuple(jnp.asarray(a) for a in v) if isinstance(v, tuple) else v
              for k, v in kw.items()}
        ref = model(**kw).logits[0, trace.logit_pos[b, p], trace.tokens[b, p]]
        assert abs(float(ref) - attr.logit[n]) < 1e-4
    if steer == "intervene":          # concept 3 is forced to 0.9 at every position
        w = np.where(attr.known_ids == 3, attr.known_weights, 0).sum(-1)
        np.testing.assert_allclose(w, 0.9, atol=1e-6)
        assert np.abs(attr.epsilon).max() < 1e-6       # dropped (zero up to rounding)


def test_verify_fails_when_the_decomposition_is_wrong(diffusion_attr):
    *_, attr = diffusion_attr
    assert attr.verify().passed
    bad_eps = attr._replace(epsilon=attr.epsilon.copy())
    bad_eps.epsilon[3] += 1e-3                      # a wrong epsilon is not absorbed
    check = bad_eps.verify(atol=1e-4)
    assert not check.passed and check.worst_token == (attr.batch[3], attr.position[3])
    assert "FAIL" in str(check)
    # Contributions read for another target token no longer add up to this logit.
    swapped = attr._replace(known_contrib=attr.known_contrib[::-1].copy())
    assert not swapped.verify().passed


def test_chunk_concepts_match_steerling(diffusion_attr):
    torch = pytest.importorskip("torch")
    from steerling.attribution.concept_attribution import (ConceptLabels as SLabels,
                                                           OutputToConceptAttribution,
                                                           chunk_attribution)
    cfg, _, trace, attr = diffusion_attr
    b, start, end = 1, 5, 11                # spans two never-committed slots (gen_len 4 of 6)
    length = trace.length
    a = attr.select(attr.batch == b)

    def dense(x, fill=0):
        out = np.full((1, length) + x.shape[1:], fill, x.dtype)
        out[0, a.position] = x
        return torch.from_numpy(out)

    committed = np.zeros((1, length), bool)
    committed[0, a.position] = True
    ref_attr = OutputToConceptAttribution(
        dense(a.token), dense(a.logit), dense(a.known_ids.astype(np.int64)),
        dense(a.known_weights), dense(a.known_contrib), dense(a.unknown_ids.astype(np.int64)),
        dense(a.unknown_weights), dense(a.unknown_contrib), dense(a.epsilon),
        torch.from_numpy(committed))
    n_known = cfg.concepts.n_known
    entries, eps_pct = chunk_attribution(ref_attr, start, end, concept_labels=SLabels("/nonexistent"),
                                         num_known_concepts=n_known)
    want = {}
    for e in entries:
        cid = int(e["label"].split("#")[1])
        key = ("known", cid) if e["type"] == "known" else ("unknown", cid - n_known)
        want[key] = e["contribution"]
    got = chunk_concepts(attr, b, start, end)
    assert got.n_tokens == int(((a.position >= start) & (a.position < end)).sum()) == 4
    have = {(e["type"], e["id"]): e["score"] for e in got.entries}
    assert set(have) == {k for k, v in want.items() if v != 0}
    for k, v in have.items():
        assert abs(v - want[k]) < 1e-6, k
    assert abs(got.epsilon_share * 100 - eps_pct) < 1e-4
    scores = [abs(e["score"]) for e in got.entries]
    assert scores == sorted(scores, reverse=True)


def test_capture_source_is_preferred_and_read_at_each_token(diffusion_attr):
    cfg, model, trace, attr = diffusion_attr
    b, p = attr.batch, attr.position

    def dense(x):
        out = np.zeros(trace.tokens.shape + x.shape[1:], x.dtype)
        out[b, p] = x
        return out

    capture = dict(logit=dense(attr.logit), known_ids=dense(attr.known_ids),
                   known_contrib=dense(attr.known_contrib), unknown_ids=dense(attr.unknown_ids),
                   unknown_contrib=dense(attr.unknown_contrib),
                   epsilon_contrib=dense(attr.epsilon + 1.0))   # marked, to see which is read
    import dataclasses
    captured = dataclasses.replace(trace, capture=capture)
    got = concept_attribution(model, captured)
    np.testing.assert_array_equal(got.epsilon, attr.epsilon + 1.0)
    np.testing.assert_array_equal(got.known_ids, attr.known_ids)
    assert not got.verify().passed             # the marked epsilon breaks the identity
    direct = from_capture(replay_for(model, captured), capture)
    np.testing.assert_array_equal(direct.position, attr.position)
    with pytest.raises(ValueError, match="no commit-time capture"):
        concept_attribution(model, trace, source="capture")


def test_labels_and_rows(diffusion_attr):
    cfg, _, _, attr = diffusion_attr
    vocab = ConceptVocab.from_names([f"topic:t{i}" for i in range(cfg.concepts.n_known)])
    labels = ConceptLabels(vocab)
    assert labels.label(7) == ("topic:t7", "topic")
    assert labels.label(7, "unknown") == ("u7", "unknown")
    chunk = chunk_concepts(attr, 0, 3, 9, labels)
    for e in chunk.entries:
        if e["type"] == "known":
            assert e["name"] == f"topic:t{e['id']}" and e["group"] == "topic"
        else:
            assert e["name"] == f"u{e['id']}" and e["group"] == "unknown"
    rows = concept_rows(attr, labels)
    n_active = int((attr.known_weights != 0).sum() + (attr.unknown_weights != 0).sum())
    assert len(rows) == n_active
    first = rows[0]
    assert set(first) >= {"batch", "position", "step", "token_id", "logit", "type",
                          "concept_id", "name", "group", "weight", "contribution", "epsilon"}
    # Rows of one token add up, with epsilon, to its logit.
    tok = [r for r in rows if (r["batch"], r["position"]) == (first["batch"], first["position"])]
    assert abs(sum(r["contribution"] for r in tok) + first["epsilon"] - first["logit"]) < 1e-4
