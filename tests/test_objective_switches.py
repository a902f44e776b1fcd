"""Each training-objective switch (config section ``loss``) does what it says, checked
through compute_losses on a tiny model against an independent computation: gradients
that must vanish or flow, losses that must coincide, distributions that must match."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from cbm_lm.default_config import base_config
from cbm_lm.objectives import (
    align_labels_to_predictions, independence_loss, noise_rate, residual_energy,
    teacher_forcing_alpha, token_cross_entropy)
from cbm_lm.train.losses import check_loss_config, compute_losses
from model_fixtures import make_model, tiny_config

B, T, K = 4, 16, 2


def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size - 1, (B, T))
    seg = np.ones((B, T), np.int32)
    seg[0, 11:] = 2                                   # row 0 packs two documents
    pos = np.broadcast_to(np.arange(T), (B, T)).copy()
    pos[0, 11:] = np.arange(T - 11)
    chunk = (np.arange(T) // 4 + 1)[None].repeat(B, 0).astype(np.int32)
    ids = np.full((B, T, K), -1)
    ids[..., 0] = (chunk * 3 + np.arange(B)[:, None]) % cfg.concepts.n_known
    return {"tokens": jnp.asarray(tokens, jnp.int32), "segment_ids": jnp.asarray(seg),
            "positions": jnp.asarray(pos, jnp.int32), "concept_ids": jnp.asarray(ids, jnp.int32),
            "chunk_segment_ids": jnp.asarray(chunk)}


def _loss_cfg(**kw):
    c = base_config()
    c.train.num_steps = 100
    c.loss.update(concept_weight=0.0, reconstruction_weight=0.0, independence_weight=0.0,
                  teacher_forcing_start=0.0, teacher_forcing_end=0.0, epsilon_dropout=0.0)
    c.loss.update(kw)
    return c.loss


def _lm_grad(model, cfg, loss_cfg, step=0, train=True):
    """(lm_loss, d lm_loss / d known-head predictor, d lm_loss / d backbone embedding)."""
    from flax import nnx
    graphdef, params = nnx.split(model, nnx.Param)
    batch = _batch(cfg)

    def f(p):
        m = nnx.merge(graphdef, p)
        _, met = compute_losses(m, batch, jax.random.key(5), jnp.asarray(step), loss_cfg=loss_cfg,
                                model_cfg=cfg, train=train)
        return met["lm_loss"], met

    (loss, met), g = jax.value_and_grad(f, has_aux=True)(params)
    return float(loss), g["rewrite"]["known_head"]["predictor"][...], g["backbone"]["blocks"][
        "mlp_norm"]["scale"][0], met


@pytest.fixture(scope="module")
def diffusion_model():
    cfg = tiny_config(objective="diffusion", attention="block_causal", mask_token_id=96)
    return cfg, make_model(cfg)


def _masked_forward(model, batch, key, t_min):
    """The model's one-stream forward of the batch as compute_losses corrupts it with
    ``key`` (its first split): (LMOutput, masked [B,T])."""
    from cbm_lm.objectives import corrupt
    noisy, masked, _ = corrupt(jax.random.split(key, 5)[0], batch["tokens"],
                               batch["segment_ids"], batch["positions"], block_size=4,
                               mask_id=96, t_min=t_min)
    return model(noisy, positions=batch["positions"], segment_ids=batch["segment_ids"]), masked


# ------------------------------------------------------------------ schedules ------------

def test_report_teacher_forcing_schedule():
    """1.0 held to 15% of training, cosine to 0.5 by 50%, then 0.5."""
    a = jax.jit(lambda s: teacher_forcing_alpha(s, 0.0, 0.0, 0, schedule="report",
                                                total_steps=1000))
    got = [float(a(s)) for s in (0, 150, 325, 500, 900, 5000)]
    mid = 0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 0.5))
    np.testing.assert_allclose(got, [1.0, 1.0, mid, 0.5, 0.5, 0.5], atol=1e-6)


@pytest.mark.parametrize("centre", [0.2, 0.8])
def test_gaussian_noise_is_a_truncated_normal(centre):
    u = jax.random.uniform(jax.random.key(0), (40000,))
    t = np.asarray(noise_rate(u, t_min=1e-3, t_max=1.0, noise="gaussian", center=centre,
                              sigma=0.3))
    ref = stats.truncnorm((1e-3 - centre) / 0.3, (1.0 - centre) / 0.3, loc=centre, scale=0.3)
    assert t.min() >= 1e-3 and t.max() <= 1.0
    assert stats.kstest(t, ref.cdf).statistic < 0.01


def test_noise_curriculum_moves_the_masking_rate(diffusion_model):
    """corrupt() with the gaussian curriculum masks the truncated normal's mean fraction."""
    from cbm_lm.objectives import corrupt
    cfg, _ = diffusion_model
    b = _batch(cfg)

    def frac(centre):
        return float(np.mean([np.asarray(corrupt(
            jax.random.key(s), b["tokens"], b["segment_ids"], b["positions"], block_size=4,
            mask_id=96, t_min=1e-3, noise="gaussian", center=centre, sigma=0.3)[1]).mean()
            for s in range(60)]))

    for centre in (0.2, 0.8):
        ref = stats.truncnorm((1e-3 - centre) / .3, (1 - centre) / .3, loc=centre, scale=.3)
        assert abs(frac(centre) - ref.mean()) < 0.05


