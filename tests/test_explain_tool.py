"""tools/explain.py and tools/generate.py on a freshly trained checkpoint: the
demo report (training summary against the unigram baseline, exact
decomposition) and generation with per-chunk explanations; generate.py also
on an imported Steerling checkpoint, which has no tokenizer."""

import json
import re
import sys

import numpy as np
import pytest

from cbm_lm.eval.corpus_stats import unigram_entropy
from data_fixtures import build
from train_fixtures import ROOT, run, tiny_corpus, train_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    corpus = tiny_corpus(tmp / "c")
    workdir = tmp / "run"
    run(train_args(corpus, workdir, **{"train.num_steps": 4, "train.eval_every": 4}))
    return corpus, workdir


def _tool(name, *args, check=True):
    return run([sys.executable, str(ROOT / "tools" / name), *map(str, args)], check=check)


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


def test_report_on_trained_checkpoint(trained, tmp_path):
    corpus, workdir = trained
    report = tmp_path / "report.md"
    _tool("explain.py", "--checkpoint", workdir, "--corpus_dir", corpus, "--out", report,
          "--positions", 3)
    text = report.read_text()
    assert "- steps: 4" in text and "unigram entropy of the training split" in text
    pattern = r"max \|known \+ unknown \+ epsilon - logit\| = ([0-9.e+-]+?)\.?$"
    err = float(re.search(pattern, text, re.M)[1])
    assert err < 1e-4
    assert len(re.findall(r"^### position \d+", text, re.M)) == 3
    assert re.search(r"known topic:\w+: [+-]\d", text)      # concept names from concepts.json
    assert len(re.findall(r"^- context tokens \(integrated gradients\): \S", text, re.M)) == 3
    # a corpus whose held-out split is empty: an error naming it, not a StopIteration
    empty = build(tmp_path / "empty")                 # heldout_fraction 0: 0 held-out records
    bad = _tool("explain.py", "--checkpoint", workdir, "--corpus_dir", empty, "--out",
                tmp_path / "r2.md", check=False)
    assert bad.returncode != 0 and "StopIteration" not in bad.stderr
    assert f"{empty}: the 'heldout' split has no document to explain" in bad.stderr
    assert not (tmp_path / "r2.md").exists()


def test_first_document_names_the_corpus_and_split(tmp_path):
    from cbm_lm.data.corpus import Corpus
    from cbm_lm.eval.checkpoint_report import first_document
    corpus = build(tmp_path / "c")
    assert Corpus(corpus).manifest["splits"]["heldout"]["shards"][0]["records"] == 0
    with pytest.raises(ValueError, match=f"{corpus}: the 'heldout' split has no document"):
        first_document(str(corpus), "heldout")
    with pytest.raises(ValueError, match=f"{corpus}: no 'dev' split"):
        first_document(str(corpus), "dev")
    first = next(iter(Corpus(corpus).documents("train")))
    np.testing.assert_array_equal(first_document(str(corpus), "train"), first.tokens)


