"""Masked-diffusion generation: unmask block by block, most confident first.

Each row starts as [prompt | N x MASK | pad] (prompts.py). At every step, one
forward pass over the batch; then for each row, on the masked positions of its
current block (diffusion_schedule.py):

  l     = process_logits(logits)              [b,V]   (logit_processing.py)
  conf  = max softmax(l)                      [b]
  commit the n most confident positions, each with a token sampled from l

With classifier-free guidance (cfg_scale = w > 0) the forward pass also runs
an unconditional copy whose prompt is MASK, and l starts from
uncond + (w + 1)(cond - uncond). Steering (steer_spec.py): interventions in
every pass, injection at the positions still MASK in the pass's input (both
copies under guidance), the ReLU logit mask before sampling.

The whole loop is one jax.jit (a lax.while_loop over steps) per shape bucket
(B, L, N, block, steps, config); each row samples with its own key
fold_in(key(seed), row_seed) folded with the step, so a row's tokens do not
depend on the rows batched with it. The result is a GenerationTrace whose
replay reproduces every committing pass (trace.py).

``capture_fn(model, out, batch_idx [N], pos_idx [N], token [N]) -> pytree of
[N,...]`` is called on each committing pass for the committed positions (the
conditional pass under guidance); its values are stored per position in
``trace.capture`` ([B,L,...], zeros elsewhere). This is how commit-time
attribution is taken from the very pass that committed a token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cbm_lm.inference import steered_call
from cbm_lm.inference.diffusion_schedule import max_commits_per_step, schedule
from cbm_lm.inference.logit_processing import (SamplingConfig, confidence, process_logits,
                                               sample_tokens, token_presence)
from cbm_lm.inference.prompts import layout
from cbm_lm.inference.sampler_rows import capture_buffers, kept_tokens, row_keys, write_capture
from cbm_lm.inference.steer_spec import Steering
from cbm_lm.inference.trace import GenerationTrace


# SamplingConfig fields the loop does not read (the seed is in the row keys, the
# grid in the schedule arrays), fixed so that they do not split the jit cache.
_UNREAD = dict(seed=0, grid="steerling")


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "static", "mask_id", "capture_fn"))
def _run(graphdef, state, x0, seg, prompt_lens, sched, keys, arrays, *,
         cfg: SamplingConfig, static, mask_id: int, capture_fn):
    model = nnx.merge(graphdef, state)
    b, length = x0.shape
    vocab = model.config.vocab_size
    bs, c = cfg.block_size, max_commits_per_step(cfg.block_size, cfg.steps_per_block)
    n_steps = sched["start"].shape[1]
    pos = jnp.arange(length)[None, :]
    rows = jnp.arange(b)[:, None]

    def forward(x):
        is_mask = (x == mask_id) & (seg > 0)
        alpha = None
        if static.inject_layer is not None:
            masked_left = jnp.sum(is_mask, -1)          # committed = N - masked left
            alpha = steered_call.injection_alpha(static, arrays, cfg.max_new_tokens - masked_left)
        shift = model.config.diffusion_shift
        if cfg.cfg_scale <= 0:
            steered = steered_call.diffusion_steered(x, seg, mask_id, shift)
            out = steered_call.call(model, x, seg, static, arrays, steered=steered, alpha=alpha)
            return out, out.logits
        xu = jnp.where(pos < prompt_lens[:, None], mask_id, x)
        xx = jnp.concatenate([x, xu])
        steered = steered_call.diffusion_steered(xx, jnp.concatenate([seg, seg]), mask_id, shift)
        out = steered_call.call(model, xx, jnp.concatenate([seg, seg]), static, arrays,
                                steered=steered,
                                alpha=None if alpha is None else jnp.concatenate([alpha, alpha]),
                                rows=jnp.concatenate([jnp.arange(b), jnp.arange(b)]))
        cond, uncond = out.logits[:b], out.logits[b:]
        return out, uncond + (cfg.cfg_scale + 1.0) * (cond - uncond)

    def step(carry):
        s, x, cstep, done, cap = carry
        start, m = sched["start"][:, s], sched["length"][:, s]
        n = jnp.where(done, 0, sched["n_commit"][:, s])
        out, logits = forward(x)
        idx = jnp.minimum(start[:, None] + jnp.arange(bs)[None, :], length - 1)       # [B,bs]
        valid = (jnp.arange(bs)[None, :] < m[:, None]) & (jnp.take_along_axis(x, idx, 1) == mask_id)
        win = jnp.take_along_axis(logits, idx[..., None], axis=1)                     # [B,bs,V]
        lp = process_logits(win, token_presence(x, seg > 0, vocab), cfg, arrays.logit_mask)
        conf = jnp.where(valid, confidence(lp), -jnp.inf)
        _, order = jax.lax.top_k(conf, c)                                             # [B,c]
        chosen = jnp.take_along_axis(lp, order[..., None], axis=1)                    # [B,c,V]
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, s))(keys)
        tok = jax.vmap(lambda k, l: sample_tokens(k, l, cfg))(step_keys, chosen)     # [B,c]
        p_sel = jnp.take_along_axis(idx, order, 1)
        take = jnp.arange(c)[None, :] < n[:, None]
        dest = jnp.where(take, p_sel, length)                                         # L = dropped
        x = x.at[rows, dest].set(tok, mode="drop")
        cstep = cstep.at[rows, dest].set(s, mode="drop")
        if capture_fn is not None:
            bi = jnp.repeat(jnp.arange(b), c)
            vals = capture_fn(model, out, bi, p_sel.reshape(-1), tok.reshape(-1))
            cap = write_capture(cap, bi, dest.reshape(-1), vals)
        if cfg.stop_ids:
            stopped = jnp.any(jnp.isin(x, jnp.asarray(cfg.stop_ids)) & (cstep >= 0), -1)
            done = done | (sched["last"][:, s] & stopped)
        return s + 1, x, cstep, done, cap

    def more(carry):
        s, x, _, done, _ = carry
        left = jnp.any((x == mask_id) & (seg > 0), -1) & ~done
        return (s < n_steps) & jnp.any(left)

    cap = None
    if capture_fn is not None:
        out_shape = jax.eval_shape(lambda: forward(x0)[0])
        cap = capture_buffers(capture_fn, model, out_shape, b, length, b * c)
    init = (jnp.int32(0), x0, jnp.full(x0.shape, -1, jnp.int32), jnp.zeros(b, bool), cap)
    s, x, cstep, _, cap = jax.lax.while_loop(more, step, init)
    return x, cstep, s, cap


def generate_diffusion(model, prompts, cfg: SamplingConfig, steering: Steering | None = None, *,
                       pad_id: int, seeds=None, capture_fn=None, bucket: int = 64) -> GenerationTrace:
    """Generates cfg.max_new_tokens tokens after each prompt; returns the trace.

    prompts: a [B,P] array or a list of B id sequences (lengths may differ).
    pad_id: the id written after each sequence (the tokenizer's <|pad|>).
    seeds: per-row seeds folded into key(cfg.seed) (default 0..B-1).
    """
    mcfg = model.config
    if mcfg.attention != "block_causal":
        raise ValueError(f"diffusion generation needs a block_causal model, got attention="
                         f"{mcfg.attention!r}; use the autoregressive sampler")
    cfg = cfg.resolved(mcfg.diffusion_block_size)
    steering = steering or Steering()
    mask_id = mcfg.resolved_mask_token_id
    # A drawn <|mask|> would leave its position masked (drawn again later, or never
    # committed: a hole in the span) and a drawn pad ends nothing; as in Steerling, neither
    # is ever sampled, whatever the caller bans.
    cfg = cfg.replace(banned_ids=tuple(sorted({*cfg.banned_ids, mask_id, pad_id})))
    x0, plens, seg = layout(prompts, cfg.max_new_tokens, vocab_size=mcfg.vocab_size,
                            fill_id=mask_id, pad_id=pad_id, bucket=bucket,
                            max_len=mcfg.max_seq_len)
    sched = {k: jnp.asarray(v) for k, v in schedule(plens, cfg.max_new_tokens, cfg.block_size,
                                                    cfg.steps_per_block, cfg.grid).items()}
    static, arrays = steered_call.prepare(steering, *x0.shape)
    graphdef, state = nnx.split(model)
    x, cstep, n_steps, cap = _run(graphdef, state, jnp.asarray(x0), jnp.asarray(seg),
                                  jnp.asarray(plens), sched, row_keys(cfg.seed, len(plens), seeds),
                                  arrays, cfg=cfg.replace(**_UNREAD), static=static, mask_id=mask_id,
                                  capture_fn=capture_fn)
    x, cstep = np.asarray(x), np.asarray(cstep)
    return GenerationTrace(
        tokens=kept_tokens(x, cstep, plens, pad_id), prompt_lens=plens, gen_lens=(cstep >= 0).sum(-1).astype(np.int32),
        committed_step=cstep, objective="diffusion", mask_id=mask_id, pad_id=pad_id,
        max_new_tokens=cfg.max_new_tokens, num_steps=int(n_steps), block_size=cfg.block_size,
        grid=cfg.grid, steps_per_block=cfg.steps_per_block, cfg_scale=cfg.cfg_scale,
        diffusion_shift=mcfg.diffusion_shift, steering=steering,
        capture=None if cap is None else jax.tree.map(np.asarray, cap))