# ------------------------------------------------------------------ routing --------------

def test_hard_teacher_forcing_substitutes_labels(diffusion_model):
    """alpha = 1, hard, epsilon always dropped: the LM reads k_gt, so the LM loss sends no
    gradient to the known head; with alpha = 0 it does."""
    cfg, model = diffusion_model
    on = _loss_cfg(teacher_forcing="hard", teacher_forcing_start=1.0, teacher_forcing_end=1.0,
                   epsilon_dropout=1.0)
    off = _loss_cfg(teacher_forcing="hard", epsilon_dropout=1.0)
    _, g_on, _, m_on = _lm_grad(model, cfg, on)
    _, g_off, _, _ = _lm_grad(model, cfg, off)
    assert float(m_on["teacher_alpha"]) == 1.0
    assert float(jnp.abs(g_on).max()) == 0.0 and float(jnp.abs(g_off).max()) > 0.0


def test_hard_teacher_forcing_is_per_sequence_bernoulli(diffusion_model):
    """At alpha = 0.5 a sequence is either fully substituted or not: over many keys the
    known-head gradient vanishes in about half of single-sequence batches."""
    cfg, model = diffusion_model
    lc = _loss_cfg(teacher_forcing="hard", teacher_forcing_start=0.5, teacher_forcing_end=0.5,
                   epsilon_dropout=1.0)
    from flax import nnx
    graphdef, params = nnx.split(model, nnx.Param)
    one = jax.tree.map(lambda x: x[:1], _batch(cfg))

    @jax.jit
    def grad_norm(p, key):
        def f(p):
            return compute_losses(nnx.merge(graphdef, p), one, key, jnp.asarray(0),
                                  loss_cfg=lc, model_cfg=cfg)[1]["lm_loss"]
        return jnp.abs(jax.grad(f)(p)["rewrite"]["known_head"]["predictor"][...]).max()

    zero = [float(grad_norm(params, jax.random.key(i))) == 0.0 for i in range(40)]
    assert 0.25 < np.mean(zero) < 0.75


def test_cfg_dropout_feeds_no_known_features(diffusion_model):
    """cfg_dropout = 1 with epsilon dropped: the known head gets no LM gradient."""
    cfg, model = diffusion_model
    _, g, _, m = _lm_grad(model, cfg, _loss_cfg(cfg_dropout=1.0, epsilon_dropout=1.0))
    assert float(m["cfg_dropped"]) == 1.0 and float(jnp.abs(g).max()) == 0.0


def test_unknown_teacher_forcing_restores_the_backbone_path(diffusion_model):
    """Known hard-forced to k_gt and unknown forced to h - k_gt: composed = h exactly, so the
    LM loss equals the loss with epsilon kept, and the backbone gets its gradient back."""
    cfg, model = diffusion_model
    forced = dict(teacher_forcing="hard", teacher_forcing_start=1.0, teacher_forcing_end=1.0)
    kept, _, g_kept, _ = _lm_grad(model, cfg, _loss_cfg(**forced))
    utf, _, g_utf, m = _lm_grad(model, cfg, _loss_cfg(epsilon_dropout=1.0,
                                                       unknown_teacher_forcing=True, **forced))
    no_utf, _, g_no, _ = _lm_grad(model, cfg, _loss_cfg(epsilon_dropout=1.0, **forced))
    assert float(m["unknown_teacher_beta"]) == 1.0
    np.testing.assert_allclose(utf, kept, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_utf), np.asarray(g_kept), rtol=1e-4, atol=1e-8)
    assert float(jnp.abs(g_no).max()) == 0.0        # without it: k_gt + sg(u), no backbone path
    assert abs(no_utf - kept) > 1e-3


