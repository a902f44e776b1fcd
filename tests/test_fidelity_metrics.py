"""Fidelity measurement and the token-level positive switch, against hand-built cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cbm_lm.eval.concept_detection import macro_detection, predicted_chunk_of, token_detection
from cbm_lm.eval.dead_concepts import fire_counts, summarize
from cbm_lm.eval.heldout import HeldoutChunk, HeldoutWindows
from cbm_lm.model.concepts import ConceptHead
from cbm_lm.objectives import chunk_concept_loss


def test_fire_counts_and_dead_fraction_by_hand():
    # 2 rows x 3 positions, active sets of 2 slots; 4 real concepts, ids >= 4 are padding slots.
    idx = np.array([[[0, 5], [0, 1], [7, 1]],
                    [[2, 0], [3, 6], [3, 2]]])
    w = np.array([[[0.9, 0.9], [0.4, 0.8], [0.9, 0.3]],
                  [[0.0, 0.6], [0.2, 0.9], [0.7, 0.9]]])
    valid = np.array([[1, 1, 1], [1, 1, 0]], bool)        # row 1 position 2 is padding
    # concept 2: weight 0 (a padding slot of the active set) at (1,0), padding position at (1,2)
    np.testing.assert_array_equal(fire_counts(idx, w, valid, 4), [3, 2, 0, 1])
    np.testing.assert_array_equal(fire_counts(idx, w, valid, 4, min_weight=0.5), [2, 1, 0, 0])
    present = np.array([True, True, True, False])
    d = summarize(fire_counts(idx, w, valid, 4), fire_counts(idx, w, valid, 4, 0.5), present, 5)
    assert d.dead_ids == [2]                                  # 3 is never labelled: not counted
    assert d.fraction == pytest.approx(1 / 3) and d.fraction_confident == pytest.approx(1 / 3)
    assert d.fraction_all == pytest.approx(1 / 4) and d.num_present == 3 and d.num_real == 4


def test_presence_counts_chunk_and_token_labels():
    w = HeldoutWindows(tokens=np.zeros((1, 4), np.int32), segment_ids=np.ones((1, 4), np.int32),
                       positions=np.arange(4)[None], chunk_of=np.array([[0, 0, 1, 1]]),
                       chunks=[HeldoutChunk(0, 0, 2, (1,), 10, 0),
                               HeldoutChunk(0, 2, 4, (), 11, 0)],
                       doc_keys=["d"], token_labels=np.array([[0, 3, 4, 4]], np.int32))
    np.testing.assert_array_equal(w.present(6), [False, True, False, False, True, False])


def test_positions_predicting_a_chunk():
    chunk_of = np.array([[0, 0, 1, 1, 1, -1]])
    np.testing.assert_array_equal(predicted_chunk_of(chunk_of, "diffusion"), chunk_of)
    # AR: position t predicts token t+1; the row's last position predicts nothing here.
    np.testing.assert_array_equal(predicted_chunk_of(chunk_of, "autoregressive"),
                                  [[0, 1, 1, 1, -1, -1]])


def _pairwise_auroc(pos, neg):
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg])


def test_token_detection_scores_the_position_predicting_each_labelled_token():
    # 1 row, 6 positions, 5 real tokens; concept 2 labels tokens [1,3), concept 0 is chunk
    # level (not scored here), concept 3 labels token 4.
    w = HeldoutWindows(tokens=np.zeros((1, 6), np.int32),
                       segment_ids=np.array([[1, 1, 1, 1, 1, 0]], np.int32),
                       positions=np.arange(6)[None], chunk_of=np.array([[0, 0, 0, 0, 0, -1]]),
                       chunks=[HeldoutChunk(0, 0, 5, (0,), 1, 0)], doc_keys=["d"],
                       token_labels=np.array([[0, 1, 3, 2], [0, 4, 5, 3]], np.int32))
    sp = np.zeros((1, 6, 4))
    sp[0, :, 2] = [5, 1, 4, 0, 3, 9]     # position 5 is padding: never scored
    sp[0, :, 3] = [0, 1, 2, 3, 4, 9]
    # diffusion: positions 0..4 score their own token; concept 2 positives at {1,2}
    d = token_detection(sp, w, "diffusion", [2, 3], min_positives=1)
    assert [p["id"] for p in d.per_concept] == [2, 3] and d.num_chunks == 5
    assert d.per_concept[0]["auroc"] == pytest.approx(_pairwise_auroc([1, 4], [5, 0, 3]))
    assert d.per_concept[1]["auroc"] == pytest.approx(1.0)      # token 4 scored 4, the most
    # autoregressive: position t predicts token t+1, so positions 0..3 are scored (token 4 is
    # the last real one); concept 2 positives at positions {0,1}, concept 3 at {3}
    d = token_detection(sp, w, "autoregressive", [2, 3], min_positives=1)
    assert d.num_chunks == 4
    assert d.per_concept[0]["auroc"] == pytest.approx(_pairwise_auroc([5, 1], [4, 0]))
    assert d.per_concept[1]["auroc"] == pytest.approx(1.0)      # position 3 scored 3, the most
    assert d.per_concept[1]["positives"] == 1
    assert token_detection(sp, w, "diffusion", [], 1).auroc_macro is None


def test_macro_detection_matches_pairwise_auroc():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.3], [0.7, 0.3], [0.1, 0.9]])
    labels = np.array([[1, 0], [0, 1], [0, 0], [1, 0], [0, 1]], bool)
    det = macro_detection(scores, labels, min_positives=1)
    # column 0: positives {0.9, 0.7} above every negative -> 1; column 1: positives {0.8, 0.9}
    # against {0.1, 0.3, 0.3} -> 1.
    assert det.auroc_macro == pytest.approx(1.0)
    det = macro_detection(scores[:, ::-1], labels, min_positives=1)
    # column 0 now scored by column 1's scores: positives {0.1, 0.3} vs {0.8, 0.3, 0.9}
    pos, neg = [0.1, 0.3], [0.8, 0.3, 0.9]
    by_hand = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg])
    assert det.per_concept[0]["auroc"] == pytest.approx(by_hand)
    groups = det.by_group(lambda j: ["a:x", "b:y"][j])
    assert set(groups) == {"a", "b"} and groups["a"]["concepts"] == 1


def _random_head(seed: int):
    """A 4-concept dense head with random predictor p [4,3] and hidden states h [1,5,3]."""
    head = ConceptHead(n_concepts=4, n_padded=4, d_model=3, rank=0, topk=2, report_topk=None,
                       block_size=4, dense_threshold=100, clip=15.0,
                       axis_name="known_concepts", init_std=0.5, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(seed)
    p = rng.normal(size=(4, 3)).astype(np.float32)
    head.predictor[...] = jnp.asarray(p)
    return head, p, rng.normal(size=(1, 5, 3)).astype(np.float32)


def test_token_positives_score_every_labelled_token():
    """positives="token": mean over (token, distinct label) of -log sigmoid(z_tj)."""
    head, p, h = _random_head(1)
    ids = np.array([[[0, 2], [0, 2], [0, -1], [1, 1], [-1, -1]]], np.int32)   # slot 1 token-level
    seg = np.array([[1, 1, 1, 2, 0]], np.int32)
    z = h[0].astype(np.float64) @ p.T.astype(np.float64)
    terms = [np.logaddexp(0, -z[t, j]) for t, js in [(0, {0, 2}), (1, {0, 2}), (2, {0}), (3, {1})]
             for j in sorted(js)]
    tok, aux = chunk_concept_loss(head, jnp.asarray(h), ids, seg, None, jax.random.key(0),
                                  n_negatives=0, positives="token", with_auroc=False)
    np.testing.assert_allclose(float(tok), np.mean(terms), rtol=1e-5)
    assert float(aux["n_pos_pairs"]) == len(terms)
    soft, _ = chunk_concept_loss(head, jnp.asarray(h), ids, seg, None, jax.random.key(0),
                                 n_negatives=0, with_auroc=False)
    assert abs(float(soft) - float(tok)) > 1e-3                  # the switch changes the loss
    with pytest.raises(ValueError, match="positives"):
        chunk_concept_loss(head, jnp.asarray(h), ids, seg, None, jax.random.key(0),
                           n_negatives=0, positives="chunk")


def test_concept_balanced_positives_by_hand():
    """balance="concept": mean over labelled concepts of each concept's mean positive term."""
    head, p, h = _random_head(2)
    # chunk 1 (tokens 0-2): chunk label 0 in slot 0; token label 2 at tokens 0, 1;
    # chunk 2 (token 3): chunk label 1 twice (counted once); token 4 padding
    ids = np.array([[[0, 2], [0, 2], [0, -1], [1, 1], [-1, -1]]], np.int32)
    seg = np.array([[1, 1, 1, 2, 0]], np.int32)
    z = h[0].astype(np.float64) @ p.T.astype(np.float64)
    nls = lambda t, j: np.logaddexp(0, -z[t, j])                   # -log sigmoid
    sp = lambda t, j: np.logaddexp(0, z[t, j])                      # softplus
    by_concept = {0: [nls(0, 0), nls(1, 0), nls(2, 0)], 1: [nls(3, 1)], 2: [nls(0, 2), nls(1, 2)]}
    want = np.mean([np.mean(v) for v in by_concept.values()])
    tok, _ = chunk_concept_loss(head, jnp.asarray(h), ids, seg, None, jax.random.key(0),
                                n_negatives=0, positives="token", with_auroc=False,
                                balance="concept")
    np.testing.assert_allclose(float(tok), want, rtol=1e-5)
    plain, _ = chunk_concept_loss(head, jnp.asarray(h), ids, seg, None, jax.random.key(0),
                                  n_negatives=0, positives="token", with_auroc=False)
    np.testing.assert_allclose(float(plain), np.mean(sum(by_concept.values(), [])), rtol=1e-5)
    # soft-OR: concept 0 is one chunk pair (-log(1 - exp(-S))), concept 1 one, concept 2 the
    # token-level slot at tokens 0 and 1
    s0 = sum(sp(t, 0) for t in range(3))
    soft = {0: [-np.log(-np.expm1(-s0))], 1: [-np.log(-np.expm1(-sp(3, 1)))],
            2: by_concept[2]}
    got, _ = chunk_concept_loss(head, jnp.asarray(h), ids, seg, None, jax.random.key(0),
                                n_negatives=0, with_auroc=False, balance="concept")
    np.testing.assert_allclose(float(got), np.mean([np.mean(v) for v in soft.values()]),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="balance"):
        chunk_concept_loss(head, jnp.asarray(h), ids, seg, None, jax.random.key(0),
                           n_negatives=0, balance="class")


