"""The training objectives against independent numpy computations on tiny inputs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cbm_lm.model.concepts import ConceptHead
from cbm_lm.objectives import (
    chunk_concept_loss, corrupt, diffusion_loss, epsilon_dropout_prob, next_token_loss,
    pooled_label_features, positive_bce, sample_epsilon_dropout, sample_negative_ids,
    soft_or_probability, teacher_forcing_alpha)
from cbm_lm.objectives import concept_auroc as _concept_auroc
from jaxpr_probe import max_intermediate_with_dim


def _np_softplus(x):
    return np.logaddexp(0.0, x)


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_ce(logits, target):
    m = logits.max()
    return m + math.log(np.exp(logits - m).sum()) - logits[target]


def _head(n_concepts=6, n_padded=16, d_model=4, rank=0, seed=0, scoring="gather"):
    return ConceptHead(n_concepts=n_concepts, n_padded=n_padded, d_model=d_model, rank=rank,
                       topk=2, report_topk=None, block_size=4, dense_threshold=100, clip=15.0,
                       axis_name="known_concepts", init_std=0.5, rngs=nnx.Rngs(seed),
                       scoring=scoring)


# ---------------------------------------------------------------- diffusion -------------

def _packed_batch():
    """3 rows: two documents + padding, one document, three documents (positions restart)."""
    seg = np.zeros((3, 40), np.int32)
    pos = np.zeros((3, 40), np.int32)
    for r, lengths in enumerate([(13, 21), (40,), (5, 11, 9)]):
        i = 0
        for s, n in enumerate(lengths, start=1):
            seg[r, i:i + n], pos[r, i:i + n] = s, np.arange(n)
            i += n
    tokens = np.random.default_rng(0).integers(0, 50, (3, 40)).astype(np.int32)
    return tokens, seg, pos


def test_corrupt_masks_real_tokens_per_block():
    tokens, seg, pos = _packed_batch()
    bs, mask_id, t_min = 4, 99, 0.2
    run = jax.jit(lambda k: corrupt(k, tokens, seg, pos, block_size=bs, mask_id=mask_id,
                                    t_min=t_min))
    noisy, masked, t = map(np.asarray, run(jax.random.key(3)))
    again = run(jax.random.key(3))
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip((noisy, masked, t), again))
    assert not np.array_equal(masked, np.asarray(run(jax.random.key(4))[1]))

    real = seg > 0
    assert not masked[~real].any() and np.all(t[~real] == 1.0)
    assert np.array_equal(noisy, np.where(masked, mask_id, tokens))
    assert np.all((t[real] >= t_min) & (t[real] < 1.0))
    # t is constant on each (row, document, positions // bs) block and differs between blocks.
    groups = {}
    for r, i in zip(*np.nonzero(real)):
        groups.setdefault((r, seg[r, i], pos[r, i] // bs), set()).add(float(t[r, i]))
    assert all(len(v) == 1 for v in groups.values())
    per_block = [next(iter(v)) for v in groups.values()]
    assert len(set(per_block)) == len(per_block)
    # Row 0: index 12 (doc 1, block 3) and 13 (doc 2, block 0) share index // bs but not t.
    assert t[0, 12] != t[0, 13] and t[0, 13] == t[0, 16]


def test_corrupt_mask_rate_tracks_t():
    b, n, bs = 32, 512, 128
    tokens = jnp.zeros((b, n), jnp.int32)
    seg = jnp.ones((b, n), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    _, masked, t = jax.jit(lambda k: corrupt(k, tokens, seg, pos, block_size=bs, mask_id=1,
                                             t_min=0.05))(jax.random.key(0))
    rate = np.asarray(masked, np.float64).reshape(b, n // bs, bs).mean(-1).ravel()
    tb = np.asarray(t).reshape(b, n // bs, bs)[..., 0].ravel()
    sd = np.sqrt(tb * (1 - tb) / bs)
    assert np.all(np.abs(rate - tb) < 5 * sd + 1e-3)
    assert np.corrcoef(rate, tb)[0, 1] > 0.95
    assert abs(rate.mean() - tb.mean()) < 0.01
    assert tb.min() < 0.2 and tb.max() > 0.9          # t actually spans U(t_min, 1)


def test_diffusion_loss_hand_computed():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, 5, 4)).astype(np.float32)
    tokens = np.array([[1, 3, 0, 2, 0]], np.int32)
    masked = np.array([[True, False, True, True, True]])     # the padding entry is ignored
    t = np.array([[0.5, 0.7, 0.25, 0.8, 1.0]], np.float32)
    seg = np.array([[1, 1, 1, 2, 0]], np.int32)
    loss, aux = jax.jit(diffusion_loss)(logits, tokens, masked, t, seg)
    lg = logits.astype(np.float64)[0]
    ces = {i: _np_ce(lg[i], tokens[0, i]) for i in (0, 2, 3)}
    expected = sum(ces[i] / t[0, i] for i in ces) / 4.0          # 4 real tokens
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(aux["n_masked"]) == 3 and float(aux["n_real"]) == 4
    np.testing.assert_allclose(float(aux["masked_ce"]), np.mean(list(ces.values())), rtol=1e-5)
    acc = np.mean([lg[i].argmax() == tokens[0, i] for i in ces])
    np.testing.assert_allclose(float(aux["masked_acc"]), acc)


# ---------------------------------------------------------------- autoregressive --------

def test_next_token_loss_stays_inside_documents():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(1, 6, 5)).astype(np.float32)
    tokens = np.array([[0, 4, 2, 1, 3, 0]], np.int32)
    seg = np.array([[1, 1, 1, 2, 2, 0]], np.int32)
    loss, aux = jax.jit(next_token_loss)(logits, tokens, seg)
    lg = logits.astype(np.float64)[0]
    pairs = [(0, 1), (1, 2), (3, 4)]
    expected = np.mean([_np_ce(lg[i], tokens[0, j]) for i, j in pairs])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(aux["n_pairs"]) == 3
    g = np.asarray(jax.jit(jax.grad(lambda x: next_token_loss(x, tokens, seg)[0]))(logits))
    assert np.all(g[0, [2, 4, 5]] == 0.0)                    # last token of a doc, padding
    assert np.all(np.abs(g[0, [0, 1, 3]]).sum(-1) > 0)


# ---------------------------------------------------------------- concept loss ----------

H = np.array([[0.5, -1.0, 0.3, 0.8], [1.2, 0.1, -0.4, 0.2], [-0.3, 0.9, 0.7, -1.1],
              [0.4, 0.4, -0.9, 0.6], [-0.8, 0.2, 0.5, 0.3], [0.1, -0.6, 1.0, -0.2]], np.float32)
P = np.array([[0.9, -0.2, 0.4, 0.1], [-0.5, 0.7, 0.2, -0.3], [0.3, 0.3, 0.8, -0.6],
              [0.2, -0.9, -0.1, 0.5], [-0.7, 0.1, 0.6, 0.4], [0.6, 0.5, -0.8, -0.2]], np.float32)
# Row 0: chunk 1 = tokens 0-1 labelled {0, 3}, chunk 2 = tokens 2-3 labelled {2}, 2 padding
# tokens (carrying junk labels that must be ignored). Row 1: chunk 1 = tokens 0-2 labelled
# {1, 3}, chunk 2 = tokens 3-4 labelled {5} (duplicated slot counts once), 1 padding token.
HID = np.stack([H, H[[4, 5, 0, 1, 2, 3]]])
CIDS = np.array([[[0, 3], [0, 3], [2, -1], [2, -1], [1, -1], [4, 4]],
                 [[1, 3], [1, 3], [1, 3], [5, 5], [5, 5], [0, 2]]], np.int32)
CSEG = np.array([[1, 1, 2, 2, 0, 0], [1, 1, 1, 2, 2, 0]], np.int32)
TOPK = np.array([[[0, 5], [4, 3], [2, 1], [1, 0], [1, 2], [3, 4]],
                 [[3, 2], [0, 4], [5, 1], [5, 0], [2, 3], [1, 5]]], np.int32)
concept_loss_jit = nnx.jit(chunk_concept_loss,
                           static_argnames=("n_negatives", "pos_weight", "neg_weight",
                                            "positives"))


def _set_head():
    head = _head()
    pred = np.zeros((16, 4), np.float32)
    pred[:6] = P
    head.predictor[...] = jnp.asarray(pred)
    return head


def _reference(neg_ids, topk):
    """Independent float64 loops over rows, chunks, tokens and candidate ids."""
    pos_terms, pos_s, neg_terms, neg_s = [], [], [], []
    for r in range(HID.shape[0]):
        z = np.clip(HID[r].astype(np.float64) @ P.T.astype(np.float64), -15, 15)   # [T,6]
        for c in sorted(set(CSEG[r]) - {0}):
            toks = np.nonzero(CSEG[r] == c)[0]
            labels = {int(j) for j in CIDS[r, toks[0]] if j >= 0}
            for j in sorted(labels):
                p_absent = np.prod([1 - _np_sigmoid(z[t, j]) for t in toks])
                pos_terms.append(-np.log(1 - p_absent))
                pos_s.append(-np.log(p_absent))
            for t in toks:
                neg_terms += [_np_softplus(z[t, j]) for j in neg_ids if j not in labels]
                if topk is not None:
                    neg_terms += [_np_softplus(z[t, j]) for j in topk[r, t]
                                  if j not in labels and j not in set(neg_ids)]
            neg_s += [sum(_np_softplus(z[t, j]) for t in toks)
                      for j in neg_ids if j not in labels]
    return pos_terms, pos_s, neg_terms, neg_s


def _np_auroc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg])


def test_concept_loss_positives_only_hand_computed():
    head = _set_head()
    loss, aux = concept_loss_jit(head, jnp.asarray(HID), CIDS, CSEG, None, jax.random.key(0),
                                 n_negatives=0, pos_weight=1.0, neg_weight=1.0)
    pos_terms, pos_s, _, _ = _reference([], None)
    assert len(pos_terms) == 6
    np.testing.assert_allclose(float(loss), np.mean(pos_terms), rtol=1e-5)
    assert float(aux["n_pos_pairs"]) == 6 and float(aux["n_neg_pairs"]) == 0
    assert float(aux["n_chunks"]) == 4
    np.testing.assert_allclose(float(aux["pos_detected"]), np.mean(np.array(pos_s) > np.log(2)))


@pytest.mark.parametrize("with_topk", [False, True])
def test_concept_loss_with_negatives_hand_computed(with_topk):
    head = _set_head()
    rng = jax.random.key(7)
    m = 5
    neg_ids = [int(i) for i in np.asarray(sample_negative_ids(rng, m, 6))]
    topk = TOPK if with_topk else None
    loss, aux = concept_loss_jit(head, jnp.asarray(HID), CIDS, CSEG, topk, rng,
                                 n_negatives=m, pos_weight=2.0, neg_weight=0.5)
    pos_terms, pos_s, neg_terms, neg_s = _reference(neg_ids, topk)
    assert any(j in (0, 2, 3) for j in neg_ids)              # some sampled ids get excluded
    np.testing.assert_allclose(float(aux["pos_loss"]), np.mean(pos_terms), rtol=1e-5)
    np.testing.assert_allclose(float(aux["neg_loss"]), np.mean(neg_terms), rtol=1e-5)
    np.testing.assert_allclose(float(loss), 2.0 * np.mean(pos_terms) + 0.5 * np.mean(neg_terms),
                               rtol=1e-5)
    assert float(aux["n_neg_pairs"]) == len(neg_terms)
    expected_auroc = _np_auroc(pos_s + neg_s, [1] * len(pos_s) + [0] * len(neg_s))
    np.testing.assert_allclose(float(aux["auroc"]), expected_auroc, rtol=1e-6)


def test_auroc_is_chunk_detection_under_token_positives():
    """The trainer's AUROC scores chunks by S_cj under either loss mode (it read a
    constant 0.5 under positives="token", where the loss forms no chunk sums)."""
    head = _set_head()
    rng = jax.random.key(7)
    neg_ids = [int(i) for i in np.asarray(sample_negative_ids(rng, 5, 6))]
    _, _, _, neg_s = _reference(neg_ids, None)
    _, pos_s, _, _ = _reference([], None)
    expected = _np_auroc(pos_s + neg_s, [1] * len(pos_s) + [0] * len(neg_s))
    assert expected not in (0.5, 1.0)                         # a ranking that can be wrong
    _, aux = concept_loss_jit(head, jnp.asarray(HID), CIDS, CSEG, None, rng,
                              n_negatives=5, positives="token")
    np.testing.assert_allclose(float(aux["auroc"]), expected, rtol=1e-6)


def test_soft_or_matches_brute_force():
    rng = np.random.default_rng(3)
    for length in (1, 3, 20):
        z = rng.normal(scale=3.0, size=(50, length))
        s = _np_softplus(z).sum(-1)
        brute = 1.0 - np.prod(1.0 - _np_sigmoid(z), axis=-1)
        np.testing.assert_allclose(np.asarray(soft_or_probability(jnp.asarray(s, jnp.float32))),
                                   brute, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(positive_bce(jnp.asarray(s, jnp.float32))),
                                   -np.log(brute), rtol=1e-4, atol=1e-6)
    # Stable at both ends, and gradients stay finite.
    s = jnp.array([0.0, 1e-8, 3e-7, 30.0, 200.0])
    val, grad = positive_bce(s), jax.grad(lambda x: positive_bce(x).sum())(s)
    assert np.all(np.isfinite(val)) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(float(val[1]), -np.log(-np.expm1(-1e-8)), rtol=1e-5)


def test_concept_auroc_with_ties():
    concept_auroc = jax.jit(_concept_auroc)
    scores = jnp.array([0.1, 0.4, 0.4, 0.8, 0.4, 9.0])
    labels = jnp.array([0, 1, 0, 1, 0, 0])
    mask = jnp.array([1, 1, 1, 1, 1, 0], bool)
    # Positives 0.4, 0.8 vs negatives 0.1, 0.4, 0.4: (1 + .5 + .5) + 3 = 5 of 6 pairs.
    np.testing.assert_allclose(float(concept_auroc(scores, labels, mask)), 5 / 6, rtol=1e-6)
    np.testing.assert_allclose(float(concept_auroc(scores, labels)), 5 / 8, rtol=1e-6)
    assert float(concept_auroc(scores, jnp.zeros(6, int))) == 0.5
    assert float(concept_auroc(scores, jnp.ones(6, int))) == 0.5
    allties = concept_auroc(jnp.ones(4), jnp.array([1, 0, 1, 0]))
    assert float(allties) == 0.5


def test_concept_loss_gradients_reach_known_predictor():
    head = _set_head()

    def loss_fn(head, h):
        return chunk_concept_loss(head, h, CIDS, CSEG, TOPK, jax.random.key(1), n_negatives=2,
                                  pos_weight=1.0, neg_weight=1.0)[0]

    g_head, g_h = nnx.jit(nnx.grad(loss_fn, argnums=(0, 1)))(head, jnp.asarray(HID))
    gp = np.abs(np.asarray(g_head["predictor"][...])).sum(-1)
    assert np.all(gp[:6] > 0)                                # every id 0..5 is a candidate
    assert np.all(gp[6:] == 0.0)                             # padded rows are never scored
    assert float(np.abs(np.asarray(g_head["embedding"][...])).sum()) == 0.0
    g_h = np.abs(np.asarray(g_h)).sum(-1)
    assert np.all(g_h[CSEG > 0] > 0) and np.all(g_h[CSEG == 0] == 0.0)   # padding: no gradient


def test_concept_loss_never_forms_tokens_by_concepts():
    b, t, k, c, d = 2, 32, 3, 5000, 16
    head = _head(n_concepts=c, n_padded=c, d_model=d)
    graphdef, state = nnx.split(head)
    r = np.random.default_rng(0)
    h = jnp.asarray(r.normal(size=(b, t, d)), jnp.float32)
    cids = jnp.asarray(r.integers(-1, c, (b, t, k)), jnp.int32)
    cseg = jnp.asarray(np.repeat(np.arange(1, 9), 4)[None].repeat(b, 0), jnp.int32)
    topk = jnp.asarray(r.integers(0, c, (b, t, 4)), jnp.int32)

    def loss(state, h):
        hd = nnx.merge(graphdef, state)
        return chunk_concept_loss(hd, h, cids, cseg, topk, jax.random.key(0), n_negatives=64,
                                  pos_weight=1.0, neg_weight=1.0)[0]

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(state, h)
    assert max_intermediate_with_dim(jaxpr, c) <= c * d     # the [C, D] table and its gradient
    # The probe can fail: dense logits over the same head do form [B,T,C].
    head.dense_threshold = 10**6
    dense = jax.make_jaxpr(lambda hd, h: hd.dense_logits(h))(head, h)
    assert max_intermediate_with_dim(dense, c) >= b * t * c


@pytest.mark.parametrize("scoring", ["gather", "blockwise"])
@pytest.mark.parametrize("rank", [0, 2])
def test_pooled_label_features(rank, scoring):
    head = _head(rank=rank, seed=3, scoring=scoring)
    ids = np.array([[[1, 4, -1], [2, 2, 5], [-1, -1, -1]]], np.int32)
    out = np.asarray(nnx.jit(pooled_label_features)(head, jnp.asarray(ids)))
    vec = np.asarray(nnx.jit(lambda hd: hd.concept_vectors(jnp.arange(6)))(head), np.float64)
    expected = np.stack([vec[1] + vec[4], vec[2] + vec[5], np.zeros(4)])[None]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- schedules -------------

def test_schedules_under_jit():
    alpha = jax.jit(lambda s: teacher_forcing_alpha(s, 1.0, 0.2, 100))
    np.testing.assert_allclose([float(alpha(s)) for s in (0, 50, 100, 1000)],
                               [1.0, 0.6, 0.2, 0.2], rtol=1e-6)
    p = jax.jit(lambda s: epsilon_dropout_prob(s, 0.3, warmup_steps=10))
    np.testing.assert_allclose([float(p(s)) for s in (0, 5, 10, 99)], [0.0, 0.15, 0.3, 0.3],
                               rtol=1e-6)
    const = jax.jit(lambda s: epsilon_dropout_prob(s, 0.25))
    assert float(const(0)) == 0.25 and float(const(7)) == 0.25
    drops = sample_epsilon_dropout(jax.random.key(0), 4000, 0.25)
    assert drops.shape == (4000,) and abs(float(drops.mean()) - 0.25) < 0.03


def test_token_level_labels_are_scored_at_their_token():
    """Slot 0 carries the chunk label 0 at every token; slot 1 carries lexicon labels
    on single tokens (4 at token 0, 2 at token 2): those are per-token -log sigmoid."""
    head = _set_head()
    hid = jnp.asarray(H[None, :4])
    cids = np.array([[[0, 4], [0, -1], [0, 2], [1, -1]]], np.int32)
    cseg = np.array([[1, 1, 1, 2]], np.int32)
    loss, aux = concept_loss_jit(head, hid, cids, cseg, None, jax.random.key(0),
                                 n_negatives=0, pos_weight=1.0, neg_weight=1.0)
    z = np.clip(H[:4].astype(np.float64) @ P.T.astype(np.float64), -15, 15)
    chunk1 = -np.log(1 - np.prod([1 - _np_sigmoid(z[t, 0]) for t in range(3)]))
    chunk2 = -np.log(_np_sigmoid(z[3, 1]))          # one-token chunk: soft-OR = sigmoid
    tok_a = -np.log(_np_sigmoid(z[0, 4]))
    tok_b = -np.log(_np_sigmoid(z[2, 2]))
    np.testing.assert_allclose(float(loss), np.mean([chunk1, chunk2, tok_a, tok_b]), rtol=1e-5)
    assert float(aux["n_pos_pairs"]) == 4
