"""Steering test: amplify a concept, check an independent detector sees it, and what it costs.

For each sampled concept j (seeded, among the known concepts that label at
least ``min_train_chunks`` of the detector's training chunks, and not all of
them: counted on the very sample the detector is fit on, never on the
manifest's train + held-out counts), generate from the same held-out prompts
unsteered and with ``amplify(model, j)`` (cbm_lm.inference.steering: residual
injection of the concept's direction). With the bag-of-words detector P_j
(cbm_lm.eval.concept_classifier), detected = P_j(generated text) >= 0.5:

  success_j        = rate_j(steered) > rate_j(unsteered)
  steering_success = mean_j success_j
  steering_perplexity_ratio = PPL(steered generations) / PPL(unsteered generations)

both perplexities scored by the unsteered model on the generated tokens only
(cbm_lm.eval.perplexity: exact for AR, the ELBO bound for diffusion).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cbm_lm.data.corpus import Corpus
from cbm_lm.eval.concept_classifier import chunk_texts, train_classifier, trainable_concepts
from cbm_lm.eval.heldout import HeldoutWindows
from cbm_lm.eval.perplexity import perplexity
from cbm_lm.eval.report import MetricUnavailable
from cbm_lm.inference.generate import generate
from cbm_lm.inference.logit_processing import SamplingConfig
from cbm_lm.inference.steering import amplify


class SteeringUnavailable(MetricUnavailable):
    """The corpus or held-out windows cannot support the test (reported, not fatal)."""


@dataclasses.dataclass(frozen=True)
class SteeringResult:
    success: float
    perplexity_ratio: float
    per_concept: list[dict]
    unsteered_perplexity: float
    steered_perplexity: float
    samples: list[dict]


def generated_windows(trace) -> tuple[HeldoutWindows, np.ndarray]:
    """The trace's sequences as windows, and a [B,L] mask of their generated tokens."""
    gen = trace.generated_mask() & (np.arange(trace.length)[None] <
                                    (trace.prompt_lens + trace.gen_lens)[:, None])
    seg = (np.arange(trace.length)[None] < (trace.prompt_lens + trace.gen_lens)[:, None])
    seg = seg.astype(np.int32)
    pos = np.where(seg > 0, np.arange(trace.length)[None], 0).astype(np.int32)
    w = HeldoutWindows(trace.tokens.astype(np.int32), seg, pos,
                       np.full(trace.tokens.shape, -1, np.int32), [], [""] * trace.batch_size)
    return w, gen


def concept_success(p_steered: np.ndarray, p_unsteered: np.ndarray, threshold: float = 0.5
                    ) -> tuple[float, float, bool]:
    """Detection rates of one concept over steered / unsteered generations, and success."""
    steered = float((np.asarray(p_steered) >= threshold).mean())
    unsteered = float((np.asarray(p_unsteered) >= threshold).mean())
    return steered, unsteered, steered > unsteered


def pooled_perplexity_ratio(steered: list, unsteered) -> float:
    """exp(token-weighted mean NLL of the steered runs) / PPL(unsteered) (Perplexity objects)."""
    n = sum(p.num_tokens for p in steered)
    nll = sum(p.nll_per_token * p.num_tokens for p in steered) / max(n, 1)
    return float(np.exp(nll - unsteered.nll_per_token))


def _texts(trace, tok) -> list[str]:
    eoc = tok.endofchunk_id
    return [tok.decode([t for t in trace.generated(b).tolist() if t != eoc])
            for b in range(trace.batch_size)]


def steering_eval(model, corpus: Corpus, windows: HeldoutWindows, *, num_concepts: int = 6,
                  num_prompts: int = 8, prompt_len: int = 16, max_new_tokens: int = 32,
                  min_train_chunks: int = 20, max_train_chunks: int = 20000, seed: int = 0,
                  t_min: float = 1e-3, clean_context: bool = True, log=lambda s: None
                  ) -> SteeringResult:
    """Raises SteeringUnavailable (a MetricUnavailable) when the corpus or the windows
    cannot support the test."""
    tok = corpus.tokenizer
    n_known = model.config.concepts.n_known
    sample = chunk_texts(corpus, "train", max_train_chunks, seed)    # the detector's data
    pool = [j for j in trainable_concepts(sample[1], min_train_chunks) if j < n_known]
    if not pool:
        raise SteeringUnavailable(f"no concept of {corpus.dir} labels {min_train_chunks} of the "
                                  f"{len(sample[0])} sampled training chunks (and not all), too "
                                  f"few to train its detector")
    rng = np.random.default_rng(seed)
    concepts = sorted(rng.choice(pool, size=min(num_concepts, len(pool)), replace=False).tolist())
    log(f"training the bag-of-words detector for {len(concepts)} concepts")
    try:
        clf = train_classifier(corpus, concepts, seed=seed, sample=sample)
    except MetricUnavailable as e:
        raise SteeringUnavailable(str(e)) from e
    for j, why in clf.skipped.items():     # none expected: the pool has both classes
        log(f"skipping {corpus.concepts.name(j)}: {why}")
    concepts = [j for j in concepts if j in clf.models]
    if not concepts:
        raise SteeringUnavailable("no sampled concept could be given a detector")

    rows = [r for r in range(windows.num_rows) if windows.segment_ids[r].sum() >= prompt_len]
    prompts = [windows.tokens[r, :prompt_len].tolist() for r in rows[:num_prompts]]
    if not prompts:
        raise SteeringUnavailable(f"no held-out window has {prompt_len} tokens for a prompt")
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, seed=seed,
                         banned_ids=(tok.mask_id, tok.pad_id, tok.bos_id))

    def run(steering):
        trace = generate(model, prompts, cfg, steering, pad_id=tok.pad_id)
        w, gen = generated_windows(trace)
        ppl = perplexity(model, w, seed=seed, score_mask=gen, t_min=t_min,
                         clean_context=clean_context)
        return trace, _texts(trace, tok), ppl

    log("generating unsteered")
    _, base_texts, base_ppl = run(None)
    per, runs, samples = [], [], []
    for j in concepts:
        log(f"generating with {corpus.concepts.name(j)} amplified")
        _, texts, ppl = run(amplify(model, j))
        runs.append(ppl)
        p_steered, p_unsteered = clf.probability(texts, j), clf.probability(base_texts, j)
        steered, unsteered, ok = concept_success(p_steered, p_unsteered)
        per.append({"id": j, "name": corpus.concepts.name(j), "steered_rate": steered,
                    "unsteered_rate": unsteered, "success": ok,
                    "steered_mean_p": float(p_steered.mean()),
                    "unsteered_mean_p": float(p_unsteered.mean()),
                    "steered_perplexity": ppl.perplexity,
                    "detector_heldout_auroc": clf.heldout_auroc[j],
                    "detector_train_positives": clf.train_positives[j]})
        samples.append({"concept": corpus.concepts.name(j), "prompt": tok.decode(prompts[0]),
                        "unsteered": base_texts[0], "steered": texts[0]})
    ratio = pooled_perplexity_ratio(runs, base_ppl)
    return SteeringResult(float(np.mean([p["success"] for p in per])), ratio, per,
                          base_ppl.perplexity, base_ppl.perplexity * ratio, samples)
