"""Each eval metric against a value computed by hand on a constructed input."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cbm_lm.eval.concept_detection import chunk_positions, chunk_scores, macro_detection
from cbm_lm.eval.deletion import deletion_auc
from cbm_lm.eval.forward import forward
from cbm_lm.eval.heldout import HeldoutChunk, HeldoutWindows
from cbm_lm.eval.logit_shares import (contributions, logit_shares, shares_from_contributions,
                                      summarize)
from cbm_lm.eval.perplexity import perplexity
from data_fixtures import small_corpus  # noqa: F401  (fixture)
from model_fixtures import make_model, tiny_config


def windows_of(tokens: np.ndarray, lengths, chunk_len: int = 4) -> HeldoutWindows:
    n, t = tokens.shape
    seg = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    chunk_of = np.full((n, t), -1, np.int32)
    chunks = []
    for r in range(n):
        for s in range(0, lengths[r], chunk_len):
            e = min(s + chunk_len, lengths[r])
            chunk_of[r, s:e] = len(chunks)
            chunks.append(HeldoutChunk(r, s, e, (len(chunks) % 3,), len(chunks), 0))
    pos = np.where(seg > 0, np.arange(t)[None], 0).astype(np.int32)
    return HeldoutWindows(tokens.astype(np.int32), seg, pos, chunk_of, chunks, [""] * n)


def test_macro_auroc_and_prauc_on_a_known_ranking():
    # concept 0: positives scored 0.9 and 0.3, negatives 0.5, 0.1, 0.2
    #   AUROC = pairs won / pairs = (3 + 2) / 6; AP = (1/1 + 2/3) / 2
    # concept 1: positives ranked first -> 1 and 1
    # concept 2: a single positive, below min_positives=2 -> not counted
    scores = np.array([[0.9, 5, 1], [0.3, 4, 0], [0.5, 1, 0], [0.1, 2, 0], [0.2, 0, 0]])
    labels = np.array([[1, 1, 1], [1, 1, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]], bool)
    det = macro_detection(scores, labels, min_positives=2)
    assert det.num_concepts == 2 and [p["id"] for p in det.per_concept] == [0, 1]
    assert det.per_concept[0]["auroc"] == pytest.approx(5 / 6)
    assert det.per_concept[0]["prauc"] == pytest.approx((1 + 2 / 3) / 2)
    assert det.auroc_macro == pytest.approx((5 / 6 + 1) / 2)
    assert det.prauc_macro == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
    assert macro_detection(scores, labels, min_positives=3).auroc_macro is None


@nnx.jit
def _dense_known_logits(model, tokens, positions, segment_ids):
    out = model(tokens, positions=positions, segment_ids=segment_ids)
    return model.rewrite.known_head.dense_logits(out.hidden)


def test_chunk_scores_are_the_soft_or_of_the_dense_logits():
    cfg = tiny_config(objective="autoregressive", attention="causal")
    model = make_model(cfg)
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, 10), 0, cfg.vocab_size))
    w = windows_of(tokens, [10, 7])
    got = chunk_scores(model, w, n_concepts=12, batch=2)
    z = np.asarray(_dense_known_logits(model, jnp.asarray(w.tokens), jnp.asarray(w.positions),
                                       jnp.asarray(w.segment_ids)))[..., :12]     # [B,T,C]
    sp = np.log1p(np.exp(z.astype(np.float64)))
    for i, c in enumerate(w.chunks):
        # autoregressive: the positions predicting tokens start..end-1 are start-1..end-2
        np.testing.assert_allclose(got[i], sp[c.row, max(c.start - 1, 0):c.end - 1].sum(0),
                                   rtol=1e-5)
    n = chunk_positions(w, "autoregressive")
    np.testing.assert_array_equal(
        n, [c.end - 1 - max(c.start - 1, 0) for c in w.chunks])
    # P(present) = 1 - prod(1 - sigmoid(z)) ranks like the score
    p = 1 - np.prod(1 - 1 / (1 + np.exp(-z[0, 0:3])), axis=0)
    np.testing.assert_allclose(p, 1 - np.exp(-got[0]), rtol=1e-5)


def test_deletion_auc_when_the_output_depends_on_one_token():
    mask, key_pos = 99, 3
    # log p(y) = 0 while position 3 is visible, -4 once it is masked
    def log_prob_fn(inputs, example):
        return np.where(inputs[:, key_pos] == mask, -4.0, 0.0)

    n = 2000
    tokens = np.tile(np.arange(5), (n, 1))
    context = [np.arange(5)] * n
    attribution = [np.array([0.1, 0.2, 0.0, 3.0, -1.0])] * n        # position 3 ranked first
    res = deletion_auc(log_prob_fn, tokens, context, attribution, mask, num_steps=5, seed=0)
    # attribution order: curve 0, -4, -4, -4, -4, -4 on fractions 0, .2, ..., 1
    assert res.attribution_auc == pytest.approx(0.2 * (0 - 4) / 2 + 4 * 0.2 * -4)
    assert res.attribution_curve == pytest.approx([0, -4, -4, -4, -4, -4])
    # random order: P(position 3 deleted after k of 5) = k/5 -> mean curve -4k/5, AUC -2
    assert res.random_auc == pytest.approx(-2.0, abs=0.1)
    assert res.attribution_auc < res.random_auc


def test_shares_on_a_constructed_decomposition():
    known, unknown, eps = np.array([3.0, -1.0]), np.array([1.0, 0.0]), np.array([-1.0, 1.0])
    np.testing.assert_allclose(shares_from_contributions(known, unknown, eps),
                               [[0.6, 0.2, 0.2], [0.5, 0.0, 0.5]])
    s = summarize(known, unknown, eps, logit=np.array([3.0, 0.5]))
    assert (s.known, s.unknown, s.epsilon) == pytest.approx((0.55, 0.1, 0.35))
    assert s.max_error == pytest.approx(0.5)          # token 1: -1 + 0 + 1 vs 0.5
    assert s.percentiles["known"]["p50"] == pytest.approx(0.55)


@pytest.mark.parametrize("objective", ["autoregressive", "diffusion"])
def test_logit_shares_of_a_model_keep_the_identity(objective):
    cfg = tiny_config(objective=objective,
                      attention="causal" if objective == "autoregressive" else "block_causal")
    model = make_model(cfg)
    tokens = np.asarray(jax.random.randint(jax.random.key(4), (3, 12), 0, cfg.vocab_size - 1))
    s = logit_shares(model, windows_of(tokens, [12, 12, 9]), batch=2)
    assert s.max_error < 1e-4
    assert s.known + s.unknown + s.epsilon == pytest.approx(1.0)
    assert s.num_tokens > 0


def test_contributions_over_every_masking_rate():
    """t_min=0 explains masked tokens of blocks at any rate in (0, 1]; each token's groups
    add up to its logit, and the eval's draw (t_min 0.5) only explains blocks at t >= 0.5."""
    cfg = tiny_config(objective="diffusion", attention="block_causal")
    model = make_model(cfg)
    tokens = np.asarray(jax.random.randint(jax.random.key(6), (4, 16), 0, cfg.vocab_size - 1))
    w = windows_of(tokens, [16, 16, 12, 9])
    every = contributions(model, w, batch=2, t_min=0.0, clean_context=False)
    np.testing.assert_allclose(every["known"] + every["unknown"] + every["eps"], every["logit"],
                               atol=1e-4)
    assert every["rate"].min() < 0.5 and every["rate"].max() <= 1.0
    half = contributions(model, w, batch=2, clean_context=False)
    assert half["rate"].min() >= 0.5


