"""A markdown report explaining a checkpoint through its concepts (tools/explain.py).

  1. Training: the last metrics.jsonl record of the checkpoint (losses, concept
     health; held-out lm_loss with and without epsilon) next to the corpus's unigram entropy, the loss of a context-free model.
  2. Concept decomposition of text: the model predicts the last tokens of a text
     (for a diffusion model, the start of its last diffusion block, masked; for an
     autoregressive one, each next token) and each true token's logit is split
     exactly into known concepts + unknown concepts + epsilon, with the identity's
     error, and the context tokens integrated gradients credits most.

The explanation itself is computed by cbm_lm.api.Explainer (teacher_forced +
attribute); this module only picks the text and writes the markdown.
"""

from __future__ import annotations

import json

import numpy as np
from etils import epath

from cbm_lm.atomic_io import write_text_atomic

TRAIN_KEYS = ("loss", "lm_loss", "concept_loss", "reconstruction_loss", "independence_loss",
              "concept_auroc", "share_known", "share_unknown", "share_epsilon",
              "dead_known_fraction", "tokens_per_sec")


def training_section(ckpt_dir: str, corpus_dir: str | None = None) -> list[str]:
    """Markdown lines summarizing DIR/metrics.jsonl (empty when there is none)."""
    path = epath.Path(ckpt_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        return []
    last = records[-1]
    evals = [r for r in records if "eval_lm_loss" in r]
    lines = ["## Training", "", f"- steps: {last['step']}"]
    lines += [f"- train {k}: {last[k]:.4f}" for k in TRAIN_KEYS if k in last]
    if evals:
        e = evals[-1]
        lines.append(f"- held-out lm_loss (step {e['step']}): {e['eval_lm_loss']:.4f} nats/token")
        # eval_lm_loss keeps epsilon (the backbone's loss); without it, the loss of the
        # concept path (known + unknown) that the explanations below describe.
        if "eval_lm_loss_no_epsilon" in e:
            lines.append(f"- held-out lm_loss without epsilon (concept path only): "
                         f"{e['eval_lm_loss_no_epsilon']:.4f} nats/token")
        if "eval_masked_ce" in e:
            lines.append(f"- held-out CE on masked tokens: {e['eval_masked_ce']:.4f}")
        if "eval_concept_auroc" in e:
            lines.append(f"- held-out concept AUROC: {e['eval_concept_auroc']:.4f}")
    if corpus_dir is not None:
        from cbm_lm.eval.corpus_stats import unigram_entropy
        h = unigram_entropy(corpus_dir, "train")
        lines.append(f"- unigram entropy of the training split: {h:.4f} nats/token")
        if evals:
            lines.append(f"- held-out lm_loss / unigram entropy: {evals[-1]['eval_lm_loss'] / h:.3f}")
    return lines + [""]


def first_document(corpus_dir: str, split: str = "heldout") -> np.ndarray:
    """Token ids of the first document of a corpus split. Raises ValueError naming the
    corpus directory and the split when the split is missing or holds no document."""
    from cbm_lm.data.corpus import Corpus
    corpus = Corpus(corpus_dir)
    if split not in corpus.manifest.get("splits", {}):
        raise ValueError(f"{corpus_dir}: no {split!r} split (have "
                         f"{sorted(corpus.manifest.get('splits', {}))}) to take a document from")
    doc = next(iter(corpus.documents(split)), None)
    if doc is None:
        raise ValueError(f"{corpus_dir}: the {split!r} split has no document to explain")
    return np.asarray(doc.tokens)


def explained_span(n_tokens: int, positions: int, diffusion: bool, block: int) -> tuple[int, int]:
    """[start, end) of the tokens to explain in a text of n_tokens: the first ``positions``
    tokens of the last diffusion block (start >= 1), or the last ``positions`` tokens."""
    if n_tokens < 2:
        raise ValueError(f"the text has {n_tokens} token(s); explaining needs at least 2")
    if diffusion:
        start = max(1, (n_tokens - 1) // block * block)
        return start, min(start + positions, n_tokens)
    return max(1, n_tokens - positions), n_tokens


def decomposition_section(gen, concepts, inputs, labels, decode, *, what: str, mode: str,
                          top: int = 5) -> list[str]:
    """Markdown lines for every explained token of ``gen`` (one sequence).

    concepts: ConceptAttribution of gen's tokens; inputs: InputAttribution or None;
    labels: ConceptLabels; decode: ids -> str (or None).
    """
    trace = gen.trace
    text = decode(trace.tokens[0]) if decode([0]) is not None else str(trace.tokens[0].tolist())
    check = concepts.verify(atol=1e-4)
    show = (lambda ids: repr(decode(ids))) if decode([0]) is not None else (lambda ids: f"#{ids[0]}")
    lines = ["## Concept decomposition", "",
             f"Input: {what} ({trace.length} tokens); {mode}.", "",
             "```", text[:2000], "```", "",
             f"Exact identity: max |known + unknown + epsilon - logit| = {check.max_abs_error:.2e}.",
             ""]
    for n in np.argsort(concepts.position, kind="stable"):
        p, y = int(concepts.position[n]), int(concepts.token[n])
        lines += [f"### position {p}: target {show([y])} (logit {float(concepts.logit[n]):.3f})", "",
                  f"- known concepts total {float(concepts.known_contrib[n].sum()):+.3f}, unknown "
                  f"{float(concepts.unknown_contrib[n].sum()):+.3f}, epsilon "
                  f"{float(concepts.epsilon[n]):+.3f}"]
        for kind, ids, contrib in (("known", concepts.known_ids, concepts.known_contrib),
                                   ("unknown", concepts.unknown_ids, concepts.unknown_contrib)):
            for j in np.argsort(-np.abs(contrib[n]), kind="stable")[:top]:
                if contrib[n, j] == 0:
                    continue
                name, _ = labels.label(int(ids[n, j]), kind)
                lines.append(f"  - {kind} {name}: {float(contrib[n, j]):+.4f}")
        if inputs is not None:
            a = inputs.for_token(0, p)
            ranked = np.argsort(-a, kind="stable")[:top]
            cells = ", ".join(f"{show([int(trace.tokens[0, t])])}@{int(t)} {float(a[t]):+.3f}"
                              for t in ranked if a[t] != 0)
            lines.append(f"- context tokens (integrated gradients): {cells}")
        lines.append("")
    return lines


def write_markdown(path: str, lines: list[str]) -> None:
    """Writes the report atomically (tmp file + rename), local or gs:// (etils.epath)."""
    write_text_atomic(path, "\n".join(lines))
