"""The training loss: LM objective + concept terms, each weighted and logged.

  loss = w_lm * L_lm + w_c * L_concept + w_rec * L_reconstruction + w_ind * L_independence
         [+ w_eps * L_residual_energy] [+ w_p * L_provenance_contrastive]

L_residual_energy (``loss.epsilon_weight``, 0 = off) is measured where the LM loss is (the
noisy stream's masked positions, or the next-token positions): the share of the backbone
state's energy the concepts leave to epsilon there (objectives/regularizers.py).

The last term (provenance.contrastive_weight, when the model carries the learned key head)
is the key head's InfoNCE between two views of each chunk from this same pass: the noisy and
clean streams of two-stream diffusion, else two token-dropout views
(objectives/key_contrastive.py); it trains only the head's W.

L_lm is masked diffusion (block-causal) or next-token CE (causal), per
``model.objective``. With ``loss.diffusion_clean_context`` the diffusion loss runs
two streams in one pass, [noisy | clean], so every noised block is predicted from
clean earlier blocks, as at generation time. Only the stream whose loss is used is
unembedded (the noisy one); the concept terms read the clean stream, the
representation of the text itself.

Training-time routing of the concept rewrite (all config switches, section ``loss``):
  epsilon dropout       per sequence, P = epsilon_dropout: composed = known + unknown
  known teacher forcing alpha(step) ("linear" or the report's schedule); "soft" mixes
                        pred + alpha (k_gt - pred), "hard" substitutes k_gt for a whole
                        sequence with probability alpha
  CFG dropout           per sequence, P = cfg_dropout: the known features fed forward are 0
  unknown teacher forcing  in epsilon-dropped sequences the unknown slot becomes
                        sg(u) + beta (h - k_gt - sg(u)), beta held then decayed
k_gt is the pooled ground-truth label embedding of the token each position predicts
(objectives/label_alignment.py). Eval (train=False) uses none of these, uniform t, and
also reports the loss of the concept path alone (``lm_loss_no_epsilon``).

Context-length curriculum (``loss.context_window``): attention is confined to windows of
that many positions for the first ``context_window_until`` of training (local_windows).

AR-to-diffusion adaptation (diffusion models; DiffuLLaMA / Dream style), in one run:
  step < round(ar_warmup_fraction * S)   next-token CE on clean tokens, causal attention
                                         (the block-causal mask with lookahead 0)
  after                                  masked diffusion; for mask_anneal_fraction * S
                                         steps the mask's lookahead widens 0 -> b - 1
                                         (causal -> block-causal), then block-causal
The phase is a function of the step (objectives/schedules.py), so a resumed run picks it
up; the two phases are the branches of one lax.cond. With ``model.diffusion_shift`` the
diffusion phase predicts token i from position i-1 (model/lm.py): the next-token
weights of the warmup are then the diffusion model's starting point, not just its
features. Eval always scores the diffusion objective with the final (block-causal) mask.

Logit shares are measured where the LM loss is: at the noisy stream's masked positions
(diffusion) or the next-token positions (AR), against the token predicted there.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cbm_lm import objectives as obj
from cbm_lm.config import Problems, _as_dict
from cbm_lm.config_validation import check_loss_fields
from cbm_lm.model.lm import shift_to_predictions
from cbm_lm.objectives.steering_loss import steering_loss

def concept_term_options(loss_cfg) -> dict:
    """The concept term's settings from the loss config (objectives.chunk_concept_loss's
    keyword arguments), shared by the train step and the known-key refit (train/key_refit.py)."""
    return dict(n_negatives=loss_cfg.concept_negatives, pos_weight=loss_cfg.concept_pos_weight,
                neg_weight=loss_cfg.concept_neg_weight,
                positives=loss_cfg.get("concept_positives", "soft_or"),
                balance=loss_cfg.get("concept_balance", "none"))


def check_loss_config(loss_cfg) -> None:
    """Raises ConfigError (a ValueError) naming every ``loss.*`` field compute_losses cannot use.

    The rules live in config_validation (validate_config applies them at start-up too).
    """
    p = Problems()
    check_loss_fields(_as_dict(loss_cfg), p)
    p.raise_if_any()


def _logit_shares(known, unknown, residual, unembedding, targets, where):
    """Mean share of |logit_y| carried by known / unknown / residual at ``where`` tokens.

    contribution_x = x . W_y for x in (known, unknown, residual) [B,T,D]; share_x =
    |c_x| / (|c_known| + |c_unknown| + |c_eps|), averaged over the tokens in ``where`` [B,T].
    """
    w_y = jnp.take(unembedding, targets, axis=0).astype(jnp.float32)           # [B,T,D]
    parts = [jnp.abs(jnp.sum(x.astype(jnp.float32) * w_y, -1)) for x in (known, unknown, residual)]
    total = parts[0] + parts[1] + parts[2] + 1e-12
    wf = where.astype(jnp.float32)
    n = jnp.maximum(wf.sum(), 1.0)
    return {name: jnp.sum(wf * p / total) / n
            for name, p in zip(("share_known", "share_unknown", "share_epsilon"), parts)}


def _dead_fraction(indices, valid, n_concepts):
    """Fraction of the n_concepts real concepts never in any valid token's top-k in this batch."""
    hits = jnp.zeros((n_concepts,), jnp.int32).at[indices.reshape(-1)].add(
        jnp.broadcast_to(valid[..., None], indices.shape).reshape(-1).astype(jnp.int32))
    return jnp.mean((hits == 0).astype(jnp.float32))