def _uniform(model):
    """Zero the (tied) embedding: every logit is 0, p = 1/V everywhere."""
    emb = model.backbone.embedding
    emb[...] = jnp.zeros_like(emb[...])
    return model


def test_ar_perplexity_is_exact_against_numpy():
    cfg = tiny_config(objective="autoregressive", attention="causal")
    model = make_model(cfg)
    tokens = np.asarray(jax.random.randint(jax.random.key(5), (3, 9), 0, cfg.vocab_size))
    w = windows_of(tokens, [9, 5, 2])
    got = perplexity(model, w, batch=2)
    logits = np.asarray(forward(model, jnp.asarray(tokens)).logits, np.float64)
    nll = []
    for r, n in enumerate([9, 5, 2]):
        for t in range(n - 1):
            z = logits[r, t]
            nll.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[tokens[r, t + 1]])
    assert got.num_tokens == len(nll) == 8 + 4 + 1
    assert got.perplexity == pytest.approx(np.exp(np.mean(nll)), rel=1e-5)
    assert perplexity(_uniform(model), w).perplexity == pytest.approx(cfg.vocab_size, rel=1e-5)


def test_diffusion_elbo_of_a_uniform_model_is_the_vocabulary_size():
    # CE = log V on every masked token and E[1{masked} / t] = 1 per token, so the
    # ELBO is log V per token: PPL ~ V up to Monte Carlo noise over the mask draws.
    cfg = tiny_config(objective="diffusion", attention="block_causal")
    model = _uniform(make_model(cfg))
    tokens = np.asarray(jax.random.randint(jax.random.key(6), (8, 32), 0, cfg.vocab_size - 1))
    got = perplexity(model, windows_of(tokens, [32] * 8), batch=8, num_draws=16, t_min=0.2,
                     clean_context=False)
    assert np.log(got.perplexity) == pytest.approx(np.log(cfg.vocab_size), rel=0.1)


