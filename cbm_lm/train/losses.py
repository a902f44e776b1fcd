"""The training loss: LM objective + concept terms, each weighted and logged.

  loss = w_lm * L_lm + w_c * L_concept + w_rec * L_reconstruction + w_ind * L_independence

L_lm is masked diffusion (block-causal) or next-token CE (causal), per
``model.objective``. With ``loss.diffusion_clean_context`` the diffusion loss
runs two streams in one pass, [noisy | clean], so every noised block is
predicted from clean earlier blocks, as at generation time; the concept terms
then read the clean stream. Per step, each sequence drops epsilon with probability
``loss.epsilon_dropout`` (so the LM loss trains the concept paths) and the
known features are teacher-forced with strength alpha(step) towards the
pooled label embeddings. Concept health is measured on the same batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cbm_lm import objectives as obj
from cbm_lm.objectives.steering_loss import steering_loss


def _logit_shares(out, unembedding, targets, valid):
    """Mean share of |logit_y| carried by known / unknown / epsilon at real tokens.

    contribution_x = x . W_y for x in (known, unknown, residual); share_x =
    |c_x| / (|c_known| + |c_unknown| + |c_eps|), averaged over valid tokens.
    """
    w_y = jnp.take(unembedding, targets, axis=0).astype(jnp.float32)           # [B,T,D]
    parts = [jnp.abs(jnp.sum(x.astype(jnp.float32) * w_y, -1))
             for x in (out.known_features, out.unknown_features, out.residual)]
    total = parts[0] + parts[1] + parts[2] + 1e-12
    vf = valid.astype(jnp.float32)
    n = jnp.maximum(vf.sum(), 1.0)
    return {name: jnp.sum(vf * p / total) / n
            for name, p in zip(("share_known", "share_unknown", "share_epsilon"), parts)}


def _dead_fraction(indices, valid, n_concepts):
    """Fraction of concepts never in any valid token's active set in this batch."""
    hits = jnp.zeros((n_concepts,), jnp.int32).at[indices.reshape(-1)].add(
        jnp.broadcast_to(valid[..., None], indices.shape).reshape(-1).astype(jnp.int32))
    return jnp.mean((hits == 0).astype(jnp.float32))


def _steering_term(model, batch, rng, step, loss_cfg, model_cfg):
    """The steering loss every loss.steering_period steps (zeros in between)."""
    layer = loss_cfg.get("steering_layer", -1)
    layer = model_cfg.n_layers // 2 if layer < 0 else layer

    def run():
        return steering_loss(model, batch["tokens"], batch["segment_ids"], batch["positions"],
                             batch["concept_ids"], rng,
                             diffusion=model_cfg.objective == "diffusion",
                             mask_id=model_cfg.resolved_mask_token_id,
                             target=loss_cfg.get("steering_target", 8.0), layer=layer)

    shapes = jax.eval_shape(run)
    on = jnp.asarray(step) % max(int(loss_cfg.get("steering_period", 1)), 1) == 0
    return jax.lax.cond(on, run, lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                      shapes))


