"""Writes a markdown report explaining a checkpoint through its concepts.

  python tools/explain.py --checkpoint DIR [--corpus_dir CORPUS] [--text "..."] --out report.md

Sections:
  1. Training: the last metrics.jsonl record of DIR (losses, concept health)
     next to the corpus's unigram entropy, the loss of a context-free model.
  2. Concept decomposition of held-out text (the first held-out document of
     CORPUS, or --text, or random ids): for a diffusion model the last
     diffusion block is masked and the true token's logit at each masked
     position is split exactly into known concepts + unknown concepts +
     epsilon (cbm_lm.attribution.decomposition); an autoregressive model
     explains each next token. The identity's residual error is reported.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from cbm_lm.attribution.decomposition import decompose_logits
from cbm_lm.train.checkpoint import load_model

_CKPT = flags.DEFINE_string("checkpoint", None, "cbm_lm checkpoint directory.", required=True)
_CORPUS = flags.DEFINE_string("corpus_dir", None, "Corpus dir (tokenizer, concept names).")
_TEXT = flags.DEFINE_string("text", None, "Text to explain (needs --corpus_dir's tokenizer).")
_IDS = flags.DEFINE_string("input_ids", None, "[1,T] int32 .npy to explain instead of text.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "Tokens of context to run.")
_POSITIONS = flags.DEFINE_integer("positions", 6, "Positions to explain.")
_TOP = flags.DEFINE_integer("top", 5, "Contributions listed per head.")
_OUT = flags.DEFINE_string("out", None, "Markdown report path.", required=True)


def _training_section(ckpt_dir, corpus):
    path = os.path.join(ckpt_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    last = records[-1]
    evals = [r for r in records if "eval_lm_loss" in r]
    lines = ["## Training", "", f"- steps: {last['step']}"]
    keys = ("loss", "lm_loss", "concept_loss", "reconstruction_loss", "independence_loss",
            "concept_auroc", "share_known", "share_unknown", "share_epsilon",
            "dead_known_fraction", "tokens_per_sec")
    lines += [f"- train {k}: {last[k]:.4f}" for k in keys if k in last]
    if evals:
        e = evals[-1]
        lines.append(f"- held-out lm_loss (step {e['step']}): {e['eval_lm_loss']:.4f} nats/token")
        if "eval_masked_ce" in e:
            lines.append(f"- held-out CE on masked tokens: {e['eval_masked_ce']:.4f}")
        if "eval_concept_auroc" in e:
            lines.append(f"- held-out concept AUROC: {e['eval_concept_auroc']:.4f}")
    if corpus is not None:
        from cbm_lm.eval.corpus_stats import unigram_entropy
        h = unigram_entropy(corpus.dir, "train")
        lines.append(f"- unigram entropy of the training split: {h:.4f} nats/token")
        if evals:
            lines.append(f"- held-out lm_loss / unigram entropy: {evals[-1]['eval_lm_loss'] / h:.3f}")
    return lines + [""]


def _input_ids(corpus, vocab):
    if _IDS.value:
        ids = np.load(_IDS.value)
        if ids.ndim != 2 or ids.min() < 0 or ids.max() >= vocab:
            raise app.UsageError(f"{_IDS.value}: expected [B,T] ids in [0, {vocab}), got shape "
                                 f"{ids.shape}, range [{ids.min()}, {ids.max()}]")
        return ids[:1, : _MAX_TOKENS.value], "ids from " + _IDS.value
    if corpus is not None:
        if _TEXT.value:
            return np.asarray([corpus.tokenizer.encode(_TEXT.value)[: _MAX_TOKENS.value]]), "--text"
        doc = next(iter(corpus.documents("heldout")))
        return np.asarray([doc.tokens[: _MAX_TOKENS.value]]), "the first held-out document"
    if _TEXT.value:
        raise app.UsageError("--text needs --corpus_dir for the tokenizer")
    return np.random.default_rng(0).integers(0, vocab, size=(1, 16)), "random ids"


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    model, _ = load_model(_CKPT.value)
    cfg = model.config
    corpus = None
    if _CORPUS.value:
        from cbm_lm.data.corpus import Corpus
        corpus = Corpus(_CORPUS.value)
    names = {i: corpus.concepts.name(i) for i in range(len(corpus.concepts))} if corpus else {}
    decode = (lambda i: repr(corpus.tokenizer.decode([int(i)]))) if corpus else (lambda i: f"#{i}")

    ids, what = _input_ids(corpus, cfg.vocab_size)
    ids = jnp.asarray(ids, jnp.int32)
    t_len = ids.shape[1]
    if cfg.objective == "diffusion":
        b = cfg.diffusion_block_size
        start = max(0, (t_len - 1) // b * b)
        pos = np.arange(start, min(start + _POSITIONS.value, t_len))
        inputs = ids.at[0, pos].set(cfg.resolved_mask_token_id)
        targets = ids[0, pos]
        mode = f"masked diffusion: block starting at {start} masked, true tokens explained"
    else:
        pos = np.arange(max(0, t_len - 1 - _POSITIONS.value), t_len - 1)
        inputs, targets = ids, ids[0, pos + 1]
        mode = "autoregressive: the next token explained"
    out = model(inputs)
    dec = decompose_logits(model, out, jnp.zeros(len(pos), jnp.int32), jnp.asarray(pos), targets)
    err = float(jnp.abs(dec.total() - dec.logit).max())

    lines = [f"# cbm_lm report: {_CKPT.value}", ""]
    lines += _training_section(_CKPT.value, corpus)
    context = corpus.tokenizer.decode(np.asarray(ids[0])) if corpus else str(np.asarray(ids[0]))
    lines += ["## Concept decomposition", "", f"Input: {what} ({t_len} tokens); {mode}.", "",
              "```", context[:2000], "```", "",
              f"Exact identity: max |known + unknown + epsilon - logit| = {err:.2e}.", ""]
    for i, p in enumerate(pos):
        prob = float(jax.nn.softmax(out.logits[0, p])[int(targets[i])])
        lines += [f"### position {int(p)}: target {decode(targets[i])} "
                  f"(logit {float(dec.logit[i]):.3f}, p={prob:.3f})", "",
                  f"- known concepts total {float(dec.known_contrib[i].sum()):+.3f}, unknown "
                  f"{float(dec.unknown_contrib[i].sum()):+.3f}, epsilon "
                  f"{float(dec.epsilon_contrib[i]):+.3f}"]
        for label, cids, contrib in (("known", dec.known_ids, dec.known_contrib),
                                     ("unknown", dec.unknown_ids, dec.unknown_contrib)):
            for j in np.argsort(-np.abs(np.asarray(contrib[i])))[: _TOP.value]:
                cid = int(cids[i, j])
                name = names.get(cid, f"#{cid}") if label == "known" else f"u{cid}"
                lines.append(f"  - {label} {name}: {float(contrib[i, j]):+.4f}")
        lines.append("")

    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    tmp = _OUT.value + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, _OUT.value)
    print(f"wrote {_OUT.value} (decomposition identity error {err:.2e})")



if __name__ == "__main__":
    app.run(main)