def test_steering_success_and_perplexity_ratio_by_hand():
    from cbm_lm.eval.perplexity import Perplexity
    from cbm_lm.eval.steering_eval import concept_success, pooled_perplexity_ratio
    # detected (p >= 0.5) in 2 of 4 steered vs 1 of 4 unsteered generations
    assert concept_success([0.9, 0.5, 0.1, 0.2], [0.6, 0.4, 0.0, 0.1]) == (0.5, 0.25, True)
    assert concept_success([0.9, 0.1], [0.7, 0.2])[2] is False       # equal rates: no success
    # steered runs: 10 tokens at NLL 2 and 30 at NLL 3 -> pooled NLL 2.75; unsteered NLL 2.5
    runs = [Perplexity(np.exp(2.0), 2.0, 10, ""), Perplexity(np.exp(3.0), 3.0, 30, "")]
    ratio = pooled_perplexity_ratio(runs, Perplexity(np.exp(2.5), 2.5, 40, ""))
    assert ratio == pytest.approx(np.exp(0.25))


def test_bag_of_words_detector_learns_the_corpus_labels(small_corpus):
    from cbm_lm.data.corpus import Corpus
    from cbm_lm.eval.concept_classifier import train_classifier
    corpus = Corpus(small_corpus)
    dogs = corpus.concepts.id("topic:dogs")     # 3 of the ~60 training chunks
    clf = train_classifier(corpus, [dogs])
    assert clf.train_positives[dogs] == 3
    p = clf.probability(["The dog barked. A proud dog.", "Filler document number 3.",
                         "Goldfish swim in small bowls."], dogs)
    assert p[0] > 0.5 > max(p[1], p[2])


def _labelled_windows(tokens, lengths, chunk_len):
    """windows_of plus token-level labels of concepts 5 and 7 on a few spans."""
    w = windows_of(tokens, lengths, chunk_len)
    w.token_labels = np.asarray([[r, s, s + 2, 5 if (r + s) % 2 else 7]
                                 for r in range(len(lengths)) for s in range(0, lengths[r] - 2, 3)],
                                np.int32)
    return w