def compute_losses(model, batch, rng, step, *, loss_cfg, model_cfg, train: bool = True):
    """Returns (total loss, metrics dict of scalars). ``batch`` follows the data contract."""
    tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    valid = seg > 0
    b = tokens.shape[0]
    rng_mask, rng_eps, rng_neg = jax.random.split(rng, 3)

    diffusion = model_cfg.objective == "diffusion"
    two_stream = diffusion and loss_cfg.diffusion_clean_context
    if diffusion:
        inputs, masked, t = obj.corrupt(rng_mask, tokens, seg, pos,
                                        block_size=model_cfg.diffusion_block_size,
                                        mask_id=model_cfg.resolved_mask_token_id,
                                        t_min=loss_cfg.diffusion_t_min)
    else:
        inputs = tokens
    stream = None
    if two_stream:   # [noisy | clean] at the same positions (model/attention.py)
        seq_len = tokens.shape[1]
        inputs = jnp.concatenate([inputs, tokens], axis=1)
        stream = jnp.concatenate([jnp.zeros_like(seg), jnp.ones_like(seg)], axis=1)
        pos_in, seg_in = jnp.concatenate([pos, pos], 1), jnp.concatenate([seg, seg], 1)
    else:
        pos_in, seg_in = pos, seg

    head = model.rewrite.known_head
    teacher, alpha = None, 0.0
    drop_eps = False
    if train:
        p_drop = obj.epsilon_dropout_prob(step, loss_cfg.epsilon_dropout)
        drop_eps = obj.sample_epsilon_dropout(rng_eps, b, p_drop)
        alpha = obj.teacher_forcing_alpha(step, loss_cfg.teacher_forcing_start,
                                          loss_cfg.teacher_forcing_end,
                                          loss_cfg.teacher_forcing_steps)
        teacher = obj.pooled_label_features(head, batch["concept_ids"])
        if two_stream:
            teacher = jnp.concatenate([teacher, teacher], axis=1)
    full = model(inputs, positions=pos_in, segment_ids=seg_in, stream=stream,
                 drop_epsilon=drop_eps, teacher_features=teacher, teacher_alpha=alpha)
    if two_stream:
        # The LM loss reads the noisy stream; the concept terms read the clean
        # stream, the representation of the text itself.
        noisy_logits = full.logits[:, :seq_len]
        out = jax.tree.map(lambda x: x[:, seq_len:] if x.ndim >= 2 else x, full)
    else:
        noisy_logits, out = full.logits, full

    metrics = {}
    chunk = loss_cfg.get("ce_chunk_tokens", 0)
    if chunk:   # [B,T,V] never whole: the model's logits go unused and XLA drops them
        x = full.composed[:, :seq_len] if two_stream else full.composed
        targets_lm = tokens if diffusion else jnp.roll(tokens, -1, axis=1)
        ce, hit = obj.chunked_token_ce(x, model.unembedding(), targets_lm, chunk)
    if diffusion:
        lm_loss, lm_aux = (obj.diffusion_loss_from_ce(ce, hit, masked, t, seg) if chunk else
                           obj.diffusion_loss(noisy_logits, tokens, masked, t, seg))
        metrics.update(masked_ce=lm_aux["masked_ce"], masked_acc=lm_aux["masked_acc"])
    else:
        lm_loss, lm_aux = (obj.next_token_loss_from_ce(ce[:, :-1], hit[:, :-1], seg) if chunk
                           else obj.next_token_loss(out.logits, tokens, seg))
        metrics.update(next_token_acc=lm_aux["accuracy"])

    concept_loss, c_aux = obj.chunk_concept_loss(
        head, out.hidden, batch["concept_ids"], batch["chunk_segment_ids"],
        out.known.topk_indices, rng_neg, n_negatives=loss_cfg.concept_negatives,
        pos_weight=loss_cfg.concept_pos_weight, neg_weight=loss_cfg.concept_neg_weight)
    if out.unknown is not None:
        rec = obj.reconstruction_loss(out.unknown_features, out.hidden, out.known.features, valid)
        ind = obj.independence_loss(out.unknown_features, out.known.features, valid)
    else:
        rec = ind = jnp.zeros((), jnp.float32)

    terms = {"lm_loss": (loss_cfg.lm_weight, lm_loss),
             "concept_loss": (loss_cfg.concept_weight, concept_loss),
             "reconstruction_loss": (loss_cfg.reconstruction_weight, rec),
             "independence_loss": (loss_cfg.independence_weight, ind)}
    steer_w = loss_cfg.get("steering_weight", 0.0)
    if train and steer_w:    # optional steering training (objectives/steering_loss.py)
        st, st_metrics = _steering_term(model, batch, jax.random.fold_in(rng, 11), step,
                                        loss_cfg, model_cfg)
        terms["steering_loss"] = (steer_w, st)
        metrics.update(st_metrics)
    total = sum(w * v for w, v in terms.values())
    for name, (w, v) in terms.items():
        metrics[name] = v
        metrics[name.replace("_loss", "_weight")] = jnp.asarray(w, jnp.float32)
    metrics.update(loss=total, concept_pos_loss=c_aux["pos_loss"],
                   concept_neg_loss=c_aux["neg_loss"], concept_auroc=c_aux["auroc"],
                   concept_pos_detected=c_aux["pos_detected"],
                   teacher_alpha=jnp.asarray(alpha, jnp.float32),
                   epsilon_dropped=jnp.mean(jnp.asarray(drop_eps, jnp.float32)),
                   real_tokens=valid.sum().astype(jnp.float32))
    sg = jax.lax.stop_gradient
    targets = tokens if diffusion else jnp.roll(tokens, -1, axis=1)
    metrics.update(_logit_shares(sg(out), sg(model.unembedding()), targets, valid))
    metrics["dead_known_fraction"] = _dead_fraction(out.known.topk_indices, valid,
                                                    model_cfg.concepts.n_known)
    return total, metrics
