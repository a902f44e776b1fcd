"""Per-prompt explanation panels of the report: chunks, input heatmaps, concept shares.

For a held-out document split at its chunk boundaries, the first chunk is the
prompt and the following chunks are explained as the model reads them. For
each explained chunk c = [s, e) and each of its tokens y_t:

  concepts  (exact decomposition at the position that predicts y_t):
            share_i(t) = |C_i(t)| / (sum_j |C_j(t)| + |C_eps(t)|)        per concept i
            reported per chunk as the mean over its tokens; all unknown concepts
            together, and epsilon, the same way
  input     integrated gradients of logit_{y_t} on the input embeddings (MASK
            baseline), each token's row normalized to unit L1 mass over the
            context, then averaged over the chunk's tokens (Steerling's
            aggregation); shown as a heatmap scaled to max |score| = 1

The query of y_t is the call that would produce it: autoregressive, the
sequence read at t - 1; diffusion, the sequence with positions >= s masked
(the chunk not yet decoded), read at t.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cbm_lm.attribution.decomposition import decompose_logits
from cbm_lm.data.corpus import Corpus
from cbm_lm.eval.heldout import HeldoutWindows
from cbm_lm.model import ConceptBottleneckLM


@nnx.jit
def _decompose(model, tokens, read_pos, targets):
    out = model(tokens)
    n = read_pos.shape[0]
    dec = decompose_logits(model, out, jnp.zeros(n, jnp.int32), read_pos, targets)
    return dec


def chunk_queries(model_cfg, tokens: np.ndarray, start: int, end: int):
    """(input [T], read positions [n], targets [n], context positions [m]) of chunk [start, end)."""
    pos = np.arange(max(start, 1), end)
    if model_cfg.objective == "autoregressive":
        return tokens.copy(), pos - 1, tokens[pos], np.arange(0, end - 1)
    x = tokens.copy()
    x[start:] = model_cfg.resolved_mask_token_id
    return x, pos, tokens[pos], np.arange(0, start)


def concept_shares(dec, names: list[str], top: int = 5) -> tuple[list[dict], float, float]:
    """Per-chunk mean of per-token shares -> (top known concepts, unknown share, eps share)."""
    kc, uc = np.abs(np.asarray(dec.known_contrib)), np.abs(np.asarray(dec.unknown_contrib))
    eps = np.abs(np.asarray(dec.epsilon_contrib))
    denom = np.maximum(kc.sum(-1) + uc.sum(-1) + eps, 1e-30)                     # [n]
    n = len(denom)
    per = {}
    for t in range(n):
        for cid, c in zip(np.asarray(dec.known_ids[t]).tolist(), kc[t]):
            per[cid] = per.get(cid, 0.0) + c / denom[t] / n
    best = sorted(per.items(), key=lambda kv: -kv[1])[:top]
    concepts = [{"name": names[c] if c < len(names) else f"known#{c}", "share": float(s)}
                for c, s in best if s > 0]
    return concepts, float((uc.sum(-1) / denom).mean()), float((eps / denom).mean())


def input_heatmap(model, x: np.ndarray, read: np.ndarray, targets: np.ndarray,
                  context: np.ndarray, n_steps: int) -> np.ndarray:
    """Chunk-level IG scores over ``context`` positions, scaled to max |score| = 1."""
    from cbm_lm.attribution.integrated_gradients import LogitQuery, integrated_gradients
    q = LogitQuery(jnp.asarray(np.repeat(x[None], len(read), 0)), jnp.asarray(read, jnp.int32),
                   jnp.asarray(targets, jnp.int32))
    a = np.asarray(integrated_gradients(model, q, n_steps=n_steps, batch_size=8).attributions)
    a = a[:, context]
    a = a / np.maximum(np.abs(a).sum(-1, keepdims=True), 1e-8)
    score = a.mean(0)
    return score / max(float(np.abs(score).max()), 1e-12)


def heldout_panels(model: ConceptBottleneckLM, corpus: Corpus, windows: HeldoutWindows, *,
                   num_prompts: int = 3, max_chunks: int = 3, ig_steps: int = 8,
                   provenance=None) -> list[dict]:
    """Panels for the first ``num_prompts`` windows that have at least two chunks."""
    tok = corpus.tokenizer
    names = [corpus.concepts.name(i) for i in range(len(corpus.concepts))]
    panels = []
    for row in range(windows.num_rows):
        chunks = [c for c in windows.chunks if c.row == row]
        if len(chunks) < 2:
            continue
        tokens = windows.tokens[row]
        out_chunks = []
        for c in chunks[1:1 + max_chunks]:
            x, read, targets, context = chunk_queries(model.config, tokens, c.start, c.end)
            if len(read) == 0 or len(context) == 0:
                continue
            dec = _decompose(model, jnp.asarray(x[None]), jnp.asarray(read, jnp.int32),
                             jnp.asarray(targets, jnp.int32))
            concepts, unk, eps = concept_shares(dec, names)
            heat = input_heatmap(model, x, read, targets, context, ig_steps)
            out_chunks.append({
                "text": tok.decode(tokens[c.start:c.end]),
                "context": [{"text": tok.decode([int(tokens[p])]), "score": float(s)}
                            for p, s in zip(context, heat)],
                "concepts": concepts, "unknown_share": unk, "epsilon_share": eps,
                "chunk_id": c.chunk_id})
        if not out_chunks:
            continue
        prov = provenance(tok.decode(tokens[chunks[1].start:chunks[-1].end])) if provenance else \
            {"reason": "chunk provenance (cbm_lm.provenance) is not part of this build yet"}
        panels.append({"title": f"held-out document {windows.doc_keys[row]!s}",
                       "prompt": tok.decode(tokens[chunks[0].start:chunks[0].end]),
                       "origin": "held-out continuation, read by the model",
                       "chunks": out_chunks, "provenance": prov})
        if len(panels) == num_prompts:
            break
    return panels