def test_reconstruction_target_labels(diffusion_model):
    """reconstruction_target=labels: MSE(u, sg(h - k_gt)), k_gt pooled over the labels."""
    cfg, model = diffusion_model
    lc = _loss_cfg(reconstruction_target="labels", reconstruction_weight=1.0)
    batch = _batch(cfg)
    _, m = compute_losses(model, batch, jax.random.key(0), jnp.asarray(0), loss_cfg=lc,
                          model_cfg=cfg, train=False)
    out = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    emb = np.asarray(model.rewrite.known_head.embedding[...], np.float64)
    ids = np.asarray(batch["concept_ids"])
    k_gt = np.zeros(out.hidden.shape)
    for b, t, s in zip(*np.nonzero(ids >= 0)):
        k_gt[b, t] += emb[ids[b, t, s]]
    diff = np.asarray(out.unknown_features, np.float64) - (np.asarray(out.hidden) - k_gt)
    np.testing.assert_allclose(float(m["reconstruction_loss"]), np.mean(diff ** 2), rtol=1e-4)


def test_independence_report_normalization():
    rng = np.random.default_rng(0)
    u, k = rng.normal(size=(2, 5, 6)), rng.normal(size=(2, 5, 6))
    valid = np.ones((2, 5), bool)
    uc = u.reshape(-1, 6) - u.reshape(-1, 6).mean(0)
    kc = k.reshape(-1, 6) - k.reshape(-1, 6).mean(0)
    ref = np.sum((uc.T @ kc) ** 2) / (36 * 9)
    got = independence_loss(jnp.asarray(u), jnp.asarray(k), jnp.asarray(valid), "report")
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def test_residual_energy_against_numpy():
    """sum_valid ||h - k - u||^2 / sum_valid ||h||^2; its h-gradient is 2 r / E (the
    denominator held), either head's features' -2 r / E; a common scale of h, k, u leaves
    it unchanged."""
    rng = np.random.default_rng(1)
    h, k, u = (rng.normal(size=(2, 5, 6)) for _ in range(3))
    valid = rng.random((2, 5)) < 0.6
    r = h - k - u
    energy = (h[valid] ** 2).sum()
    ref = (r[valid] ** 2).sum() / energy
    def f(hh):
        return residual_energy(hh, jnp.asarray(k), jnp.asarray(u), jnp.asarray(valid))
    np.testing.assert_allclose(float(f(jnp.asarray(h))), ref, rtol=1e-5)
    np.testing.assert_allclose(float(residual_energy(*(jnp.asarray(3.0 * x) for x in (h, k, u)),
                                                     jnp.asarray(valid))), ref, rtol=1e-5)
    g = np.asarray(jax.grad(f)(jnp.asarray(h, jnp.float32)))
    np.testing.assert_allclose(g, 2 * r * valid[..., None] / energy, rtol=1e-4, atol=1e-7)
    gu, gk = jax.grad(lambda uu, kk: residual_energy(jnp.asarray(h), kk, uu, jnp.asarray(valid)),
                      argnums=(0, 1))(jnp.asarray(u, jnp.float32), jnp.asarray(k, jnp.float32))
    for grad in (gu, gk):
        np.testing.assert_allclose(np.asarray(grad), -2 * r * valid[..., None] / energy,
                                   rtol=1e-4, atol=1e-7)
    assert float(residual_energy(jnp.asarray(k + u), jnp.asarray(k), jnp.asarray(u),
                                 jnp.asarray(valid))) < 1e-12


