"""Per-prompt explanation panels of the report: a generation explained chunk by chunk.

For a few held-out prompts (the first ``prompt_len`` tokens of a held-out
document) the model generates (cbm_lm.inference.generate); the generation is
split into output chunks at <|endofchunk|> (cbm_lm.inference.chunks), and
each chunk gets, from the attribution library:

  input     integrated gradients of each committed token's logit against the
            input it was committed in (MASK baseline), per token normalized to
            unit L1 mass, averaged over the chunk (InputAttribution.chunk_scores);
            shown as a heatmap scaled to max |score| = 1
  concepts  the exact decomposition of each token's logit, per token divided by
            sum |contributions| + |epsilon|, averaged over the chunk
            (chunk_aggregation.chunk_concepts): top known concepts by name, all
            unknown concepts together, and epsilon
  provenance  the training chunks a provenance query returns for the chunk text
            (when the workdir has a provenance index)

The identity known + unknown + epsilon = logit is verified on every generated
token (ConceptAttribution.verify); its max error joins the report's.
"""

from __future__ import annotations

import numpy as np

from cbm_lm.attribution.chunk_aggregation import ConceptLabels, chunk_concepts
from cbm_lm.attribution.concept_attribution import concept_attribution
from cbm_lm.attribution.input_attribution import input_attribution
from cbm_lm.data.corpus import Corpus
from cbm_lm.eval.heldout import HeldoutWindows
from cbm_lm.inference.chunks import trace_chunks
from cbm_lm.inference.generate import generate
from cbm_lm.inference.logit_processing import SamplingConfig


def _chunk_panel(tok, trace, ia, ca, labels, b: int, start: int, end: int, top: int) -> dict:
    scores = ia.chunk_scores(b, start, end, scope="all")
    keep = np.flatnonzero(ia.scope_mask(b, "all") & (np.arange(trace.length) < end))
    scale = max(float(np.abs(scores[keep]).max()) if len(keep) else 0.0, 1e-12)
    cc = chunk_concepts(ca, b, start, end, labels)
    known = [e for e in cc.entries if e["type"] == "known"][:top]
    unknown = sum(abs(e["score"]) for e in cc.entries if e["type"] == "unknown")
    return {"text": tok.decode(trace.tokens[b, start:end]),
            "span": [int(start), int(end)],
            "context": [{"text": tok.decode([int(trace.tokens[b, p])]),
                         "score": float(scores[p] / scale)} for p in keep],
            "concepts": [{"name": e["name"], "share": float(e["score"])} for e in known],
            "unknown_share": float(unknown), "epsilon_share": float(cc.epsilon_share)}


def generation_panels(model, corpus: Corpus, windows: HeldoutWindows, *, num_prompts: int = 3,
                      prompt_len: int = 24, max_new_tokens: int = 48, ig_steps: int = 8,
                      seed: int = 0, top: int = 5, provenance=None) -> tuple[list[dict], float]:
    """(panels, max identity error over the generated tokens)."""
    tok = corpus.tokenizer
    # The sampler refuses prompt + new tokens beyond max_seq_len; a small model shortens both.
    limit = model.config.max_seq_len
    if prompt_len + max_new_tokens > limit:
        prompt_len = max(1, min(prompt_len, limit // 3))
        max_new_tokens = limit - prompt_len
    rows = [r for r in range(windows.num_rows)
            if windows.segment_ids[r].sum() >= prompt_len][:num_prompts]
    if not rows:
        return [], 0.0
    prompts = [windows.tokens[r, :prompt_len].tolist() for r in rows]
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, seed=seed,
                         banned_ids=(tok.mask_id, tok.pad_id, tok.bos_id))
    trace = generate(model, prompts, cfg, pad_id=tok.pad_id)
    ia = input_attribution(model, trace, n_steps=ig_steps, batch_size=8)
    ca = concept_attribution(model, trace, source="replay")
    err = ca.verify().max_abs_error
    labels = ConceptLabels(corpus.concepts)
    panels = []
    for b, spans in enumerate(trace_chunks(trace, tok.endofchunk_id)):
        chunks = [_chunk_panel(tok, trace, ia, ca, labels, b, s, e, top)
                  for s, e in spans if e > s]
        # One decode of the chunks' tokens: joining per-chunk decodes would put a space
        # wherever a chunk boundary falls inside a word, and the query would see two words.
        ids = [int(t) for s, e in spans for t in trace.tokens[b, s:e]]
        text = tok.decode(ids)
        prov = provenance(text) if provenance else None
        panels.append({"title": f"held-out prompt {b + 1} ({windows.doc_keys[rows[b]]})",
                       "prompt": tok.decode(trace.prompt(b)),
                       "origin": f"generated ({len(trace.generated(b))} tokens, "
                                 f"{model.config.objective})",
                       "chunks": chunks,
                       "provenance": prov or {"reason": "no provenance index for this run"}})
    return panels, float(err)
