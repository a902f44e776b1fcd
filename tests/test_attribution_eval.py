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
from model_fixtures import make_model
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
                "--num_examples", "8", "--num_prompts", "1", "--steering_concepts", "1"])
    assert "eta" in proc.stdout and f"report: {out}/report.html" in proc.stdout
    report = check_report(out, step=4, curves=True)
    assert report["details"]["heldout"]["windows"] == 8
    steering = report["details"]["steering"]["per_concept"]
    assert [p["name"] for p in steering] == ["topic:filler0"]   # the one with 20 labelled chunks
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
