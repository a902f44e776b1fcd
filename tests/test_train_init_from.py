"""Fine-tuning: launch/train.py --init_from CKPT_DIR starts from an imported
Steerling checkpoint's params (issue 12 item 2).

Truth: the Steerling reference model's own weights. With learning rate 0 the
run's step-2 checkpoint must hold exactly the imported params (so its loss is
the imported model's; a fresh model's is far from it), and a config whose
shapes differ is refused naming the leaves and the field.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("steerling.models.interpretable")

import safetensors.numpy  # noqa: E402
from steerling.configs.causal_diffusion import CausalDiffusionConfig  # noqa: E402
from steerling.configs.concept import ConceptConfig  # noqa: E402
from steerling.models.interpretable import InterpretableCausalDiffusionLM  # noqa: E402

from cbm_lm.interop import import_steerling  # noqa: E402
from cbm_lm.train.checkpoint import save_params  # noqa: E402
from train_fixtures import losses, run, tiny_corpus, train_args  # noqa: E402

pytestmark = pytest.mark.slow
VOCAB = 512


def _steerling_dir(path) -> str:
    """A tiny random Steerling checkpoint (weights std 0.3: far from a fresh init)."""
    cfg = CausalDiffusionConfig(n_layers=2, n_head=2, n_embd=32, n_kv_heads=1, block_size=64,
                                diff_block_size=8, intermediate_size=64)
    ccfg = ConceptConfig(n_concepts=16, n_unknown_concepts=32, concept_dim=32, topk_known=4,
                         topk_known_features=4, use_unknown=True, factorize_unknown=True,
                         factorize_rank=16, unknown_topk=4, block_size=16, pad_multiple=16)
    torch.manual_seed(0)
    model = InterpretableCausalDiffusionLM(cfg, ccfg, vocab_size=VOCAB).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not (name.endswith("norm.weight") or ".ln_" in name or "ln_f" in name):
                p.copy_(0.3 * torch.randn(p.shape))
    os.makedirs(path, exist_ok=True)
    arch = cfg.model_dump()
    arch.pop("model_type")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**arch, "interpretable": True, "vocab_size": VOCAB,
                   "concept": ccfg.model_dump()}, f)
    weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    safetensors.numpy.save_file(weights, os.path.join(path, "model-00000.safetensors"))
    return path


def _model_overrides(ckpt_dir) -> dict:
    """--config.model.* values of the imported checkpoint's config.json."""
    saved = json.loads((ckpt_dir / "config.json").read_text())["model"]
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif v is not None:
                out[f"model.{prefix}{k}"] = v
    walk(saved, "")
    return out


def _flat_params(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat_params(v, f"{prefix}{k}/"))
        return out
    return {prefix: np.asarray(tree)}


def test_fine_tune_starts_from_the_imported_steerling_params(tmp_path):
    corpus = tiny_corpus(tmp_path / "corpus")
    model, config = import_steerling(_steerling_dir(str(tmp_path / "steerling")))
    imported = tmp_path / "imported"
    save_params(imported, config, model)
    from flax import nnx
    want = _flat_params(nnx.state(model, nnx.Param).to_pure_dict())

    model_cfg = _model_overrides(imported)
    model_cfg.pop("model.mask_token_id", None)     # resolved from the corpus tokenizer
    common = {**model_cfg, "optimizer.learning_rate": 0.0, "train.num_steps": 2,
              "checkpoint.every_steps": 2}
    tuned = tmp_path / "tuned"
    out = run(train_args(corpus, tuned, **common) + [f"--init_from={imported}"])
    assert f"initialized the params from {imported}" in out.stdout, out.stdout[-2000:]
    fresh = tmp_path / "fresh"
    run(train_args(corpus, fresh, **common))

    # lr = 0: the run's checkpoint holds exactly the Steerling weights.
    from cbm_lm.train.checkpoint import load_model
    got = _flat_params(nnx.state(load_model(tuned)[0], nnx.Param).to_pure_dict())
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # ... so its loss is that model's, far from a fresh model's on the same batches.
    tuned_loss, fresh_loss = losses(tuned), losses(fresh)
    assert abs(tuned_loss[1] - fresh_loss[1]) > 1.0, (tuned_loss, fresh_loss)

    # A config whose shapes differ is refused, naming a leaf and the field.
    bad = run(train_args(corpus, tmp_path / "bad", **{**common, "model.mlp_dim": 96})
              + [f"--init_from={imported}"], check=False)
    assert bad.returncode != 0
    assert "--config.model.mlp_dim=96 (checkpoint: 64)" in bad.stderr, bad.stderr[-3000:]
    # mlp.gate is stacked over the layers: [L, D, F]
    assert re.search(r"mlp\.gate: shape \((\d+), 32, 64\) saved vs \(\1, 32, 96\) wanted",
                     bad.stderr), bad.stderr[-3000:]