def test_generate_json_on_trained_checkpoint(trained):
    corpus, workdir = trained
    from cbm_lm.data.corpus import Corpus
    c = Corpus(corpus)
    names = {x.name: x.group for x in c.concepts.concepts}
    out = _tool("generate.py", "--checkpoint", workdir, "--corpus_dir", corpus,
                "--prompt", "The king", "--max_new_tokens", 12, "--seed", 2, "--json",
                "--amplify", f"{c.concepts.name(0)}=4").stdout
    d = json.loads(out)
    assert d["prompt_ids"] == c.tokenizer.encode("The king")
    assert len(d["tokens"]) == 12 and d["text"] == c.tokenizer.decode(d["tokens"])
    p = len(d["prompt_ids"])
    assert d["chunks"] and d["chunks"][0]["start"] == p
    for ch in d["chunks"]:
        assert ch["text"] == c.tokenizer.decode(d["tokens"][ch["start"] - p: ch["end"] - p])
        assert -1 <= ch["epsilon_share"] <= 1
        for e in ch["top_concepts"]:
            if e["type"] == "known" and e["id"] < len(c.concepts):
                assert e["name"] == c.concepts.name(e["id"]) and names[e["name"]] == e["group"]
            elif e["type"] == "known":                       # an id concepts.json leaves unnamed
                assert e["name"] == f"k{e['id']}"
            else:
                assert e["name"] == f"u{e['id']}"
        assert ch["top_input_tokens"] and all(t["position"] < ch["end"]
                                              for t in ch["top_input_tokens"])
    plain = _tool("generate.py", "--checkpoint", workdir, "--corpus_dir", corpus,
                  "--prompt", "The king", "--max_new_tokens", 12, "--seed", 2,
                  "--amplify", f"{c.concepts.name(0)}=4", "--top_k", 2).stdout
    assert plain.startswith("The king") and "--- chunk 0 [" in plain
    assert d["text"].split(c.tokenizer.decode([c.tokenizer.endofchunk_id]))[0] in plain
    # without --json each chunk is explained too, and --top_k reaches it (it was ignored):
    # the JSON run's top concepts (same seed), cut to 2, in the same order
    concept_lines = re.findall(r"^    concepts: (.*)$", plain, re.M)
    assert len(concept_lines) == len(d["chunks"])
    for line, ch in zip(concept_lines, d["chunks"]):
        names = [e.rsplit(" ", 1)[0] for e in line.split("; epsilon")[0].split(", ")]
        assert names == [e["name"] for e in ch["top_concepts"][:2]]
    assert len(re.findall(r"^    input tokens: \S", plain, re.M)) == len(d["chunks"])
    bad = _tool("generate.py", "--checkpoint", workdir, "--corpus_dir", corpus, "--prompt", "x",
                "--amplify", "topic", check=False)
    assert bad.returncode != 0 and "--amplify='topic': expected NAME=VALUE" in bad.stderr
    # --temperature reaches the sampler once entropy sampling is off (it was ignored)
    def tokens(*flags):
        return json.loads(_tool("generate.py", "--checkpoint", workdir, "--corpus_dir", corpus,
                                "--prompt", "The king", "--max_new_tokens", 12, "--seed", 2,
                                "--json", "--n_steps", 1, *flags).stdout)["tokens"]
    greedy = tokens("--noentropy_sampling", "--temperature", 0)           # argmax: no seed
    assert greedy == tokens("--noentropy_sampling", "--temperature", 0, "--seed", 5)
    assert greedy != tokens("--noentropy_sampling", "--temperature", 5.0, "--top_p", 1.0)


@pytest.mark.parity
def test_generate_on_imported_steerling_checkpoint(tmp_path):
    from steerling_fixtures import make_steerling, save_steerling
    model, cfg, ccfg = make_steerling({}, {}, seed=0)
    save_steerling(model, cfg, ccfg, str(tmp_path / "src"))
    _tool("import_steerling.py", "--src", tmp_path / "src", "--out", tmp_path / "ckpt")
    ids = np.asarray([[5, 17, 33, 2], [9, 8, 7, 6]])
    np.save(tmp_path / "ids.npy", ids)
    out = _tool("generate.py", "--checkpoint", tmp_path / "ckpt", "--prompt_ids",
                tmp_path / "ids.npy", "--max_new_tokens", 8, "--json", "--n_steps", 4,
                "--amplify", "3=4").stdout
    rows = json.loads(out)
    assert [r["prompt_ids"] for r in rows] == ids.tolist()
    for r in rows:
        assert len(r["tokens"]) == 8 and r["text"] is None
        assert r["chunks"][0]["start"] == 4 and r["chunks"][-1]["end"] == 12
        assert all(e["name"] in (f"k{e['id']}", f"u{e['id']}")
                   for ch in r["chunks"] for e in ch["top_concepts"])
    bad = _tool("generate.py", "--checkpoint", tmp_path / "ckpt", "--prompt", "hello",
                check=False)
    assert bad.returncode != 0 and "no tokenizer found" in bad.stderr