def test_epsilon_weight_pulls_the_backbone_toward_the_concepts(diffusion_model):
    """loss.epsilon_weight adds w * L_eps, measured at the masked positions of the LM stream,
    and sends it into the backbone; eval logs the term at weight 0, where it adds nothing."""
    cfg, model = diffusion_model
    from flax import nnx
    graphdef, params = nnx.split(model, nnx.Param)
    batch = _batch(cfg)

    def run(weight):
        lc = _loss_cfg(epsilon_weight=weight, diffusion_clean_context=False)

        def f(p):
            return compute_losses(nnx.merge(graphdef, p), batch, jax.random.key(3),
                                  jnp.asarray(0), loss_cfg=lc, model_cfg=cfg, train=False)
        (total, met), g = jax.value_and_grad(f, has_aux=True)(params)
        return float(total), met, g["backbone"]["blocks"]["mlp_norm"]["scale"][...]

    t0, m0, g0 = run(0.0)
    t1, m1, g1 = run(2.0)
    # the independent value: the rewrite's own parts at the corrupted stream's masked tokens
    out, masked = _masked_forward(model, batch, jax.random.key(3), _loss_cfg().diffusion_t_min)
    h = np.asarray(out.hidden, np.float64)
    r = h - np.asarray(out.known_features, np.float64) - np.asarray(out.unknown_features, np.float64)
    mk = np.asarray(masked)
    ref = (r[mk] ** 2).sum() / (h[mk] ** 2).sum()
    np.testing.assert_allclose(float(m0["residual_energy_loss"]), ref, rtol=1e-4)
    np.testing.assert_allclose(t1 - t0, 2.0 * ref, rtol=1e-3)
    assert float(jnp.abs(g1 - g0).max()) > 1e-6     # the term reaches the backbone


def test_pooled_concept_term_is_wired_with_the_concept_weight(diffusion_model):
    """loss.concept_pooled_weight w adds concept_weight * w * the pooled chunk term (checked
    against numpy in test_fidelity_metrics) to the total, and logs it only when on."""
    cfg, model = diffusion_model
    batch = _batch(cfg)

    def run(w):
        lc = _loss_cfg(concept_pooled_weight=w, concept_positives="token", concept_weight=0.5)
        total, met = compute_losses(model, batch, jax.random.key(3), jnp.asarray(0),
                                    loss_cfg=lc, model_cfg=cfg, train=False)
        return float(total), met

    t0, m0 = run(0.0)
    t1, m1 = run(2.0)
    assert "concept_pooled_loss" not in m0 and float(m1["concept_pooled_loss"]) > 0
    assert t1 - t0 > 0
    np.testing.assert_allclose(t1 - t0, 0.5 * 2.0 * float(m1["concept_pooled_loss"]), rtol=1e-4)


def test_bad_loss_fields_are_named():
    c = base_config()
    c.loss.teacher_forcing, c.loss.cfg_dropout = "sometimes", 1.5
    with pytest.raises(ValueError, match=r"(?s)loss.teacher_forcing.*'sometimes'.*loss.cfg_dropout"):
        check_loss_config(c.loss)


# ------------------------------------------------------------------ metrics --------------

def test_eval_reports_loss_without_epsilon(diffusion_model):
    """eval lm_loss_no_epsilon = masked CE-based loss of (known + unknown) W^T, from the
    model's own parts; shares are measured at the masked positions only."""
    cfg, model = diffusion_model
    lc = _loss_cfg(diffusion_clean_context=False, diffusion_weighting="uniform")
    batch = _batch(cfg)
    _, m = compute_losses(model, batch, jax.random.key(3), jnp.asarray(0), loss_cfg=lc,
                          model_cfg=cfg, train=False)
    out, masked = _masked_forward(model, batch, jax.random.key(3), lc.diffusion_t_min)
    w = np.asarray(model.unembedding(), np.float64)
    kn, un = np.asarray(out.known_features, np.float64), np.asarray(out.unknown_features, np.float64)
    ce = np.asarray(token_cross_entropy(jnp.asarray((kn + un) @ w.T), batch["tokens"]))
    mk = np.asarray(masked)
    np.testing.assert_allclose(float(m["lm_loss_no_epsilon"]), ce[mk].mean(), rtol=1e-4)
    eps = np.asarray(out.composed, np.float64) - kn - un
    wy = w[np.asarray(batch["tokens"])]
    parts = [np.abs((x * wy).sum(-1)) for x in (kn, un, eps)]
    share_eps = (parts[2] / (parts[0] + parts[1] + parts[2]))[mk].mean()
    np.testing.assert_allclose(float(m["share_epsilon"]), share_eps, rtol=1e-4)


