"""compute_losses against a numpy reference on a tiny batch, every loss term, both objectives.

The reference recomputes the concept rewrite (top-k, sigmoid weights, teacher
forcing, dropped epsilon, tied unembedding) and every loss term in float64
numpy from the parameters and the backbone's hidden states. Only the random
draws (diffusion masks, sampled negative ids) are taken from the library's
samplers, with the same keys compute_losses splits from its rng: they are the
reference's inputs, not what it checks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cbm_lm import objectives as obj
from cbm_lm.config import ConceptConfig, ModelConfig
from cbm_lm.default_config import base_config
from cbm_lm.model import ConceptBottleneckLM
from cbm_lm.train.losses import compute_losses

B, T, K, V = 2, 16, 3, 53
STEP = 5          # teacher forcing alpha = 1 + (0 - 1) * 5/10 = 0.5


def _setup(objective):
    attention = "causal" if objective == "autoregressive" else "block_causal"
    cfg = ModelConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=32,
                      max_seq_len=64, diffusion_block_size=4, attention=attention,
                      objective=objective, init_std=0.3,
                      concepts=ConceptConfig(n_known=20, known_topk=3, n_unknown=24,
                                             unknown_rank=4, unknown_topk=3, block_size=8,
                                             dense_threshold=100)).validate()
    loss_cfg = base_config().loss
    loss_cfg.update(dict(lm_weight=1.0, concept_weight=0.7, concept_pos_weight=1.3,
                         concept_neg_weight=0.9, concept_negatives=5, reconstruction_weight=0.5,
                         independence_weight=2.0, diffusion_t_min=0.3,
                         diffusion_clean_context=True, epsilon_dropout=1.0,
                         teacher_forcing_start=1.0, teacher_forcing_end=0.0,
                         teacher_forcing_steps=10))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V - 1, (B, T)).astype(np.int32)
    # Row 0: two documents (9 + 5 tokens) and padding; row 1: one document.
    seg = np.array([[1] * 9 + [2] * 5 + [0] * 2, [1] * T], np.int32)
    pos = np.array([list(range(9)) + list(range(5)) + [0, 0], list(range(T))], np.int32)
    chunk = np.array([[1] * 4 + [2] * 5 + [3] * 5 + [0] * 2, [1] * 6 + [2] * 10], np.int32)
    labels = {(0, 1): [3, 7, -1], (0, 2): [11, -1, -1], (0, 3): [3, 3, 19],
              (1, 1): [0, 5, 12], (1, 2): [-1, -1, -1]}
    cids = np.full((B, T, K), -1, np.int32)
    for (r, c), ids in labels.items():
        cids[r, chunk[r] == c] = ids
    batch = {"tokens": tokens, "segment_ids": seg, "positions": pos, "concept_ids": cids,
             "chunk_segment_ids": chunk}
    model = ConceptBottleneckLM(cfg, rngs=nnx.Rngs(1))
    return cfg, loss_cfg, model, {k: jnp.asarray(v) for k, v in batch.items()}


def _p(x):
    return np.asarray(x, np.float64)


def _softplus(x):
    return np.logaddexp(0.0, x)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _ce(logits, target):
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    return lse - np.take_along_axis(logits, target[..., None], -1)[..., 0]


def _head(q, keys, values, n, k, clip=15.0):
    """Top-k of clip(q keys^T) -> (ids [N,k], features-in-value-space [N,V'], logits [N,n])."""
    z = np.clip(q @ keys[:n].T, -clip, clip)
    ids = np.argsort(-z, axis=-1)[:, :k]
    w = _sigmoid(np.take_along_axis(z, ids, -1))
    return ids, np.einsum("nk,nkv->nv", w, values[ids]), z


def _reference(cfg, loss_cfg, model, batch, rng):
    diffusion = cfg.objective == "diffusion"
    tok, seg, pos = (np.asarray(batch[k]) for k in ("tokens", "segment_ids", "positions"))
    cids, chunk = np.asarray(batch["concept_ids"]), np.asarray(batch["chunk_segment_ids"])
    if not diffusion:   # AR: a position carries the labels of the token it predicts (t+1)
        same = np.zeros_like(seg, bool)
        same[:, :-1] = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] > 0)
        cids = np.where(same[..., None], np.roll(cids, -1, 1), -1)
        chunk = np.where(same, np.roll(chunk, -1, 1), 0)
    rng_mask, _, rng_neg, _, _ = jax.random.split(rng, 5)     # compute_losses' draws
    if diffusion:
        noisy, masked, t = map(np.asarray, obj.corrupt(
            rng_mask, batch["tokens"], batch["segment_ids"], batch["positions"],
            block_size=cfg.diffusion_block_size, mask_id=cfg.resolved_mask_token_id,
            t_min=loss_cfg.diffusion_t_min))
        inputs = np.concatenate([noisy, tok], 1)
        stream = np.concatenate([np.zeros_like(seg), np.ones_like(seg)], 1)
        h = model.backbone(jnp.asarray(inputs), positions=jnp.asarray(np.concatenate([pos, pos], 1)),
                           segment_ids=jnp.asarray(np.concatenate([seg, seg], 1)),
                           stream=jnp.asarray(stream))
    else:
        h = model.backbone(batch["tokens"], positions=batch["positions"],
                           segment_ids=batch["segment_ids"])
    h = _p(h)
    s = h.shape[1]
    hf = h.reshape(-1, h.shape[-1])
    kh, uh = model.rewrite.known_head, model.rewrite.unknown_head
    cc = cfg.concepts
    known_ids, known, z_known = _head(hf, _p(kh.predictor[...]), _p(kh.embedding[...]),
                                      cc.n_known, cc.known_topk)
    _, mixed, _ = _head(hf @ _p(uh.predictor_down[...]), _p(uh.predictor_up[...]),
                        _p(uh.embedding_coef[...]), cc.n_unknown, cc.unknown_topk)
    unknown = mixed @ _p(uh.embedding_basis[...])
    # Teacher features: the sum of E over each token's distinct labels (both streams).
    emb = _p(kh.embedding[...])
    teacher = np.zeros((B, T, h.shape[-1]))
    for b in range(B):
        for i in range(T):
            for j in set(cids[b, i][cids[b, i] >= 0].tolist()):
                teacher[b, i] += emb[j]
    if diffusion:
        teacher = np.concatenate([teacher, teacher], 1)
    alpha = 0.5
    known_used = known + alpha * (teacher.reshape(-1, h.shape[-1]) - known)
    composed = known_used + unknown                         # epsilon dropped (p = 1)
    logits = (composed @ _p(model.unembedding()).T).reshape(B, s, V)

    real = seg > 0
    if diffusion:
        m = masked & real
        lm = (np.where(m, _ce(logits[:, :T], tok) / np.where(m, t, 1.0), 0.0).sum()
              / real.sum())
        sl = slice(T, 2 * T)                                # concept terms: the clean stream
    else:
        pairs = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] > 0)
        lm = _ce(logits[:, :-1], tok[:, 1:])[pairs].mean()
        sl = slice(0, T)

    def view(x):
        return x.reshape(B, s, -1)[:, sl]

    z, kn, un, hh = view(z_known), view(known), view(unknown), h[:, sl]
    top = view(known_ids)
    neg_ids = np.asarray(obj.sample_negative_ids(rng_neg, loss_cfg.concept_negatives, cc.n_known))
    pos_terms, neg_terms = [], []
    for b in range(B):
        for c in sorted(set(chunk[b][chunk[b] > 0].tolist())):
            toks = np.nonzero(chunk[b] == c)[0]
            positives = set(cids[b, toks[0]][cids[b, toks[0]] >= 0].tolist())
            for j in sorted(positives):                     # soft-OR over the chunk
                S = _softplus(z[b, toks, j]).sum()
                pos_terms.append(-np.log(1.0 - np.exp(-S)))
            for i in toks:                                  # per-token negatives
                for j in neg_ids:
                    if j not in positives:
                        neg_terms.append(_softplus(z[b, i, j]))
                for j in top[b, i]:
                    if j not in positives and j not in set(neg_ids.tolist()):
                        neg_terms.append(_softplus(z[b, i, j]))
    pos_loss, neg_loss = np.mean(pos_terms), np.mean(neg_terms)
    concept = loss_cfg.concept_pos_weight * pos_loss + loss_cfg.concept_neg_weight * neg_loss

    v = real.reshape(-1)
    u, kk, hv = un.reshape(-1, 16)[v], kn.reshape(-1, 16)[v], hh.reshape(-1, 16)[v]
    rec = np.mean((u - (hv - kk)) ** 2)
    cov = (u - u.mean(0)).T @ (kk - kk.mean(0)) / len(u)
    ind = np.sum(cov ** 2) / 16 ** 2
    total = (loss_cfg.lm_weight * lm + loss_cfg.concept_weight * concept
             + loss_cfg.reconstruction_weight * rec + loss_cfg.independence_weight * ind)
    return dict(lm_loss=lm, concept_loss=concept, concept_pos_loss=pos_loss,
                concept_neg_loss=neg_loss, reconstruction_loss=rec, independence_loss=ind,
                loss=total)


@pytest.mark.parametrize("objective", ["diffusion", "autoregressive"])
def test_compute_losses_matches_numpy(objective):
    cfg, loss_cfg, model, batch = _setup(objective)
    rng = jax.random.key(7)
    # jitted, as the train step runs it (and one compile: 4.8 CPU s against 13.9 op by op)
    losses = nnx.jit(lambda m, b, r: compute_losses(m, b, r, STEP, loss_cfg=loss_cfg,
                                                    model_cfg=cfg))
    total, metrics = losses(model, batch, rng)
    want = _reference(cfg, loss_cfg, model, batch, rng)
    for name, value in want.items():
        np.testing.assert_allclose(float(metrics[name]), value, rtol=2e-5, atol=1e-6,
                                   err_msg=name)
    np.testing.assert_allclose(float(total), want["loss"], rtol=2e-5)
    assert float(metrics["teacher_alpha"]) == 0.5 and float(metrics["epsilon_dropped"]) == 1.0
