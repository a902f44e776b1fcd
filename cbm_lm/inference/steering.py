"""Steering a concept-bottleneck LM: weight interventions, residual injection, ReLU mask.

  intervene(model, tokens, known={name_or_id: w}, unknown=..., positions=...)
      one forward pass with concept weights overridden (Steerling's
      InterpretableCausalDiffusionLM.intervene); epsilon is dropped while
      intervening. Steerling drops it only for KNOWN overrides, so there an
      unknown-only override is cancelled by epsilon and changes nothing;
      here any override drops epsilon (pass drop_epsilon=False for
      Steerling's behaviour). See steer_spec.py.

  concept_direction(model, ids)  d = s / ||s||,  s = sum_i E_k[i]              [D]
  injection(model, ids, target)  alpha = target / max_v (W_v . d)  (logit units;
                                 calibrate=False takes target as the raw alpha)
  relu_logit_mask(model, {c: s}) m = sum_c s_c relu(E_k[c] W^T)                 [V]

  amplify(...) / suppress(...)   Steerling's two presets (SteeringConfig.injection
                                 and .injection_relu) as a steer_spec.Steering.

Concepts are named by id or by name; names resolve through a
cbm_lm.data.concepts.ConceptVocab (the corpus's concepts.json) passed as
``vocab``. Unknown concepts are addressed by id (Steerling's u<id>).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax.numpy as jnp
import numpy as np

from cbm_lm.inference.steer_spec import Injection, Intervention, Steering


def resolve_concept(key, n_concepts: int, vocab=None, what: str = "known") -> int:
    """A concept id from an id, a numeric string, 'u<id>' (unknown) or a name in ``vocab``."""
    if isinstance(key, str) and what == "unknown" and key.startswith("u") and key[1:].isdigit():
        key = int(key[1:])
    elif isinstance(key, str) and key.isdigit():
        key = int(key)
    if isinstance(key, (int, np.integer)):
        if not 0 <= int(key) < n_concepts:
            raise ValueError(f"{what} concept id {int(key)} is outside [0, {n_concepts})")
        return int(key)
    if vocab is None:
        raise ValueError(f"{what} concept {key!r} is a name; pass the corpus's concept vocabulary "
                         "(concepts.json) to resolve names, or give an id")
    if key not in vocab:
        from cbm_lm.inference.concept_search import search_concepts
        near = [vocab.name(i) for i, _ in search_concepts(vocab, key, k=3)]
        raise ValueError(f"no {what} concept named {key!r} in the vocabulary"
                         + (f"; closest: {near}" if near else ""))
    cid = vocab.id(key)
    if cid >= n_concepts:
        raise ValueError(f"concept {key!r} has id {cid}, but the model has {n_concepts} concepts")
    return cid


def _resolve_table(table: Mapping | None, n: int, vocab, what: str) -> dict[int, float]:
    return {resolve_concept(k, n, vocab, what): float(v) for k, v in (table or {}).items()}


def make_intervention(model, known: Mapping | None = None, unknown: Mapping | None = None,
                      positions=None, *, vocab=None, drop_epsilon: bool = True) -> Intervention:
    """An Intervention with names resolved. positions: [B,L] bool or None (all).

    Semantics: an intervened concept's weight is set to the given value at every chosen
    position, in or out of the token's top-k, and the other concepts keep the forward's
    top-k weights. Two edge cases differ from Steerling: its known-head intervention prunes
    to ``topk_known`` rather than the forward's ``topk_known_features`` (the same when the
    two are equal), and its large unknown head adds
    (v - sigmoid(z_c)) E_c for a concept outside the top-k where cbm_lm adds v E_c (the
    concept's forward weight there is 0).
    """
    cc = model.config.concepts
    unk = _resolve_table(unknown, cc.n_unknown, None, "unknown")
    if unk and not cc.use_unknown:
        raise ValueError("the model has no unknown head; unknown interventions need one")
    return Intervention(known=_resolve_table(known, cc.n_known, vocab, "known"), unknown=unk,
                        positions=None if positions is None else np.asarray(positions, bool),
                        drop_epsilon=drop_epsilon)


def intervene(model, tokens, known: Mapping | None = None, unknown: Mapping | None = None,
              positions=None, *, vocab=None, drop_epsilon: bool = True, segment_ids=None):
    """One forward pass of tokens [B,T] with the concept weights overridden -> LMOutput."""
    tokens = np.asarray(tokens, np.int32)
    iv = make_intervention(model, known, unknown, positions, vocab=vocab, drop_epsilon=drop_epsilon)
    kw = iv.model_kwargs(np.arange(tokens.shape[0]), tokens.shape[1])
    kw = {k: tuple(jnp.asarray(a) for a in v) if isinstance(v, tuple) else v for k, v in kw.items()}
    return model(jnp.asarray(tokens), segment_ids=segment_ids, **kw)


def concept_direction(model, concept_ids: Iterable[int]) -> np.ndarray:
    """Unit direction [D]: the normalized sum of the known concepts' embeddings."""
    ids = jnp.asarray(list(concept_ids), jnp.int32)
    if ids.size == 0:
        raise ValueError("a steering direction needs at least one concept")
    s = np.asarray(model.rewrite.known_head.concept_vectors(ids), np.float32).sum(0)
    return (s / (np.linalg.norm(s) + 1e-12)).astype(np.float32)


def peak_alignment(model, direction: np.ndarray) -> float:
    """max_v W_v . d (floored at 1e-6): the largest logit shift a unit injection gives."""
    w = np.asarray(model.unembedding(), np.float32)
    return max(float((w @ direction).max()), 1e-6)


def injection(model, concept_ids: Iterable[int], target: float, *, layer: int | None = None,
              calibrate: bool = True, cutoff_tokens: int | None = None) -> Injection:
    """Injection of the concepts' direction; layer defaults to n_layers // 2 (Steerling)."""
    ids = tuple(int(i) for i in concept_ids)
    d = concept_direction(model, ids)
    alpha = target / peak_alignment(model, d) if calibrate else float(target)
    n_layers = model.config.n_layers
    layer = n_layers // 2 if layer is None else int(layer)
    if not 0 <= layer <= n_layers:
        raise ValueError(f"inject layer {layer} is outside [0, n_layers={n_layers}]")
    return Injection(direction=d, alpha=float(alpha), layer=layer, cutoff_tokens=cutoff_tokens,
                     concept_ids=ids)


def relu_logit_mask(model, strengths: Mapping[int, float]) -> np.ndarray:
    """[V] = sum_c s_c relu(E_k[c] . W_v): what suppression subtracts from the logits."""
    ids = jnp.asarray(list(strengths), jnp.int32)
    e = np.asarray(model.rewrite.known_head.concept_vectors(ids), np.float32)        # [K,D]
    align = e @ np.asarray(model.unembedding(), np.float32).T                       # [K,V]
    s = np.asarray(list(strengths.values()), np.float32)[:, None]
    return (s * np.maximum(align, 0.0)).sum(0).astype(np.float32)


def amplify(model, concepts, target: float = 8.0, *, layer: int | None = None,
            cutoff_tokens: int | None = 32, vocab=None) -> Steering:
    """Steerling's injection preset: +target logits on the direction's top token,
    full strength for the first cutoff_tokens committed tokens, then none.

    One difference: ``layer`` defaults to n_layers // 2 (Steerling's engine default, which
    its injection_relu preset uses), where Steerling's injection preset fixes layer 8,
    i.e. n_layers // 4 on Steerling-8B's 32 layers; pass layer=8 to reproduce it there.
    A fixed 8 would not exist in the 2-layer demo model."""
    ids = [resolve_concept(c, model.config.concepts.n_known, vocab) for c in _as_list(concepts)]
    return Steering(injection=injection(model, ids, target, layer=layer,
                                        cutoff_tokens=cutoff_tokens))


def suppress(model, concept, group=(), target: float = -7.0, *, layer: int | None = None,
             relu_strength: float = 20.0, vocab=None) -> Steering:
    """Steerling's injection_relu preset: raw negative injection of the concept (plus
    its group) at every step, and the ReLU logit mask of the concept alone."""
    n = model.config.concepts.n_known
    cid = resolve_concept(concept, n, vocab)
    ids = [cid] + [g for g in (resolve_concept(c, n, vocab) for c in _as_list(group)) if g != cid]
    return Steering(injection=injection(model, ids, target, layer=layer, calibrate=False),
                    logit_mask=relu_logit_mask(model, {cid: relu_strength}))


def combine(*parts: Steering) -> Steering:
    """One Steering from several: at most one intervention and one injection; masks add."""
    ivs = [p.intervention for p in parts if p.intervention is not None]
    injs = [p.injection for p in parts if p.injection is not None]
    if len(ivs) > 1 or len(injs) > 1:
        raise ValueError("combine: give at most one intervention and one injection "
                         "(amplify several concepts in one injection instead)")
    masks = [p.logit_mask for p in parts if p.logit_mask is not None]
    return Steering(intervention=ivs[0] if ivs else None, injection=injs[0] if injs else None,
                    logit_mask=np.sum(masks, axis=0).astype(np.float32) if masks else None)


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple, set, np.ndarray)) else [x]
