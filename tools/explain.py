"""Explains a checkpoint's predictions through its concepts (exact decomposition).

  python tools/explain.py --checkpoint DIR [--input_ids IDS.npy] [--positions 5] --out report.md

For each of the first --positions positions of the first sequence, takes the
model's top predicted token y and splits logit_y into the known concepts,
unknown concepts and epsilon (cbm_lm.attribution.decomposition), reporting
the largest contributions and the identity's residual error. Concept names
come from concepts.json in --corpus_dir when given.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from cbm_lm.attribution.decomposition import decompose_logits
from cbm_lm.train.checkpoint import load_model

_CKPT = flags.DEFINE_string("checkpoint", None, "cbm_lm checkpoint directory.", required=True)
_IDS = flags.DEFINE_string("input_ids", None, "[B,T] int32 .npy; default: random ids.")
_CORPUS = flags.DEFINE_string("corpus_dir", None, "Corpus dir with concepts.json for names.")
_POSITIONS = flags.DEFINE_integer("positions", 4, "How many positions to explain.")
_TOP = flags.DEFINE_integer("top", 5, "Contributions listed per head.")
_OUT = flags.DEFINE_string("out", None, "Markdown report path.", required=True)


def _concept_names(corpus_dir):
    if not corpus_dir:
        return {}
    with open(os.path.join(corpus_dir, "concepts.json")) as f:
        table = json.load(f)
    items = table if isinstance(table, list) else table.get("concepts", table)
    if isinstance(items, dict):
        return {int(k): (v["name"] if isinstance(v, dict) else str(v)) for k, v in items.items()}
    return {int(c["id"]): c["name"] for c in items}


def main(argv):
    del argv
    model, config = load_model(_CKPT.value)
    vocab = model.config.vocab_size
    if _IDS.value:
        ids = np.load(_IDS.value)
        if ids.ndim != 2 or ids.min() < 0 or ids.max() >= vocab:
            raise app.UsageError(f"{_IDS.value}: expected [B,T] ids in [0, {vocab}), "
                                 f"got shape {ids.shape}, range [{ids.min()}, {ids.max()}]")
    else:
        ids = np.random.default_rng(0).integers(0, vocab, size=(1, 16))
    ids = jnp.asarray(ids, jnp.int32)
    out = model(ids)
    n = min(_POSITIONS.value, ids.shape[1])
    pos = jnp.arange(n)
    targets = jnp.argmax(out.logits[0, :n], axis=-1)
    dec = decompose_logits(model, out, jnp.zeros(n, jnp.int32), pos, targets)
    names = _concept_names(_CORPUS.value)
    err = float(jnp.abs(dec.total() - dec.logit).max())

    lines = [f"# Concept decomposition: {_CKPT.value}", "",
             f"Exact identity check: max |sum(contributions) - logit| = {err:.2e} over {n} positions.",
             ""]
    for i in range(n):
        lines += [f"## position {i}: input id {int(ids[0, i])} -> predicted id {int(targets[i])}"
                  f" (logit {float(dec.logit[i]):.4f})", "",
                  f"- epsilon: {float(dec.epsilon_contrib[i]):+.4f}",
                  f"- known total: {float(dec.known_contrib[i].sum()):+.4f}, "
                  f"unknown total: {float(dec.unknown_contrib[i].sum()):+.4f}"]
        for label, cids, contrib in (("known", dec.known_ids, dec.known_contrib),
                                     ("unknown", dec.unknown_ids, dec.unknown_contrib)):
            order = np.argsort(-np.abs(np.asarray(contrib[i])))[: _TOP.value]
            for j in order:
                cid = int(cids[i, j])
                name = names.get(cid, f"#{cid}") if label == "known" else f"u#{cid}"
                lines.append(f"  - {label} {name}: {float(contrib[i, j]):+.4f}")
        lines.append("")
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    tmp = _OUT.value + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, _OUT.value)
    print(f"wrote {_OUT.value} (identity error {err:.2e})")


if __name__ == "__main__":
    app.run(main)