def test_autoregressive_labels_follow_the_predicted_token():
    """Position t carries the labels (and chunk) of token t+1 inside its document."""
    ids = np.array([[[1], [1], [2], [5], [5], [-1]]])
    chunks = np.array([[1, 1, 2, 3, 3, 0]])
    seg = np.array([[1, 1, 1, 2, 2, 0]])
    got_ids, got_chunks = align_labels_to_predictions(jnp.asarray(ids), jnp.asarray(chunks),
                                                      jnp.asarray(seg), "autoregressive")
    np.testing.assert_array_equal(np.asarray(got_ids)[0, :, 0], [1, 2, -1, 5, -1, -1])
    np.testing.assert_array_equal(np.asarray(got_chunks)[0], [1, 2, 0, 3, 0, 0])
    same_ids, same_chunks = align_labels_to_predictions(jnp.asarray(ids), jnp.asarray(chunks),
                                                        jnp.asarray(seg), "diffusion")
    assert np.array_equal(np.asarray(same_ids), ids) and np.array_equal(np.asarray(same_chunks),
                                                                        chunks)


def test_autoregressive_concept_loss_reads_the_next_tokens_labels():
    """AR concept loss on a batch equals the diffusion-aligned loss on the labels shifted by
    hand: the alignment is applied where compute_losses scores concepts."""
    cfg = tiny_config(objective="autoregressive", attention="causal")
    model = make_model(cfg)
    batch = _batch(cfg)
    lc = _loss_cfg(concept_weight=1.0)
    _, m = compute_losses(model, batch, jax.random.key(0), jnp.asarray(0), loss_cfg=lc,
                          model_cfg=cfg, train=False)
    ids, ch = np.asarray(batch["concept_ids"]), np.asarray(batch["chunk_segment_ids"])
    seg = np.asarray(batch["segment_ids"])
    sh_ids, sh_ch = np.full_like(ids, -1), np.zeros_like(ch)
    for b in range(B):
        for t in range(T - 1):
            if seg[b, t] == seg[b, t + 1] > 0:
                sh_ids[b, t], sh_ch[b, t] = ids[b, t + 1], ch[b, t + 1]
    from cbm_lm.objectives import chunk_concept_loss
    out = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    ref, _ = chunk_concept_loss(model.rewrite.known_head, out.hidden, jnp.asarray(sh_ids),
                                jnp.asarray(sh_ch), out.known.topk_indices,
                                jax.random.split(jax.random.key(0), 5)[2],
                                n_negatives=lc.concept_negatives)
    np.testing.assert_allclose(float(m["concept_loss"]), float(ref), rtol=1e-5)


def test_context_window_cuts_attention_into_windows():
    """local_windows: while active, no attention crosses a window or a document boundary;
    afterwards the real documents are back."""
    from cbm_lm.model.attention import attention_mask
    from cbm_lm.train.losses import local_windows
    seg = jnp.asarray([[1] * 10 + [2] * 6])
    pos = jnp.asarray([list(range(10)) + list(range(6))])
    local = local_windows(seg, pos, 4, 0.1, 0.5)
    mask = np.asarray(attention_mask(pos, local, "causal", 4))[0, 0]
    window = np.asarray(seg)[0] * 100 + np.asarray(pos)[0] // 4
    expect = (window[:, None] == window[None, :]) & (np.arange(16)[None] <= np.arange(16)[:, None])
    np.testing.assert_array_equal(mask, expect)
    np.testing.assert_array_equal(np.asarray(local_windows(seg, pos, 4, 0.6, 0.5)), np.asarray(seg))


def test_known_head_sized_to_the_corpus(capsys):
    from cbm_lm.train.corpus_check import resolve_known_concepts
    c = base_config()
    c.model.concepts.n_known, c.model.concepts.known_topk = 256, 8
    resolve_known_concepts(c, {"num_concepts": 153})
    assert c.model.concepts.n_known == 256                     # off by default
    c.data.known_concepts_from_corpus = True
    resolve_known_concepts(c, {"num_concepts": 153})
    assert c.model.concepts.n_known == 153
    assert "model.concepts.n_known 256 -> 153" in capsys.readouterr().out   # never silent
    c.model.concepts.known_topk = 200
    resolve_known_concepts(c, {"num_concepts": 153})
    assert c.model.concepts.known_topk == 153
    assert "known_topk 200 -> 153" in capsys.readouterr().out
    with pytest.raises(ValueError, match="num_concepts=0"):
        resolve_known_concepts(c, {"num_concepts": 0})