def local_windows(seg, pos, window: int, frac, until: float):
    """Attention segment ids for the context-length curriculum, [B,T] -> [B,T].

    While the training fraction ``frac`` < ``until``, every document is cut into
    windows of ``window`` positions (pos // window) that attention does not cross;
    afterwards the ids are ``seg`` unchanged. Only attention reads them: losses and
    labels keep the real documents. A short context makes the few useful neighbours
    a large share of what uniform early attention averages, so the model learns to
    read them (masked diffusion has no other route to its neighbours' tokens).
    """
    n_windows = seg.shape[1] // window + 1
    local = jnp.where(seg > 0, seg * n_windows + pos // window + 1, 0)
    return jnp.where(jnp.asarray(frac) < until, local, seg).astype(seg.dtype)


def predicted_positions(tokens, seg, masked, diffusion):
    """(targets [B,T], where [B,T] bool): the token each scored position predicts."""
    if diffusion:
        return tokens, masked & (seg > 0)
    pairs = obj.next_token_pairs(seg)
    return jnp.roll(tokens, -1, axis=1), jnp.concatenate([pairs, jnp.zeros_like(pairs[:, :1])], 1)


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


class ForwardViews(NamedTuple):
    """What the pass computed about the text itself, for chunk keys and the source mass
    (``return_views``): the concept stream's hidden [B,T,D] and concept activations, and
    the LM stream's next-token losses nll [B,T-1] (autoregressive; None for diffusion)."""
    hidden: jax.Array
    known: object
    unknown: object
    nll: jax.Array | None


def compute_losses(model, batch, rng, step, *, loss_cfg, model_cfg, train: bool = True,
                   return_views: bool = False, key_tables=None):
    """Returns (total loss, metrics dict of scalars), plus ForwardViews with ``return_views``.
    ``batch`` follows the data contract; key_tables: the key head's ``placed_tables`` for
    the contrastive term (drawn in the step when None).

    Dispatches between the AR warmup and diffusion phases (module docstring); the metrics
    are the union of both phases' (0 where a phase has none) plus ``ar_phase`` (1 / 0),
    and the views those of a diffusion model (no next-token nll) in both phases.
    """
    check_loss_config(loss_cfg)
    ar_frac = loss_cfg.get("ar_warmup_fraction", 0.0)
    anneal = loss_cfg.get("mask_anneal_fraction", 0.0)
    total = loss_cfg.schedule_steps
    adapting = train and model_cfg.objective == "diffusion"
    lookahead = None
    if adapting and anneal > 0:
        lookahead = obj.mask_lookahead(step, ar_frac, anneal, total,
                                       model_cfg.diffusion_block_size)

    def run(objective, la):
        return lambda: _losses(model, batch, rng, step, loss_cfg=loss_cfg, model_cfg=model_cfg,
                               train=train, objective=objective, lookahead=la,
                               return_views=return_views, key_tables=key_tables)

    if not (adapting and ar_frac > 0):
        return run(model_cfg.objective, lookahead)()
    ar, diff = run("autoregressive", jnp.zeros((), jnp.int32)), run("diffusion", lookahead)
    shapes = {**jax.eval_shape(ar)[1], **jax.eval_shape(diff)[1]}

    def padded(branch, phase):
        def f():
            total_loss, m, *views = branch()
            full = {k: m[k] if k in m else jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}
            out = (total_loss, dict(full, ar_phase=jnp.asarray(phase, jnp.float32)))
            return out + tuple(v._replace(nll=None) for v in views)
        return f

    return jax.lax.cond(obj.in_ar_phase(step, ar_frac, total), padded(ar, 1.0),
                        padded(diff, 0.0))


def _losses(model, batch, rng, step, *, loss_cfg, model_cfg, train, objective, lookahead,
            return_views=False, key_tables=None):
    """compute_losses for one ``objective`` (static) and attention ``lookahead`` (None:
    the model's own mask)."""
    tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    valid = seg > 0
    b, seq_len = tokens.shape
    rng_mask, rng_eps, rng_neg, rng_tf, rng_cfg = jax.random.split(rng, 5)
    frac = obj.training_fraction(step, loss_cfg.schedule_steps)
    concept_ids, chunk_ids = obj.align_labels_to_predictions(
        batch["concept_ids"], batch["chunk_segment_ids"], seg, objective)

    diffusion = objective == "diffusion"
    two_stream = diffusion and loss_cfg.diffusion_clean_context
    masked = t = None
    if diffusion:
        centre = (loss_cfg.diffusion_noise_center_start + frac
                  * (loss_cfg.diffusion_noise_center_end - loss_cfg.diffusion_noise_center_start))
        inputs, masked, t = obj.corrupt(
            rng_mask, tokens, seg, pos, block_size=model_cfg.diffusion_block_size,
            mask_id=model_cfg.resolved_mask_token_id, t_min=loss_cfg.diffusion_t_min,
            # Eval always scores uniform t over [t_min, 1], whatever the training curriculum.
            t_max=loss_cfg.diffusion_t_max if train else 1.0,
            noise=loss_cfg.diffusion_noise if train else "uniform",
            center=centre, sigma=loss_cfg.diffusion_noise_sigma)
    else:
        inputs = tokens
    seg_attn = seg
    if diffusion and loss_cfg.context_window % model_cfg.diffusion_block_size:
        raise ValueError(f"loss.context_window={loss_cfg.context_window} must be a multiple of "
                         f"model.diffusion_block_size={model_cfg.diffusion_block_size}")
    if train and loss_cfg.context_window > 0:
        seg_attn = local_windows(seg, pos, loss_cfg.context_window, frac,
                                 loss_cfg.context_window_until)
    stream = None
    if two_stream:   # [noisy | clean] at the same positions (model/attention.py)
        inputs = jnp.concatenate([inputs, tokens], axis=1)
        stream = jnp.concatenate([jnp.zeros_like(seg), jnp.ones_like(seg)], axis=1)
        pos_in, seg_in = jnp.concatenate([pos, pos], 1), jnp.concatenate([seg_attn, seg_attn], 1)
    else:
        pos_in, seg_in = pos, seg_attn

    def lm_part(x):       # the stream the LM loss reads
        return x[:, :seq_len] if two_stream else x

    def concept_part(x):  # the stream the concept terms read
        return x[:, seq_len:] if two_stream else x

    head = model.rewrite.known_head
    k_gt = obj.pooled_label_features(head, concept_ids)                             # [B,T,D]
    f32 = jnp.float32
    teacher, alpha_in, drop_eps = None, 0.0, jnp.zeros((b,), bool)
    alpha = beta = cfg_drop = jnp.zeros((), f32)
    if train:
        drop_eps = obj.sample_epsilon_dropout(
            rng_eps, b, obj.epsilon_dropout_prob(step, loss_cfg.epsilon_dropout))
        alpha = obj.teacher_forcing_alpha(
            step, loss_cfg.teacher_forcing_start, loss_cfg.teacher_forcing_end,
            loss_cfg.teacher_forcing_steps, schedule=loss_cfg.teacher_forcing_schedule,
            total_steps=loss_cfg.schedule_steps)
        if loss_cfg.teacher_forcing == "hard":   # substitute k_gt in a sequence w.p. alpha
            alpha_in = (jax.random.uniform(rng_tf, (b,)) < alpha).astype(f32)[:, None, None]
        else:
            alpha_in = jnp.broadcast_to(alpha, (b, 1, 1))
        teacher = k_gt
        if loss_cfg.cfg_dropout > 0:             # feed no known features in a sequence
            dropped = jax.random.uniform(rng_cfg, (b,)) < loss_cfg.cfg_dropout
            teacher = jnp.where(dropped[:, None, None], 0.0, teacher)
            alpha_in = jnp.where(dropped[:, None, None], 1.0, alpha_in)
            cfg_drop = jnp.mean(dropped.astype(f32))
        if two_stream:
            teacher = jnp.concatenate([teacher, teacher], axis=1)

    h = model.backbone(inputs, positions=pos_in, segment_ids=seg_in, stream=stream,
                       lookahead=lookahead)
    if diffusion and model_cfg.diffusion_shift:   # row i <- the state at i-1 (model/lm.py)
        if two_stream:   # noisy rows read a clean state across a block boundary
            hn, hc = h[:, :seq_len], h[:, seq_len:]
            h = jnp.concatenate([shift_to_predictions(hn, pos, seg, hc,
                                                      model_cfg.diffusion_block_size),
                                 shift_to_predictions(hc, pos, seg)], axis=1)
        else:
            h = shift_to_predictions(h, pos, seg)
    rw = model.rewrite(h, drop_epsilon=drop_eps, teacher_features=teacher,
                       teacher_alpha=alpha_in)
    composed = lm_part(rw.composed)
    if train and loss_cfg.unknown_teacher_forcing and rw.unknown is not None:
        beta = obj.hold_decay(frac, 1.0, loss_cfg.unknown_teacher_forcing_floor,
                              loss_cfg.unknown_teacher_forcing_hold,
                              loss_cfg.unknown_teacher_forcing_until, kind="linear")
        # Only epsilon-dropped sequences route through the unknown slot (elsewhere epsilon
        # restores h exactly), so that is where its target h - k_gt replaces sg(u).
        dropped = drop_eps.astype(composed.dtype)[:, None, None]
        u_sg = jax.lax.stop_gradient(lm_part(rw.unknown_features))
        composed = composed + dropped * beta * (lm_part(h) - k_gt - u_sg)

    targets_lm = tokens if diffusion else jnp.roll(tokens, -1, axis=1)
    chunk = loss_cfg.get("ce_chunk_tokens", 0)
    seen_ce = {}

    def lm_loss_of(c):
        """LM loss of composed features c [B,T,D]; only this stream is ever unembedded."""
        if chunk:   # [B,T,V] never whole (objectives/chunked_ce.py)
            ce, hit = obj.chunked_token_ce(c, model.unembedding(), targets_lm, chunk)
        else:
            ce, hit = obj.ce_and_hit(model.logits_from(c), targets_lm)
        seen_ce.setdefault("ce", ce)   # the training stream's: the first call
        if diffusion:
            return obj.diffusion_loss_from_ce(ce, hit, masked, t, seg,
                                              loss_cfg.diffusion_weighting)
        return obj.next_token_loss_from_ce(ce[:, :-1], hit[:, :-1], seg)

    metrics = {}
    lm_loss, lm_aux = lm_loss_of(composed)
    if diffusion:
        metrics.update({k: v for k, v in lm_aux.items() if k.startswith("masked_")})
        # the count L_lm divides by (objectives/diffusion.py): real tokens for the ELBO
        # weighting, masked real tokens for the uniform one
        lm_tokens = lm_aux["n_real" if loss_cfg.diffusion_weighting == "elbo" else "n_masked"]
    else:
        metrics.update(next_token_acc=lm_aux["accuracy"])
        lm_tokens = lm_aux["n_pairs"]   # the same-document next-token pairs
    # gradient accumulation weights each micro-batch by it (train/step.py)
    metrics["lm_tokens"] = jax.lax.stop_gradient(lm_tokens).astype(f32)
    if not train:   # the concept path alone: what the explanations describe
        no_eps, no_eps_aux = lm_loss_of(composed - lm_part(rw.epsilon))
        metrics["lm_loss_no_epsilon"] = no_eps
        if diffusion:
            metrics["masked_ce_no_epsilon"] = no_eps_aux["masked_ce"]

    hidden_c = concept_part(h)
    known_c = jax.tree.map(concept_part, rw.known)
    concept_loss, c_aux = obj.chunk_concept_loss(
        head, hidden_c, concept_ids, chunk_ids, known_c.topk_indices, rng_neg,
        **concept_term_options(loss_cfg), topk_logits=known_c.topk_logits,
        pooled_weight=float(loss_cfg.get("concept_pooled_weight", 0.0)),
        # the batch AUROC sorts B*T*(K+M) scores: 14% of tiny.py's train step on 2 CPU cores
        # (373 vs 323 ms, side by side), so only eval passes (eval_concept_auroc) compute it
        with_auroc=not train)
    if rw.unknown is not None:
        unknown_c = concept_part(rw.unknown_features)
        rec_known = k_gt if loss_cfg.reconstruction_target == "labels" else known_c.features
        rec = obj.reconstruction_loss(unknown_c, hidden_c, rec_known, valid)
        norm = loss_cfg.independence_normalization
        if rw.unknown.mixed is not None:   # factorized: in rank space, no [D,D] product
            ind = obj.independence_loss_factorized(
                concept_part(rw.unknown.mixed), model.rewrite.unknown_head.embedding_basis[...],
                known_c.features, valid, normalization=norm)
        else:
            ind = obj.independence_loss(unknown_c, known_c.features, valid, normalization=norm)
    else:
        rec = ind = jnp.zeros((), f32)

    terms = {"lm_loss": (loss_cfg.lm_weight, lm_loss),
             "concept_loss": (loss_cfg.concept_weight, concept_loss),
             "reconstruction_loss": (loss_cfg.reconstruction_weight, rec),
             "independence_loss": (loss_cfg.independence_weight, ind)}
    targets, where = predicted_positions(tokens, seg, masked, diffusion)
    eps_w = loss_cfg.get("epsilon_weight", 0.0)
    # At weight 0 only eval computes it: in the 8B train step the unused term changed XLA's
    # buffer assignment (v5e:16x16 9.8 -> 11.8 GiB per chip).
    if rw.unknown is not None and (eps_w > 0 or not train):
        energy = obj.residual_energy(lm_part(h), lm_part(rw.known.features),
                                     lm_part(rw.unknown_features), where)
        terms["residual_energy_loss"] = (eps_w, energy)
    key_head = getattr(model, "provenance_head", None)
    if train and key_head is not None:   # the learned key head (objectives/key_contrastive.py)
        def view(part, toks, chunk_seg, nll):
            unk = None if rw.unknown is None else jax.tree.map(part, rw.unknown)
            return obj.KeyView(part(h), jax.tree.map(part, rw.known), unk, toks, chunk_seg, nll)
        chunk_seg = batch["chunk_segment_ids"]
        if two_stream:   # the noisy stream (its masked tokens) vs the clean one
            views = (view(lm_part, lm_part(inputs), chunk_seg, None),
                     view(concept_part, tokens, chunk_seg, None))
        else:            # two token-dropout views of the one stream
            nll = None if diffusion else seen_ce["ce"][:, :-1]
            seg_a, seg_b = obj.token_dropout_views(jax.random.fold_in(rng, 13), chunk_seg,
                                                   key_head.cfg.token_dropout)
            views = (view(lm_part, inputs, seg_a, nll), view(lm_part, inputs, seg_b, nll))
        kc, kc_metrics = obj.key_contrastive_loss(key_head, *views, seg, key_tables)
        terms["provenance_contrastive_loss"] = (key_head.cfg.contrastive_weight, kc)
        metrics.update(kc_metrics)
    steer_w = loss_cfg.get("steering_weight", 0.0)
    if train and steer_w:    # optional steering training (objectives/steering_loss.py)
        st, st_metrics = _steering_term(model, batch, jax.random.fold_in(rng, 11), step,
                                        loss_cfg, model_cfg)
        terms["steering_loss"] = (steer_w, st)
        metrics.update(st_metrics)
    total = sum(w * v for w, v in terms.values())
    for name, (w, v) in terms.items():
        metrics[name] = v
        metrics[name.replace("_loss", "_weight")] = jnp.asarray(w, f32)
    if "auroc" in c_aux:
        metrics["concept_auroc"] = c_aux["auroc"]
    if loss_cfg.get("concept_pooled_weight", 0.0):
        metrics["concept_pooled_loss"] = c_aux["pooled_loss"]
    metrics.update(loss=total, concept_pos_loss=c_aux["pos_loss"],
                   concept_neg_loss=c_aux["neg_loss"],
                   concept_pos_detected=c_aux["pos_detected"],
                   teacher_alpha=jnp.asarray(alpha, f32), unknown_teacher_beta=beta,
                   cfg_dropped=cfg_drop, epsilon_dropped=jnp.mean(drop_eps.astype(f32)),
                   real_tokens=valid.sum().astype(f32))
    sg = jax.lax.stop_gradient
    known_lm, unknown_lm = lm_part(rw.known_features), lm_part(rw.unknown_features)
    metrics.update(_logit_shares(sg(known_lm), sg(unknown_lm), sg(composed - known_lm - unknown_lm),
                                 sg(model.unembedding()), targets, where))
    metrics["dead_known_fraction"] = _dead_fraction(known_c.topk_indices, valid,
                                                    model_cfg.concepts.n_known)
    if return_views:
        unknown_v = None if rw.unknown is None else jax.tree.map(concept_part, rw.unknown)
        nll = None if diffusion else seen_ce["ce"][:, :-1]
        return total, metrics, jax.tree.map(sg, ForwardViews(hidden_c, known_c, unknown_v, nll))
    return total, metrics
