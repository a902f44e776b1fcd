"""The user-facing API: load a checkpoint, generate, explain every output chunk, steer.

    from cbm_lm import Explainer
    ex = Explainer.load("runs/demo/train")                 # trained or imported checkpoint
    gen = ex.generate("The king said to his daughter", max_new_tokens=64, seed=1,
                      steering=ex.steer(amplify={"play:king-lear": 8.0}))
    for chunk in ex.explain(gen):
        print(chunk.text, chunk.top_concepts[:3], chunk.epsilon_share, chunk.top_input_tokens[:3])

An explanation of a chunk has three views:
  input tokens   which context tokens (prompt and earlier output) caused it:
                 integrated gradients replaying the pass that committed each
                 token (cbm_lm/attribution/input_attribution.py);
  concepts       which concepts carried it: the exact decomposition of each
                 token's logit, taken in the pass that committed it, per chunk
                 with Steerling's normalization (cbm_lm/attribution/chunk_aggregation.py);
  training data  which training chunks it came from: ``training_chunks``, filled
                 by ``Explainer.provenance`` when one is attached (None otherwise).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from cbm_lm.attribution.chunk_aggregation import ChunkConcepts, ConceptLabels, chunk_concepts
from cbm_lm.attribution.concept_attribution import (ConceptAttribution, commit_capture,
                                                    concept_attribution)
from cbm_lm.attribution.input_attribution import InputAttribution, input_attribution
from cbm_lm.attribution.replay import replay_for
from cbm_lm.inference import steering as steering_lib
from cbm_lm.inference.chunks import trace_chunks
from cbm_lm.inference.generate import generate as run_sampler
from cbm_lm.inference.logit_processing import SamplingConfig
from cbm_lm.inference.steer_spec import Steering
from cbm_lm.inference.trace import GenerationTrace


@dataclasses.dataclass
class Generation:
    """What ``Explainer.generate`` returns: the trace, its output chunks and the text.

    trace:  the GenerationTrace (tokens [B,L], commit steps, steering; cbm_lm/inference/trace.py)
    chunks: per sequence, its output chunks [(start, end)] (absolute positions)
    texts:  per sequence, the generated text (None without a tokenizer)
    """
    trace: GenerationTrace
    chunks: list[list[tuple[int, int]]]
    texts: list[str | None]
    prompt_texts: list[str | None]

    def prompt_ids(self, b: int = 0) -> np.ndarray:
        return self.trace.prompt(b)

    def generated_ids(self, b: int = 0) -> np.ndarray:
        return self.trace.generated(b)


@dataclasses.dataclass
class ChunkExplanation:
    """One output chunk [start, end) of sequence ``batch``, explained three ways.

    top_concepts:     [{"id", "type", "name", "group", "score"}] by |score| (Steerling's
                      per-chunk normalization); epsilon_share the residual's share.
    top_input_tokens: [{"position", "token_id", "text", "score"}] best first.
    training_chunks:  filled by the attached provenance engine, else None.
    """
    batch: int
    start: int
    end: int
    text: str | None
    top_concepts: list[dict]
    epsilon_share: float
    top_input_tokens: list[dict]
    training_chunks: list[dict] | None = None

    def to_json(self) -> dict:
        out = {"start": self.start, "end": self.end, "text": self.text,
               "top_concepts": self.top_concepts, "epsilon_share": self.epsilon_share,
               "top_input_tokens": self.top_input_tokens}
        if self.training_chunks is not None:
            out["training_chunks"] = self.training_chunks
        return out


class Explainer:
    """A loaded model with its tokenizer and concept names; see the module docstring.

    model: a ConceptBottleneckLM. tokenizer: cbm_lm.data.tokenizer.Tokenizer or None
    (then prompts are id lists and texts are None). concepts: a ConceptVocab or None
    (concepts are then named k<id> / u<id>). provenance: an optional callable
    (explainer, generation, chunk: ChunkExplanation) -> list[dict] of training chunks.
    """

    def __init__(self, model, tokenizer=None, concepts=None, *, mesh=None,
                 provenance: Callable | None = None, source: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.concepts = concepts
        self.labels = ConceptLabels(concepts)
        self.mesh = mesh
        self.provenance = provenance
        self.source = source

    # -- loading ------------------------------------------------------------------------
    @classmethod
    def load(cls, checkpoint: str, *, corpus_dir: str | None = None, step: int | None = None,
             **kw) -> "Explainer":
        """Loads a cbm_lm checkpoint directory (a training workdir or an imported Steerling
        checkpoint). The tokenizer and concepts.json come from ``corpus_dir``, else from the
        corpus the config names (data.dir) or a ``corpus`` folder beside or inside the
        checkpoint, else from tokenizer/concepts files in the checkpoint itself."""
        from cbm_lm.train.checkpoint import load_model  # restore needs no training loop
        model, config = load_model(checkpoint, step=step, mesh=kw.get("mesh"))
        tokenizer, concepts = load_vocabularies(checkpoint, config, corpus_dir)
        if "provenance" not in kw:   # the training-chunk view, when the run has an index
            from cbm_lm.provenance.open import training_chunk_view
            kw["provenance"] = training_chunk_view(checkpoint, model, config,
                                                   corpus_dir=corpus_dir)
        return cls(model, tokenizer, concepts, source=checkpoint, **kw)

    # -- text -----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"{self.source or 'this model'}: no tokenizer found (give corpus_dir, "
                             "or pass token ids instead of text)")
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([int(i) for i in ids])

    def special_ids(self) -> dict[str, int]:
        """MASK (and PAD, BOS, <|endofchunk|> when a tokenizer is known)."""
        ids = {"mask": self.model.config.resolved_mask_token_id}
        if self.tokenizer is not None:
            ids.update(pad=self.tokenizer.pad_id, bos=self.tokenizer.bos_id,
                       endofchunk=self.tokenizer.endofchunk_id)
        return ids

    # -- steering -----------------------------------------------------------------------
    def steer(self, amplify: Mapping | None = None, suppress: Sequence | None = None,
              intervene: Mapping | None = None, *, positions=None, layer: int | None = None,
              cutoff_tokens: int | None = 32) -> Steering:
        """A Steering for ``generate`` (concepts by name, id, or u<id> for unknown ones).

        amplify {concept: target}: residual injection of the concepts' direction, calibrated
          so the top token gains ``target`` logits (several concepts share one direction,
          strength their mean target; Steerling's injection preset, cbm_lm.inference.steering).
        suppress [concept, ...]: negative injection of the first concept (and the others as
          its group) plus the ReLU logit mask (Steerling's injection_relu preset).
        intervene {concept: weight}: weight override at ``positions`` ([B,L] bool or all),
          epsilon dropped.
        """
        parts, vocab = [], self.concepts
        if amplify and suppress:
            raise ValueError("steer: amplify and suppress each add a residual injection; give one")
        if amplify:
            target = float(np.mean([float(v) for v in amplify.values()]))
            parts.append(steering_lib.amplify(self.model, list(amplify), target, layer=layer,
                                              cutoff_tokens=cutoff_tokens, vocab=vocab))
        if suppress:
            names = list(suppress)
            parts.append(steering_lib.suppress(self.model, names[0], names[1:], layer=layer,
                                               vocab=vocab))
        if intervene:
            known = {k: v for k, v in intervene.items() if not _is_unknown_name(k)}
            unknown = {k: v for k, v in intervene.items() if _is_unknown_name(k)}
            parts.append(Steering(intervention=steering_lib.make_intervention(
                self.model, known, unknown, positions, vocab=vocab)))
        return steering_lib.combine(*parts) if parts else Steering()

    # -- generation ---------------------------------------------------------------------
    def generate(self, prompts, *, max_new_tokens: int = 64, seed: int = 0,
                 steering: Steering | None = None, capture: bool = True,
                 **sampling) -> Generation:
        """Generates after each prompt (a string, a list of strings, an id list or a list of id
        lists). ``sampling``: SamplingConfig fields (top_p, temperature, cfg_scale, grid, ...).
        capture: decompose each token's logit in the pass that commits it (commit_capture)."""
        ids = self._prompt_ids(prompts)
        special = self.special_ids()
        banned = tuple(sorted({special[k] for k in ("mask", "pad", "bos") if k in special}))
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, seed=seed,
                             banned_ids=sampling.pop("banned_ids", banned), **sampling)
        pad = special.get("pad", special["mask"])
        trace = run_sampler(self.model, ids, cfg, steering, pad_id=pad,
                            capture_fn=commit_capture if capture else None)
        # Steerling's rule: a sequence ends at its first stop token (excluded). A diffusion row
        # stops only at the end of the block that holds it, so the block's later tokens are
        # in the trace but in no chunk and not in the text.
        chunks = trace_chunks(trace, special.get("endofchunk", -1), cfg.stop_ids)
        texts = [self.decode(_until_stop(trace.generated(b), cfg.stop_ids))
                 for b in range(trace.batch_size)]
        prompts_text = [self.decode(trace.prompt(b)) for b in range(trace.batch_size)]
        return Generation(trace, chunks, texts, prompts_text)

    def _prompt_ids(self, prompts) -> list[np.ndarray]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if hasattr(prompts, "__array__"):            # numpy or jax ids: [P] or [B,P]
            prompts = np.asarray(prompts)
            prompts = [prompts] if prompts.ndim == 1 else list(prompts)
        elif len(prompts) and not isinstance(prompts[0], str) and np.ndim(prompts[0]) == 0:
            prompts = [prompts]                      # one flat id list
        return [np.asarray(self.encode(p) if isinstance(p, str) else p, np.int32) for p in prompts]

    def teacher_forced(self, ids, n_explain: int) -> Generation:
        """The last ``n_explain`` tokens of ``ids`` [T] as if the model had generated them:
        a trace whose prompt is ids[:T - n] and whose "generated" tokens are the true ones,
        committed all at once from a fully masked window (diffusion) or one per step
        (autoregressive). Explaining it explains the model's prediction of real text.
        Raises ValueError, as the samplers do, when ids do not fit the model's max_seq_len
        or hold an id outside its vocabulary."""
        ids = np.asarray(ids, np.int32).reshape(-1)
        n = int(n_explain)
        if not 0 < n < len(ids):
            raise ValueError(f"n_explain={n}: expected 1..{len(ids) - 1} (the prompt keeps >= 1 "
                             f"of the {len(ids)} tokens)")
        cfg = self.model.config
        if len(ids) > cfg.max_seq_len:
            raise ValueError(f"teacher_forced: {len(ids)} tokens; the model's max_seq_len is "
                             f"{cfg.max_seq_len} (keep the last {cfg.max_seq_len} or fewer)")
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            bad = int(ids[(ids < 0) | (ids >= cfg.vocab_size)][0])
            raise ValueError(f"teacher_forced: id {bad} is outside the vocabulary "
                             f"[0, {cfg.vocab_size})")
        diffusion = self.model.config.attention != "causal"
        steps = np.zeros(n, np.int32) if diffusion else np.arange(n, dtype=np.int32)
        committed = np.full((1, len(ids)), -1, np.int32)
        committed[0, len(ids) - n:] = steps
        special = self.special_ids()
        trace = GenerationTrace(
            tokens=ids[None], prompt_lens=np.asarray([len(ids) - n], np.int32),
            gen_lens=np.asarray([n], np.int32), committed_step=committed,
            objective="diffusion" if diffusion else "autoregressive", mask_id=special["mask"],
            pad_id=special.get("pad", special["mask"]), max_new_tokens=n,
            num_steps=int(steps.max()) + 1, diffusion_shift=self.model.config.diffusion_shift)
        start = len(ids) - n
        return Generation(trace, [[(start, len(ids))]], [self.decode(ids[start:])],
                          [self.decode(ids[:start])])

    # -- explanation --------------------------------------------------------------------
    def attribute(self, gen: Generation, *, n_steps: int = 16, baseline: str = "mask",
                  batch_size: int = 16, spans: Sequence[tuple[int, int, int]] | None = None
                  ) -> tuple[InputAttribution, ConceptAttribution]:
        """The per-token views: IG [Q,L] over the generated tokens and their concept
        contributions (from the commit-time capture when the trace has one).
        spans: only the tokens inside these (batch, start, end) spans (default all)."""
        replay = replay_for(self.model, gen.trace)
        if spans is not None:
            keep = np.zeros(replay.num, bool)
            for b, start, end in spans:
                keep |= (replay.batch == b) & (replay.position >= start) & (replay.position < end)
            replay = replay.select(keep)
        inputs = input_attribution(self.model, replay, n_steps=n_steps, baseline=baseline,
                                   batch_size=batch_size, mesh=self.mesh)
        concepts = concept_attribution(self.model, replay)
        return inputs, concepts

    def explain(self, gen: Generation, batch: int | None = None, chunk: int | None = None, *,
                n_steps: int = 16, top_k: int = 5, input_scope: str = "all",
                views: tuple[InputAttribution, ConceptAttribution] | None = None
                ) -> list[ChunkExplanation]:
        """Output chunks with their three views: chunk ``chunk`` of sequence ``batch`` (then
        only its tokens are attributed), every chunk of ``batch``, or of every sequence.

        n_steps: IG Riemann steps (1 = gradient x input). top_k: concepts and input tokens
        listed per chunk. input_scope: "prompt" | "generated" | "all" input positions.
        views: precomputed ``attribute(gen)`` results to reuse.
        """
        seqs = range(gen.trace.batch_size) if batch is None else [batch]
        wanted = [(b, s, e) for b in seqs for s, e in gen.chunks[b]]
        if chunk is not None:
            b = 0 if batch is None else batch
            if not 0 <= chunk < len(gen.chunks[b]):
                raise IndexError(f"chunk {chunk}: sequence {b} has {len(gen.chunks[b])} chunks")
            wanted = [(b, *gen.chunks[b][chunk])]
        if not wanted:
            return []
        inputs, concepts = views or self.attribute(
            gen, n_steps=n_steps, spans=wanted if chunk is not None else None)
        out = []
        for b, start, end in wanted:
            cc: ChunkConcepts = chunk_concepts(concepts, b, start, end, self.labels)
            tops = inputs.top_tokens(b, start, end, k=top_k, scope=input_scope)
            for t in tops:
                t["text"] = self.decode([t["token_id"]])
            ex = ChunkExplanation(b, start, end, self.decode(gen.trace.tokens[b, start:end]),
                                  cc.top(top_k), cc.epsilon_share, tops)
            if self.provenance is not None:
                ex.training_chunks = self.provenance(self, gen, ex)
            out.append(ex)
        return out

    def to_json(self, gen: Generation, explanations: list[ChunkExplanation] | None = None
                ) -> list[dict]:
        """Per sequence {"prompt_ids", "tokens", "text", "chunks": [...]} (tools/generate.py)."""
        rows = []
        for b in range(gen.trace.batch_size):
            row = {"prompt_ids": [int(i) for i in gen.prompt_ids(b)],
                   "prompt": gen.prompt_texts[b],
                   "tokens": [int(i) for i in gen.generated_ids(b)], "text": gen.texts[b]}
            if explanations is not None:
                row["chunks"] = [e.to_json() for e in explanations if e.batch == b]
            else:
                row["chunks"] = [{"start": s, "end": e, "text": self.decode(gen.trace.tokens[b, s:e])}
                                 for s, e in gen.chunks[b]]
            rows.append(row)
        return rows

    def to_text(self, gen: Generation, explanations: list[ChunkExplanation]) -> str:
        """Per sequence: the prompt, then each output chunk's text and its three views on
        indented lines (concepts with epsilon's share, input tokens, training chunks)."""
        out = []
        for row in self.to_json(gen, explanations):
            out.append(str(row["prompt"] if row["prompt"] is not None else row["prompt_ids"]))
            p = len(row["prompt_ids"])
            for i, c in enumerate(row["chunks"]):
                out.append(f"--- chunk {i} [{c['start']}, {c['end']}) ---")
                out.append(str(c["text"] if c["text"] is not None
                               else row["tokens"][c["start"] - p: c["end"] - p]))
                out.append("    concepts: " + ", ".join(
                    f"{e['name']} {e['score']:+.3f}" for e in c["top_concepts"])
                    + f"; epsilon {c['epsilon_share']:+.3f}")
                out.append("    input tokens: " + ", ".join(
                    f"{t['text'] if t['text'] is not None else '#' + str(t['token_id'])!r}"
                    f"@{t['position']} {t['score']:+.3f}" for t in c["top_input_tokens"]))
                if "training_chunks" in c:
                    out.append("    training chunks: " + ", ".join(
                        f"{m.get('chunk_id')} ({m.get('source', '?')}) {m.get('score', 0.0):.3f}"
                        for m in c["training_chunks"]))
            out.append("")
        return "\n".join(out)


def _until_stop(ids: np.ndarray, stop_ids) -> np.ndarray:
    """ids [N] up to (excluding) the first of ``stop_ids``."""
    hit = np.flatnonzero(np.isin(ids, np.asarray(list(stop_ids), ids.dtype)))
    return ids[:hit[0]] if len(hit) else ids


def _is_unknown_name(key) -> bool:
    return isinstance(key, str) and key.startswith("u") and key[1:].isdigit()


def find_corpus(checkpoint: str, config=None) -> str | None:
    """The corpus directory that goes with a checkpoint, or None: data.dir from its config
    (as given, or relative to the checkpoint's parent), else ``corpus`` beside or inside it."""
    candidates = []
    data_dir = config.get("data", {}).get("dir", "") if config is not None else ""
    if data_dir:
        candidates += [data_dir, os.path.join(os.path.dirname(os.path.abspath(checkpoint)),
                                              os.path.basename(os.path.normpath(data_dir)))]
    candidates += [os.path.join(checkpoint, os.pardir, "corpus"), os.path.join(checkpoint, "corpus")]
    for c in candidates:
        if os.path.exists(os.path.join(c, "manifest.json")):
            return os.path.normpath(c)
    return None


def load_vocabularies(checkpoint: str, config=None, corpus_dir: str | None = None):
    """(tokenizer or None, ConceptVocab or None) for a checkpoint; see Explainer.load."""
    from cbm_lm.data import tokenizer as tokenizer_lib
    from cbm_lm.data.concepts import ConceptVocab
    if corpus_dir is not None and not os.path.exists(os.path.join(corpus_dir, "manifest.json")):
        raise FileNotFoundError(f"{corpus_dir}: no manifest.json; expected a corpus built by "
                                "tools/build_corpus.py")
    corpus_dir = corpus_dir or find_corpus(checkpoint, config)
    folder = corpus_dir or checkpoint
    tokenizer = concepts = None
    try:
        tokenizer = tokenizer_lib.load(folder)
    except FileNotFoundError:
        pass
    if os.path.exists(os.path.join(folder, "concepts.json")):
        concepts = ConceptVocab.load(os.path.join(folder, "concepts.json"))
    return tokenizer, concepts
