"""Autoregressive generation with a KV cache.

Step 0 (prefill) runs the right-padded prompts [B,P_max] through the model,
writing every prompt position into the cache (model/attention.py: slot =
position), and samples the token of position P_b from the logits at P_b - 1.
Step s >= 1 feeds the token committed at step s-1 (position P_b + s - 1) as a
single query against the cache and samples position P_b + s. Rows of
different prompt lengths decode side by side: each writes its own slot, and a
slot is visible only to queries at or after it, so a row never sees another
row's padding.

Logit processing is the diffusion sampler's (logit_processing.py): ReLU logit
mask, repetition penalty over the row's tokens so far, banned ids (always MASK and
PAD), entropy-adaptive top-p sampling. Steering: interventions at the query positions,
injection at the query position of each step (alpha zero once
``cutoff_tokens`` tokens are committed), see steer_spec.py. A row stops after
it samples one of ``cfg.stop_ids`` (the stop token is kept).

The prefill and the decode loop form one jax.jit per shape bucket; the trace
replays step s as a full causal forward over the snapshot (trace.py), which
equals the cached computation up to float rounding.

``capture_fn`` as in diffusion_sampler.py, with ``pos_idx`` the position
inside the pass output (P_b - 1 in the prefill, 0 in a decode step).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cbm_lm.inference import steered_call
from cbm_lm.inference.logit_processing import (SamplingConfig, process_logits, sample_tokens,
                                               token_presence)
from cbm_lm.inference.prompts import layout
from cbm_lm.inference.sampler_rows import capture_buffers, kept_tokens, row_keys, write_capture
from cbm_lm.inference.steer_spec import Steering
from cbm_lm.inference.trace import GenerationTrace


# SamplingConfig fields the decode loop does not read (the seed is in the row keys;
# the rest are diffusion settings), fixed so that they do not split the jit cache.
_UNREAD = dict(seed=0, block_size=None, steps_per_block=None, grid="steerling", cfg_scale=0.0)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "static", "p_max", "capture_fn"))
def _run(graphdef, state, x0, prompt_lens, keys, arrays, *, cfg: SamplingConfig, static,
         p_max: int, capture_fn):
    model = nnx.merge(graphdef, state)
    b, length = x0.shape
    vocab = model.config.vocab_size
    rows = jnp.arange(b)
    pos = jnp.arange(length)[None, :]

    def alpha_at(s):
        if static.inject_layer is None:
            return None
        return steered_call.injection_alpha(static, arrays, jnp.full((b,), s, jnp.int32))

    def commit(s, x, cstep, done, cap, out, logits, out_pos):
        """Sample position P_b + s from logits [B,V]; write it unless the row is done."""
        valid = pos < (prompt_lens + s)[:, None]
        lp = process_logits(logits[:, None], token_presence(x, valid, vocab), cfg,
                            arrays.logit_mask)
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, s))(keys)
        tok = jax.vmap(lambda k, l: sample_tokens(k, l, cfg))(step_keys, lp)[:, 0]
        dest = jnp.where(done, length, prompt_lens + s)
        x = x.at[rows, dest].set(tok, mode="drop")
        cstep = cstep.at[rows, dest].set(s, mode="drop")
        if capture_fn is not None:
            vals = capture_fn(model, out, rows, out_pos, tok)
            cap = write_capture(cap, rows, dest, vals)
        if cfg.stop_ids:
            done = done | jnp.isin(tok, jnp.asarray(cfg.stop_ids))
        return x, cstep, done, cap

    # step 0: prefill the prompts
    cache = model.backbone.init_kv_cache(b, length)
    ppos = jnp.broadcast_to(jnp.arange(p_max), (b, p_max))
    last = prompt_lens - 1
    out = steered_call.call(model, x0[:, :p_max], None, static, arrays, kv_cache=cache,
                            positions=ppos, steered=ppos == last[:, None], alpha=alpha_at(0))
    cap = None
    if capture_fn is not None:
        cap = capture_buffers(capture_fn, model, jax.eval_shape(lambda: out), b, length, b)
    logits = out.logits[rows, last]
    x, cstep, done, cap = commit(0, x0, jnp.full(x0.shape, -1, jnp.int32), jnp.zeros(b, bool),
                                 cap, out, logits, last)

    def step(carry):
        s, x, cstep, done, cap, cache = carry
        qpos = (prompt_lens + s - 1)[:, None]                                    # [B,1]
        tok_in = jnp.take_along_axis(x, qpos, 1)
        out = steered_call.call(model, tok_in, None, static, arrays, kv_cache=cache,
                                positions=qpos, steered=jnp.ones((b, 1), bool), alpha=alpha_at(s))
        x, cstep, done, cap = commit(s, x, cstep, done, cap, out, out.logits[:, 0],
                                     jnp.zeros(b, jnp.int32))
        return s + 1, x, cstep, done, cap, out.kv_cache

    def more(carry):
        s, _, _, done, _, _ = carry
        return (s < cfg.max_new_tokens) & ~jnp.all(done)

    s, x, cstep, _, cap, _ = jax.lax.while_loop(
        more, step, (jnp.int32(1), x, cstep, done, cap, out.kv_cache))
    return x, cstep, s, cap


def generate_autoregressive(model, prompts, cfg: SamplingConfig, steering: Steering | None = None,
                            *, pad_id: int, seeds=None, capture_fn=None,
                            bucket: int = 64) -> GenerationTrace:
    """Generates up to cfg.max_new_tokens tokens after each prompt; returns the trace.

    Arguments as diffusion_sampler.generate_diffusion; the model must be causal.
    """
    mcfg = model.config
    if mcfg.attention != "causal":
        raise ValueError(f"autoregressive generation needs a causal model, got attention="
                         f"{mcfg.attention!r}; use the diffusion sampler")
    if cfg.cfg_scale > 0:
        raise ValueError(f"cfg_scale={cfg.cfg_scale}: classifier-free guidance is defined for "
                         "the diffusion sampler only (the prompt is masked in its unconditional "
                         "copy); use cfg_scale=0 with an autoregressive model")
    steering = steering or Steering()
    mask_id = mcfg.resolved_mask_token_id
    # as in the diffusion sampler: a drawn pad would read as the row's end and a drawn
    # <|mask|> is the layout's own filler; neither is ever sampled, whatever the caller bans
    cfg = cfg.replace(banned_ids=tuple(sorted({*cfg.banned_ids, mask_id, pad_id})))
    x0, plens, _ = layout(prompts, cfg.max_new_tokens, vocab_size=mcfg.vocab_size,
                          fill_id=mask_id, pad_id=pad_id, bucket=bucket, max_len=mcfg.max_seq_len)
    static, arrays = steered_call.prepare(steering, *x0.shape)
    p_max = -(-int(plens.max()) // bucket) * bucket if bucket else int(plens.max())
    p_max = min(p_max, x0.shape[1])
    graphdef, state = nnx.split(model)
    x, cstep, n_steps, cap = _run(graphdef, state, jnp.asarray(x0), jnp.asarray(plens),
                                  row_keys(cfg.seed, len(plens), seeds), arrays,
                                  cfg=cfg.replace(**_UNREAD),
                                  static=static, p_max=p_max, capture_fn=capture_fn)
    x, cstep = np.asarray(x), np.asarray(cstep)
    return GenerationTrace(
        tokens=kept_tokens(x, cstep, plens, pad_id), prompt_lens=plens,
        gen_lens=(cstep >= 0).sum(-1).astype(np.int32), committed_step=cstep,
        objective="autoregressive", mask_id=mask_id, pad_id=pad_id,
        max_new_tokens=cfg.max_new_tokens, num_steps=int(n_steps), steering=steering,
        capture=None if cap is None else jax.tree.map(np.asarray, cap))
