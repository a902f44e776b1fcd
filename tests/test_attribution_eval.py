"""launch/attribution_eval.py end to end, and its refusals of bad input.

Fast tests build a checkpoint without training (a random tiny model saved
with its config); the slow ones train a tiny run and run the binary on it as a
user would, and evaluate an imported tiny Steerling checkpoint in process.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

from cbm_lm.default_config import base_config
from cbm_lm.eval.report import TOP_LEVEL, OutputError, prepare_output
from cbm_lm.eval.target import EvalInputError, load_target
from cbm_lm.train.checkpoint import save_params
from cbm_lm.config import ModelConfig
from model_fixtures import make_model, tiny_config
from train_fixtures import ROOT, run, tiny_corpus, train_args

BINARY = str(ROOT / "launch" / "attribution_eval.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory.mktemp("evalcorpus"))


def save_random_checkpoint(path, corpus, **model):
    """A checkpoint of a random model whose config names ``corpus`` (no training)."""
    cfg = base_config()
    fields = dict(vocab_size=400, d_model=32, n_heads=2, n_kv_heads=1, mlp_dim=64,
                  max_seq_len=32, objective="autoregressive", attention="causal")
    concepts = dict(n_known=16, known_topk=4, n_unknown=32, unknown_rank=4, unknown_topk=4,
                    block_size=16)
    concepts.update(model.pop("concepts", {}))
    fields.update(model)
    cfg.model.update(fields)
    cfg.model.concepts.update(concepts)
    cfg.data.dir, cfg.data.seq_len = str(corpus), 32
    save_params(path, cfg, make_model(ModelConfig.from_config(cfg.model)))
    return path


def test_missing_checkpoint_names_the_path(tmp_path, corpus):
    with pytest.raises(EvalInputError, match=f"{tmp_path / 'nope'}: no such directory"):
        load_target(workdir=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalInputError, match=r"empty/config.json: not found; expected a cbm_lm"):
        load_target(checkpoint=str(tmp_path / "empty"), data=str(corpus))


def test_corpus_that_does_not_fit_the_checkpoint_is_refused(tmp_path, corpus):
    few = save_random_checkpoint(tmp_path / "few", corpus, concepts=dict(n_known=4, known_topk=2))
    with pytest.raises(EvalInputError, match=r"manifest.json: 9 concepts, but the checkpoint's "
                                             r"known head has n_known=4"):
        load_target(workdir=str(few))
    small = save_random_checkpoint(tmp_path / "small", corpus, vocab_size=300)
    with pytest.raises(EvalInputError, match=r"tokenizer vocabulary of 400 tokens, but the "
                                             r"checkpoint's model has vocab_size=300"):
        load_target(checkpoint=str(small), data=str(corpus))


def test_unwritable_out_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=f"--out {blocker / 'out'}: cannot write"):
        prepare_output(str(blocker / "out"))
    with pytest.raises(OutputError, match="exists and is not a directory"):
        prepare_output(str(blocker))


@pytest.mark.slow
def test_binary_refuses_a_mismatched_corpus_and_leaves_out_untouched(tmp_path, corpus):
    ckpt = save_random_checkpoint(tmp_path / "ckpt", corpus, concepts=dict(n_known=4, known_topk=2))
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("keep me")
    proc = run([sys.executable, BINARY, "--checkpoint", str(ckpt), "--data", str(corpus),
                "--out", str(out)], check=False)
    assert proc.returncode != 0
    assert f"{corpus}/manifest.json: 9 concepts" in proc.stderr
    assert sorted(os.listdir(out)) == ["earlier.txt"]
    assert [p for p in os.listdir(tmp_path) if p.startswith("out.")] == []


def check_report(out, *, step, curves):
    report = json.loads((out / "report.json").read_text())
    assert tuple(report) == TOP_LEVEL
    assert report["checkpoint_step"] == step
    assert report["decomposition_max_error"] <= 1e-4
    for k in ("perplexity", "logit_share_known", "logit_share_unknown", "logit_share_epsilon"):
        assert math.isfinite(report[k]), k
    for k, v in report.items():
        if v is None:
            assert report["details"]["missing"][k], k      # every null says why
    html = (out / "report.html").read_text()
    assert "id='metric-table'" in html and "http://" not in html and "https://" not in html
    assert (out / "plots" / "training_curves.png").exists() == curves
    return report


@pytest.mark.slow
def test_binary_on_a_trained_checkpoint(tmp_path, corpus):
    workdir = tmp_path / "run"
    run(train_args(corpus, workdir, **{"train.num_steps": 4, "train.eval_every": 4,
                                       "model.objective": "autoregressive",
                                       "model.attention": "causal"}))
    out = tmp_path / "out"
    proc = run([sys.executable, BINARY, "--workdir", str(workdir), "--out", str(out),
                "--num_examples", "8", "--num_prompts", "1", "--steering_concepts", "1",
                "--steering_min_chunks", "10"])
    assert "eta" in proc.stdout and f"report: {out}/report.html" in proc.stdout
    report = check_report(out, step=4, curves=True)
    assert report["details"]["heldout"]["windows"] == 8
    steering = report["details"]["steering"]["per_concept"]
    # a concept labelling >= 10 of the training split's chunks (the detector's data; the
    # manifest's counts add the held-out split): topic:filler0 (13) or topic:filler2 (10)
    counts = train_chunk_counts(corpus)
    assert len(steering) == 1 and counts[steering[0]["name"]] >= 10
    assert steering[0]["detector_train_positives"] == counts[steering[0]["name"]]
    assert math.isfinite(report["steering_perplexity_ratio"])


@pytest.mark.slow
def test_binary_on_an_imported_steerling_checkpoint(tmp_path, corpus):
    torch = pytest.importorskip("torch")
    pytest.importorskip("steerling.models.interpretable")
    from steerling.configs.causal_diffusion import CausalDiffusionConfig
    from steerling.configs.concept import ConceptConfig
    from steerling.models.interpretable import InterpretableCausalDiffusionLM
    from safetensors.torch import save_file

    arch = dict(n_layers=1, n_head=2, n_embd=32, n_kv_heads=1, block_size=64, diff_block_size=8,
                intermediate_size=64)
    concept = dict(n_concepts=16, n_unknown_concepts=16, concept_dim=32, topk_known=4,
                   topk_known_features=4, use_unknown=True, factorize_unknown=True,
                   factorize_rank=16, unknown_topk=4, block_size=16, pad_multiple=16)
    torch.manual_seed(0)
    model = InterpretableCausalDiffusionLM(CausalDiffusionConfig(**arch), ConceptConfig(**concept),
                                           vocab_size=400)
    src = tmp_path / "steerling"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**arch, "interpretable": True,
                                                 "vocab_size": 400, "concept": concept}))
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(src / "model.safetensors"))     # clone: tok_emb and lm_head share storage
    # In process, the library calls the two tools make (their command lines are run by
    # test_binary_on_a_trained_checkpoint and test_explain_tool's import_steerling run).
    from cbm_lm.eval.runner import EvalOptions, run_eval
    from cbm_lm.interop import build_model, read_steerling
    config, params = read_steerling(str(src))
    ckpt = tmp_path / "imported"
    save_params(ckpt, config, build_model(config, params))
    out = tmp_path / "out"
    run_eval(load_target(checkpoint=str(ckpt), data=str(corpus)), str(out),
             EvalOptions(num_examples=6, num_prompts=1, steering_concepts=0))
    report = check_report(out, step=0, curves=False)
    assert "ELBO" in report["details"]["perplexity"]["method"]
    assert report["details"]["missing"]["steering_success"] == \
        "steering: disabled (steering_concepts=0)"


def test_provenance_needs_planted_facts(tmp_path, corpus):
    from cbm_lm.data.corpus import Corpus
    from cbm_lm.eval.provenance_eval import ProvenanceUnavailable, provenance_eval
    with pytest.raises(ProvenanceUnavailable, match=r"has no planted_facts.json"):
        provenance_eval(str(tmp_path), None, base_config(), Corpus(corpus), 0)


def train_chunk_counts(corpus_dir) -> dict[str, int]:
    """{concept name: chunks of the training split that carry it}, read record by record."""
    from collections import Counter

    from cbm_lm.data.corpus import Corpus
    c = Corpus(corpus_dir)
    counts = Counter()
    for doc in c.documents("train"):
        for k in range(doc.num_chunks):
            counts.update({c.concepts.name(int(j)) for j in doc.chunk_concepts[k] if j >= 0})
    return counts


def test_detector_concepts_are_counted_on_its_training_sample(tmp_path, corpus):
    """The manifest says topic:filler0 labels 20 chunks, but 7 of them are held out: with
    20 required, no concept qualifies on the training chunks, so the steering test is
    unavailable (not a crash); a concept absent from a small sample gets no detector and
    is skipped, not fatal."""
    from cbm_lm.data.corpus import Corpus
    from cbm_lm.eval.concept_classifier import chunk_texts, train_classifier, trainable_concepts
    from cbm_lm.eval.report import MetricUnavailable
    from cbm_lm.eval.steering_eval import SteeringUnavailable, steering_eval
    c = Corpus(corpus)
    counts = train_chunk_counts(corpus)
    filler0 = c.concepts.id("topic:filler0")
    assert c.manifest["concepts"]["topic:filler0"]["chunks"] == 20 > counts["topic:filler0"]
    texts, labels = chunk_texts(c, "train", 20000, 0)
    assert len(texts) == sum(1 for d in c.documents("train") for _ in range(d.num_chunks))
    assert trainable_concepts(labels, 20) == []
    assert trainable_concepts(labels, 10) == sorted(
        c.concepts.id(n) for n, k in counts.items() if k >= 10)
    model = make_model(tiny_config())                  # 40 known concepts: all 9 fit
    with pytest.raises(SteeringUnavailable, match=r"labels 20 of the \d+ sampled training chunks"):
        steering_eval(model, c, None, min_train_chunks=20)
    assert issubclass(SteeringUnavailable, MetricUnavailable)
    # a 10-chunk sample: a concept none of its chunks carries gets no detector
    texts, labels = chunk_texts(c, "train", 10, 0)
    absent = [j for j in range(len(c.concepts)) if not any(j in ids for ids in labels)]
    present = [j for j in range(len(c.concepts))
               if 0 < sum(j in ids for ids in labels) < len(labels)]
    assert absent and present
    clf = train_classifier(c, [present[0], absent[0]], max_chunks=10, seed=0)
    assert list(clf.models) == [present[0]] and absent[0] in clf.skipped
    assert "0 of the 10 sampled training chunks" in clf.skipped[absent[0]]
    with pytest.raises(KeyError, match=f"concept {absent[0]}: no detector"):
        clf.probability(["some text"], absent[0])
    assert clf.probability(["some text"], present[0]).shape == (1,)


def test_unmeasurable_deletion_is_null_with_a_reason_and_the_rest_runs(tmp_path, corpus):
    """An 8-token model: no held-out token has the deletion test's 8 tokens of context
    (AR: the token at p+1 >= 9 would be outside the window), so the deletion metrics
    are null with the reason in details.missing, and every other stage still reports."""
    from cbm_lm.eval.runner import EvalOptions, run_eval
    ckpt = save_random_checkpoint(tmp_path / "ckpt", corpus, max_seq_len=8)
    out = tmp_path / "out"
    report = run_eval(load_target(workdir=str(ckpt)), str(out),
                      EvalOptions(num_examples=4, num_prompts=1, steering_concepts=0,
                                  deletion_tokens=2, ig_steps=1, elbo_draws=1))
    assert report["details"]["heldout"]["seq_len"] == 8
    assert json.loads((out / "report.json").read_text()) == report
    for k in ("input_attribution_deletion_auc", "random_deletion_auc"):
        assert report[k] is None
        assert "has 8 tokens of context" in report["details"]["missing"][k], k
    for k in ("perplexity", "logit_share_known", "decomposition_max_error",
              "dead_real_concepts"):
        assert math.isfinite(report[k]), k
    assert not (out / "plots" / "deletion_curves.png").exists()


def test_zero_examples_is_refused_and_out_is_left_alone(tmp_path, corpus):
    from cbm_lm.eval.runner import EvalOptions, run_eval
    ckpt = save_random_checkpoint(tmp_path / "ckpt", corpus)
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("keep me")
    with pytest.raises(EvalInputError, match=r"num_examples=0: expected >= 1"):
        run_eval(load_target(workdir=str(ckpt)), str(out), EvalOptions(num_examples=0))
    assert sorted(os.listdir(out)) == ["earlier.txt"]
    assert [p for p in os.listdir(tmp_path) if p.startswith("out.")] == []
    for n in ("0", "-3"):       # the binary refuses before loading anything
        proc = run([sys.executable, BINARY, "--workdir", str(ckpt), "--out", str(out),
                    "--num_examples", n], check=False)
        assert proc.returncode != 0
        assert f"--num_examples={n}: expected >= 1" in proc.stderr
    assert sorted(os.listdir(out)) == ["earlier.txt"]