def test_pooled_chunk_term_scores_each_chunks_mean_logit_by_hand():
    """concept_pooled_weight w adds w * (mean softplus(-zbar) over chunk-level positives +
    mean softplus(zbar) over (chunk, sampled id) pairs), zbar the logit's mean over the
    chunk's tokens where the pair is scored."""
    from cbm_lm.objectives.concept_loss import sample_negative_ids
    head, p, h = _random_head(3)
    ids = np.array([[[0, 2], [0, 2], [0, -1], [1, 1], [-1, -1]]], np.int32)
    seg = np.array([[1, 1, 1, 2, 0]], np.int32)
    z = h[0].astype(np.float64) @ p.T.astype(np.float64)
    sp = lambda x: np.logaddexp(0, x)                               # softplus
    # chunk-level positives: id 0 on chunk 1 (tokens 0-2), id 1 on chunk 2 (token 3); id 2
    # is a token-level label (tokens 0, 1), so it has no pooled positive term
    pos = [sp(-np.mean(z[0:3, 0])), sp(-z[3, 1])]
    key = jax.random.key(7)
    neg_ids = np.asarray(sample_negative_ids(key, 6, 4))
    labels_at = {0: {0, 2}, 1: {0, 2}, 2: {0}, 3: {1}}              # every valid label per token
    neg = []
    for chunk in ([0, 1, 2], [3]):
        for j in neg_ids:                                           # one pair per sampled slot
            toks = [t for t in chunk if j not in labels_at[t]]
            if toks:
                neg.append(sp(np.mean(z[toks, j])))
    want = np.mean(pos) + np.mean(neg)
    args = (head, jnp.asarray(h), ids, seg, None, key)
    base, _ = chunk_concept_loss(*args, n_negatives=6, positives="token", with_auroc=False)
    got, aux = chunk_concept_loss(*args, n_negatives=6, positives="token", with_auroc=False,
                                  pooled_weight=0.5)
    np.testing.assert_allclose(float(aux["pooled_loss"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(got) - float(base), 0.5 * want, rtol=1e-4)
    # the term trains the head's keys only: no gradient into the states h
    def extra(hh, m):
        with_term = chunk_concept_loss(m, hh, ids, seg, None, key, n_negatives=6,
                                       positives="token", with_auroc=False, pooled_weight=1.0)
        without = chunk_concept_loss(m, hh, ids, seg, None, key, n_negatives=6,
                                     positives="token", with_auroc=False)
        return with_term[0] - without[0]
    assert float(jnp.abs(jax.grad(extra)(jnp.asarray(h), head)).max()) == 0
    g_keys = nnx.grad(lambda m: extra(jnp.asarray(h), m))(head)
    assert float(jnp.abs(g_keys["predictor"][...]).max()) > 0
