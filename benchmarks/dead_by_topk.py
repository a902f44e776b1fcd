"""Dead labelled concepts of a trained run if its deployed known head kept the top-k, per k.

    python benchmarks/dead_by_topk.py RUN 8,16,32

Eval only: restores RUN's newest checkpoint, draws the attribution-eval binary's
256 held-out windows (seed 0), sets ``known_head.topk = k`` and reruns
cbm_lm.eval.dead_concepts for each k. A concept alive at a wider k but dead at the
trained k ranks in the head's top-k' somewhere but is crowded out of the top-k
everywhere; a concept dead at every k is one the head never ranks high (not learned).
Diagnosis only: the active set feeds the LM path (f = sum_{i in S} sigmoid(z_i) E_i),
so a different k is a different model, and a recipe change needs a run trained with it.
Prints one JSON line per k: dead fraction, per-group dead / present counts, dead names.
"""

import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cbm_lm.eval.dead_concepts import dead_concepts  # noqa: E402
from cbm_lm.eval.heldout import heldout_windows  # noqa: E402
from cbm_lm.eval.target import load_target  # noqa: E402


def main(workdir: str, ks: str, num_examples: int = 256, seed: int = 0) -> None:
    t = load_target(workdir=workdir)
    corpus, n = t.corpus, len(t.corpus.concepts)
    seq_len = min(int(t.config.data.seq_len), t.model.config.max_seq_len)
    w = heldout_windows(corpus, num_examples, seq_len, seed)
    group = lambda j: corpus.concepts.name(j).split(":")[0]  # noqa: E731
    present = w.present(n)
    for k in (int(x) for x in ks.split(",")):
        t.model.rewrite.known_head.topk = k
        d = dead_concepts(t.model, w, n)
        print(json.dumps({
            "k": k, "dead": d.fraction, "dead_confident": d.fraction_confident,
            "present": d.num_present,
            "dead_by_group": dict(collections.Counter(group(j) for j in d.dead_ids)),
            "present_by_group": dict(collections.Counter(group(j) for j in range(n)
                                                         if present[j])),
            "dead_names": [corpus.concepts.name(j) for j in d.dead_ids]}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "8,16,32")
