"""tools/explain.py on a freshly trained checkpoint writes the demo report:
the training summary against the unigram baseline and an exact decomposition."""

import re
import sys

import numpy as np
import pytest

from cbm_lm.eval.corpus_stats import unigram_entropy
from train_fixtures import ROOT, run, tiny_corpus, train_args

pytestmark = pytest.mark.slow


def test_unigram_entropy_by_hand(tmp_path):
    """Reference counts from the raw training texts run through the corpus's
    tokenizer, not from the corpus reader the library uses."""
    from cbm_lm.data.corpus import Corpus
    from cbm_lm.data.inputs import training_texts

    corpus = tiny_corpus(tmp_path / "c")
    tok = Corpus(str(corpus)).tokenizer
    counts = np.zeros(tok.vocab_size)
    for text in training_texts([tmp_path / "c" / "input.jsonl"], 0.3):   # tiny_corpus's split
        np.add.at(counts, tok.encode(text), 1)
    p = counts[counts > 0] / counts.sum()
    assert abs(unigram_entropy(str(corpus)) - float(-(p * np.log(p)).sum())) < 1e-12
    assert 0 < unigram_entropy(str(corpus)) < np.log(len(counts))


def test_report_on_trained_checkpoint(tmp_path):
    corpus = tiny_corpus(tmp_path / "c")
    workdir = tmp_path / "run"
    run(train_args(corpus, workdir, **{"train.num_steps": 4, "train.eval_every": 4}))
    report = tmp_path / "report.md"
    run([sys.executable, str(ROOT / "tools" / "explain.py"), "--checkpoint", str(workdir),
         "--corpus_dir", str(corpus), "--out", str(report), "--positions", "3"])
    text = report.read_text()
    assert "- steps: 4" in text and "unigram entropy of the training split" in text
    pattern = r"max \|known \+ unknown \+ epsilon - logit\| = ([0-9.e+-]+?)\.?$"
    err = float(re.search(pattern, text, re.M)[1])
    assert err < 1e-4
    assert len(re.findall(r"^### position \d+", text, re.M)) == 3
    assert re.search(r"known topic:\w+: [+-]\d", text)      # concept names from concepts.json