@pytest.mark.parametrize("objective", ["autoregressive", "diffusion"])
def test_concept_detection_is_the_dense_computation_bit_for_bit(objective):
    """One streamed pass (chunk sums per row batch, token-level columns only) gives exactly
    the result of the dense [N,T,M] softplus reference, an odd last batch included."""
    from cbm_lm.eval.concept_detection import (concept_detection, position_softplus,
                                               predicted_chunk_of, token_detection)
    cfg = tiny_config(objective=objective,
                      attention="causal" if objective == "autoregressive" else "block_causal")
    model = make_model(cfg, seed=2)
    tokens = np.asarray(jax.random.randint(jax.random.key(8), (5, 16), 0, cfg.vocab_size - 1))
    w = _labelled_windows(tokens, [16, 12, 16, 9, 14], chunk_len=4)
    n_c = 12
    chunk, tok = concept_detection(model, w, n_c, min_positives=1, batch=2, token_concepts=[5, 7])
    # the dense reference: every position's softplus of every concept, then the sums
    sp = position_softplus(model, w, n_c, batch=2)
    assert sp.shape == (5, 16, n_c)
    target = predicted_chunk_of(w.chunk_of, objective)
    ref = np.zeros((len(w.chunks), n_c))
    np.add.at(ref, target[target >= 0], sp[target >= 0])
    want = macro_detection(ref, w.labels(n_c), 1)
    n = np.bincount(target[target >= 0], minlength=len(w.chunks))
    mean = macro_detection(ref / np.maximum(n, 1)[:, None], w.labels(n_c), 1)
    assert chunk == dataclasses.replace(want, mean_pooled_auroc_macro=mean.auroc_macro)
    assert chunk.num_concepts > 0
    want_tok = token_detection(sp, w, objective, [5, 7], 1)
    assert tok == want_tok and tok.num_concepts == 2
    np.testing.assert_array_equal(chunk_scores(model, w, n_c, batch=2), ref)


def test_concept_detection_never_holds_the_dense_softplus():
    """Host memory: the dense [N,T,M] float32 softplus (and its copy of real positions) is
    what the old path held; the streamed one holds a row batch and the chunk sums."""
    import tracemalloc
    from cbm_lm.eval.concept_detection import concept_detection
    cfg = tiny_config(objective="autoregressive", attention="causal")
    model = make_model(cfg)
    n_rows, t, n_c = 256, 64, cfg.concepts.n_known
    tokens = np.asarray(jax.random.randint(jax.random.key(9), (n_rows, t), 0, cfg.vocab_size))
    w = windows_of(tokens, [t] * n_rows, chunk_len=t)          # one chunk per row
    run = lambda: concept_detection(model, w, n_c, min_positives=1, batch=8)  # noqa: E731
    run()                                                       # compile outside the measure
    tracemalloc.start()
    try:
        run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    dense = n_rows * t * n_c * 4                                # 2.6 MB
    assert peak < dense / 4, (peak, dense)


def test_map_rows_refuses_zero_rows_by_name():
    from cbm_lm.eval.forward import map_rows
    calls = []
    with pytest.raises(ValueError, match=r"map_rows: n=0 rows; expected >= 1"):
        map_rows(lambda r: calls.append(r) or {"x": r}, 0, 8)
    assert calls == []
    got = map_rows(lambda r: {"x": r * 10}, 5, 2)                 # 3 batches, last one padded
    np.testing.assert_array_equal(got["x"], [0, 10, 20, 30, 40])


def test_stages_without_data_raise_metric_unavailable():
    """What the runner turns into null + details.missing: no labelled concept (dead
    concepts), no token followed by another of its document (AR logit shares), no token
    with 8 tokens of context (deletion)."""
    from cbm_lm.eval.dead_concepts import dead_concepts
    from cbm_lm.eval.input_faithfulness import input_deletion
    from cbm_lm.eval.report import MetricUnavailable
    cfg = tiny_config(objective="autoregressive", attention="causal")
    model = make_model(cfg)
    tokens = np.asarray(jax.random.randint(jax.random.key(7), (2, 8), 0, cfg.vocab_size))
    one_token = windows_of(tokens, [1, 1])
    with pytest.raises(MetricUnavailable, match="no token of the 2 held-out windows to explain"):
        logit_shares(model, one_token, batch=2)
    unlabelled = windows_of(tokens, [8, 8])
    unlabelled.chunks = [dataclasses.replace(c, concepts=()) for c in unlabelled.chunks]
    with pytest.raises(MetricUnavailable, match="none of the corpus's 12 concepts is labelled"):
        dead_concepts(model, unlabelled, 12, batch=2)
    with pytest.raises(MetricUnavailable, match=r"longest 8 tokens\) has 8 tokens of context"):
        input_deletion(model, unlabelled, num_tokens=2, ig_steps=1)
