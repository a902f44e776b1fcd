"""Does amplifying a concept make it appear? Detection rate and perplexity, steered vs not.

For prompts x_1..x_B and known concepts c_1..c_K:

  base        one unsteered generation per prompt
  steered_k   one generation per prompt with concept c_k amplified
              (steering.amplify: injection calibrated in logit units)

A generation g "expresses" c when the concept head, run UNSTEERED over
prompt + g, gives the generated tokens a chunk-level presence

  P(c present) = 1 - prod_{t in pred(g)} (1 - sigmoid(z_tc))  >=  threshold

the soft-OR the concept loss trains the head to output for a chunk
(objectives/concept_loss.py), over the positions that PREDICT g's tokens, as
in training (objectives/label_alignment.py): g's own positions P..P+G-1 for
diffusion, one earlier, P-1..P+G-2, for an autoregressive model (position t
predicts token t+1). Reported per concept: the base rate (share of
base generations expressing c), the steered rate (share of c-steered
generations expressing c) and their lift; and the perplexity of the
generated tokens under the unsteered model, steered over base, which prices
the steering in fluency. Perplexity needs a causal model (exp of the mean
next-token NLL); for a diffusion model it is reported as None.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cbm_lm.inference.generate import generate
from cbm_lm.inference.logit_processing import SamplingConfig
from cbm_lm.inference.steering import amplify


@dataclasses.dataclass
class ConceptSteeringResult:
    concept_id: int
    name: str
    base_rate: float
    steered_rate: float
    base_presence: float       # mean P(c present) over base generations
    steered_presence: float
    steered_ppl: float | None


@dataclasses.dataclass
class SteeringEval:
    concepts: list[ConceptSteeringResult]
    base_ppl: float | None
    n_prompts: int
    settings: dict

    def summary(self) -> dict:
        base = np.mean([c.base_rate for c in self.concepts])
        steered = np.mean([c.steered_rate for c in self.concepts])
        ppl = [c.steered_ppl for c in self.concepts if c.steered_ppl is not None]
        # concepts the base generations rarely express: where amplifying can show at all
        rare = [c for c in self.concepts if c.base_rate < 0.5]
        return {"concepts": len(self.concepts), "prompts": self.n_prompts,
                "mean_base_rate": float(base), "mean_steered_rate": float(steered),
                "concepts_lifted": int(sum(c.steered_rate > c.base_rate for c in self.concepts)),
                "rare_concepts": len(rare),
                "rare_mean_base_rate": float(np.mean([c.base_rate for c in rare])) if rare else None,
                "rare_mean_steered_rate":
                    float(np.mean([c.steered_rate for c in rare])) if rare else None,
                "base_ppl": self.base_ppl,
                "mean_steered_ppl": float(np.mean(ppl)) if ppl else None,
                "ppl_ratio": float(np.mean(ppl) / self.base_ppl) if ppl and self.base_ppl else None,
                **self.settings}

    def rows(self) -> list[dict]:
        return [dataclasses.asdict(c) for c in self.concepts]


@nnx.jit
def _score(model, tokens, segment_ids, concept_ids):
    """Unsteered pass -> (concept logits [B,T,K] of concept_ids, next-token log-probs [B,T])."""
    out = model(tokens, segment_ids=segment_ids)
    head = model.rewrite.known_head
    b, t, d = out.hidden.shape
    q = head.query(out.hidden.reshape(b * t, d))
    ids = jnp.broadcast_to(concept_ids, (b * t, concept_ids.shape[0]))
    z = head.logits_for(q, ids).reshape(b, t, -1)
    logp = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)
    nxt = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return z, jnp.pad(nxt, ((0, 0), (1, 0)))


def predicting_mask(generated: np.ndarray, objective: str) -> np.ndarray:
    """[B,L] bool: the positions whose concept logits score the generated tokens
    ``generated`` [B,L]: the same positions for diffusion, one earlier for autoregressive."""
    if objective == "diffusion":
        return generated
    if objective != "autoregressive":
        raise ValueError(f"objective must be 'diffusion' or 'autoregressive', got {objective!r}")
    return np.concatenate([generated[:, 1:], np.zeros_like(generated[:, :1])], axis=1)


def presence_and_nll(model, trace, concept_ids):
    """P(c present) [B,K] over each row's generated tokens (scored at the positions that
    predict them, module docstring), and the generated tokens' next-token NLL sum and
    count [B] (causal models), from one unsteered pass."""
    gen = trace.generated_mask()
    z, logp = _score(model, jnp.asarray(trace.tokens), jnp.asarray(trace.segment_ids()),
                     jnp.asarray(concept_ids, jnp.int32))
    z, logp = np.asarray(z, np.float64), np.asarray(logp, np.float64)
    pred = predicting_mask(gen, model.config.objective)
    log_absent = -(np.logaddexp(0.0, z) * pred[..., None]).sum(1)    # sum_t log(1 - sigmoid z)
    return 1.0 - np.exp(log_absent), -(logp * gen).sum(1), gen.sum(1)


def evaluate_steering(model, prompts, concept_ids, *, pad_id: int, names=None,
                      target: float = 8.0, layer: int | None = None,
                      cutoff_tokens: int | None = None, threshold: float = 0.5,
                      sampling: SamplingConfig | None = None) -> SteeringEval:
    """Base vs amplified generation for each concept (see the module docstring).

    prompts: list of id sequences; sampling: generation settings (banned ids etc.).
    """
    sampling = sampling or SamplingConfig(max_new_tokens=32)
    concept_ids = [int(c) for c in concept_ids]
    causal = model.config.attention == "causal"
    base = generate(model, prompts, sampling, pad_id=pad_id)
    base_p, base_nll, base_n = presence_and_nll(model, base, concept_ids)
    results = []
    for k, c in enumerate(concept_ids):
        steer = amplify(model, [c], target, layer=layer, cutoff_tokens=cutoff_tokens)
        tr = generate(model, prompts, sampling, steer, pad_id=pad_id)
        p, nll, n = presence_and_nll(model, tr, [c])
        results.append(ConceptSteeringResult(
            concept_id=c, name=names[c] if names is not None else str(c),
            base_rate=float((base_p[:, k] >= threshold).mean()),
            steered_rate=float((p[:, 0] >= threshold).mean()),
            base_presence=float(base_p[:, k].mean()), steered_presence=float(p[:, 0].mean()),
            steered_ppl=float(np.exp(nll.sum() / n.sum())) if causal else None))
    settings = dict(target=target, layer=layer if layer is not None else model.config.n_layers // 2,
                    cutoff_tokens=cutoff_tokens, threshold=threshold,
                    max_new_tokens=sampling.max_new_tokens, seed=sampling.seed)
    return SteeringEval(results, float(np.exp(base_nll.sum() / base_n.sum())) if causal else None,
                        len(base.prompt_lens), settings)
