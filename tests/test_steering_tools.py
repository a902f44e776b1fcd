"""Concept search, name resolution, pooled embeddings on padded batches, steering evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cbm_lm.data.concepts import Concept, ConceptVocab
from cbm_lm.inference.concept_search import pooled_embedding, search_concepts
from cbm_lm.inference.logit_processing import SamplingConfig
from cbm_lm.inference.steering import amplify, make_intervention, resolve_concept
from cbm_lm.inference.steering_eval import evaluate_steering, presence_and_nll
from model_fixtures import make_model, tiny_config

VOCAB = ConceptVocab([
    Concept(0, "topic:kings", "fortune quotes about kings and royal courts", "topic"),
    Concept(1, "topic:food", "fortune quotes about food and cooking", "topic"),
    Concept(2, "play:hamlet", "the Shakespeare play 'hamlet', a prince of Denmark", "play"),
    Concept(3, "supersense:noun.food", "nouns of food", "supersense"),
])


def test_search_by_name_and_description():
    assert search_concepts(VOCAB, "topic:food")[0][0] == 1            # exact name first
    assert search_concepts(VOCAB, "royal")[0][0] == 0                 # description word
    assert search_concepts(VOCAB, "denmark prince")[0][0] == 2
    assert {i for i, _ in search_concepts(VOCAB, "food")} == {1, 3}
    assert search_concepts(VOCAB, "zebra") == []


def test_search_empty_or_one_letter_query_finds_nothing():
    # every name contains "" (and most contain "o"): neither may earn the substring bonus
    for q in ("", "   ", "o"):
        assert search_concepts(VOCAB, q) == [], q
    assert [i for i, _ in search_concepts(VOCAB, "mlet")] == [2]    # 2+ letters still match


def test_resolve_names_ids_and_errors():
    assert resolve_concept("play:hamlet", 4, VOCAB) == 2
    assert resolve_concept("3", 4) == 3 and resolve_concept("u7", 10, what="unknown") == 7
    with pytest.raises(ValueError, match="closest.*topic:food"):
        resolve_concept("topic:foods", 4, VOCAB)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        resolve_concept(9, 4)
    model = make_model(tiny_config())
    iv = make_intervention(model, known={"topic:kings": 1.0}, unknown={"u5": 2.0}, vocab=VOCAB)
    assert iv.known == {0: 1.0} and iv.unknown == {5: 2.0}


def test_pooled_embedding_ignores_padding():
    model = make_model(tiny_config())
    ids = np.asarray([[5, 6, 7, 8, 9]])
    padded = np.asarray([[5, 6, 7, 8, 9, 0, 0, 0], [1, 2, 3, 0, 0, 0, 0, 0]])
    seg = np.asarray([[1] * 5 + [0] * 3, [1] * 3 + [0] * 5])
    for pooling in ("mean", "first", "last"):
        alone = pooled_embedding(model, ids, "composed", pooling)[0]
        batched = pooled_embedding(model, padded, "composed", pooling, segment_ids=seg)[0]
        np.testing.assert_allclose(batched, alone, atol=1e-5, err_msg=pooling)


@pytest.mark.parametrize("objective", ["autoregressive", "diffusion"])
def test_steering_eval_presence_matches_dense_soft_or(objective):
    causal = objective == "autoregressive"
    cfg = tiny_config(attention="causal" if causal else "block_causal", objective=objective)
    model = make_model(cfg, seed=4)
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    sampling = SamplingConfig(max_new_tokens=6, banned_ids=(95, 96))
    from cbm_lm.inference.generate import generate
    tr = generate(model, prompts, sampling, amplify(model, [2], 5.0), pad_id=95)
    p, nll, n = presence_and_nll(model, tr, [2, 7])

    @nnx.jit
    def dense(m, seq):           # all concepts' head logits [1,T,C] and the LM logits [1,T,V]
        out = m(seq)
        return m.rewrite.known_head.dense_logits(out.hidden), out.logits

    for b in range(2):       # dense head logits, soft-OR and next-token NLL by hand
        seq = jnp.asarray(tr.tokens[b: b + 1, : tr.prompt_lens[b] + tr.gen_lens[b]])
        z, logits = dense(model, seq)
        z = np.asarray(z)[0]
        g = slice(int(tr.prompt_lens[b]), seq.shape[1])
        # the soft-OR runs over the positions that PREDICT the generated tokens, as the
        # concept loss is trained (objectives/label_alignment.py): for a causal model
        # position t predicts token t+1, so P-1 .. P+G-2; for diffusion the tokens' own
        pred = slice(g.start - 1, g.stop - 1) if causal else g
        want = 1 - np.prod(1 - jax.nn.sigmoid(z[pred][:, [2, 7]]), axis=0)
        np.testing.assert_allclose(p[b], want, atol=1e-5)
        if causal:
            logp = np.asarray(jax.nn.log_softmax(logits[0]))
            tok = np.asarray(seq[0])
            want_nll = -sum(logp[t - 1, tok[t]] for t in range(g.start, g.stop))
            np.testing.assert_allclose(nll[b], want_nll, rtol=1e-5)
        assert n[b] == 6
    if not causal:
        return
    res = evaluate_steering(model, prompts, [2, 7], pad_id=95, sampling=sampling, target=5.0)
    s = res.summary()
    assert s["concepts"] == 2 and s["prompts"] == 2 and s["base_ppl"] > 1
    assert all(0 <= r["base_rate"] <= 1 and r["steered_ppl"] > 1 for r in res.rows())
