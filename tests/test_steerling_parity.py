"""Parity with the Steerling PyTorch reference (the independent oracle).

Random tiny InterpretableCausalDiffusionLMs are saved as Steerling checkpoint
directories, imported through cbm_lm.interop, and run on the same ids:
logits and epsilon must agree to 1e-4 in float32 and the known / unknown
top-k concept sets must be identical per position. Exports must load back
into Steerling with load_state_dict(strict=True) and reproduce the logits.
The import CLI, config mapping and bad-input checks are in
test_steerling_import.py; the shared checkpoints and helpers in
steerling_fixtures.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("steerling.models.interpretable")

import jax  # noqa: E402
import ml_collections  # noqa: E402
from flax import nnx  # noqa: E402

from cbm_lm.config import ModelConfig  # noqa: E402
from cbm_lm.interop import export_steerling, import_steerling  # noqa: E402
from cbm_lm.interop.steerling import build_model, read_steerling  # noqa: E402
from cbm_lm.model import ConceptBottleneckLM  # noqa: E402
from steerling_fixtures import (B, BASE_CONCEPT, CASES, T, VOCAB, assert_parity,  # noqa: E402
                                ours_forward, sample_ids, steerling_forward,
                                steerling_from_export)
from steerling_fixtures import steerling_cases  # noqa: E402, F401  (fixture)


@pytest.mark.parity
@pytest.mark.parametrize("name", list(CASES))
def test_import_matches_steerling_forward(steerling_cases, name):
    _, path, ref = steerling_cases[name]
    model, _ = import_steerling(path)
    ours = ours_forward(model, sample_ids(list(CASES).index(name)))
    assert_parity(ours, ref)
    # Top-k sets are non-trivial: positions do not all pick the same concepts.
    assert len({tuple(sorted(r)) for r in ref["known_topk_indices"].reshape(B * T, -1)}) > B * T // 2


@pytest.mark.parity
@pytest.mark.parametrize("name", ["post_gqa_qknorm_factorized_nested",
                                  "pre_mha_clip_dense_unknown_flat_prefix"])
def test_streaming_topk_matches_steerling(steerling_cases, name):
    """Our blockwise top-k (forced by a tiny dense_threshold) picks Steerling's sets."""
    _, path, ref = steerling_cases[name]
    config, params = read_steerling(path)
    config.model.concepts.dense_threshold = 16
    config.model.concepts.block_size = 24     # blocks do not divide the concept counts
    ours = ours_forward(build_model(config, params), sample_ids(list(CASES).index(name)))
    assert_parity(ours, ref)


@pytest.mark.parity
@pytest.mark.parametrize("name", list(CASES))
def test_export_loads_in_steerling_strict(steerling_cases, tmp_path, name):
    _, path, ref = steerling_cases[name]
    model, _ = import_steerling(path)
    export_steerling(model, tmp_path / "export")
    reloaded = steerling_from_export(str(tmp_path / "export"))
    assert_parity(steerling_forward(reloaded, sample_ids(list(CASES).index(name))), ref)


@pytest.mark.parity
def test_export_flat_and_bf16_reimport(steerling_cases, tmp_path):
    """The flat (HuggingFace) layout re-imports to the same params; bf16 rounds them."""
    _, path, _ = steerling_cases["post_gqa_qknorm_factorized_nested"]
    config, params = read_steerling(path)
    model = build_model(config, params)
    export_steerling(model, tmp_path / "flat", layout="flat")
    raw = json.loads((tmp_path / "flat" / "config.json").read_text())
    assert "concept" not in raw and raw["concept_block_size"] == BASE_CONCEPT["block_size"]
    config2, params2 = read_steerling(tmp_path / "flat")
    assert config2.model.mask_token_id == VOCAB - 1     # the flat layout states it
    config2.model.mask_token_id = None
    assert config2.model.to_dict() == config.model.to_dict()
    export_steerling(model, tmp_path / "bf16", dtype="bfloat16")
    _, params3 = read_steerling(tmp_path / "bf16")
    import ml_dtypes
    for a, b, c in zip(jax.tree.leaves(params), jax.tree.leaves(params2), jax.tree.leaves(params3)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a.astype(ml_dtypes.bfloat16).astype(np.float32), c)


@pytest.mark.parity
def test_export_native_causal_model_matches_steerling(tmp_path):
    """A model built in cbm_lm (causal attention, report top-k < feature top-k) exports
    to a Steerling model with the same forward (causal = diffusion blocks of 1 token)."""
    cfg = ModelConfig.from_config(dict(
        vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=80,
        norm_order="pre", qk_norm=True, qkv_clip=2.0, attention="causal", objective="autoregressive",
        max_seq_len=64, concepts=dict(
            n_known=50, known_topk=7, known_report_topk=3, n_unknown=40, unknown_rank=16,
            unknown_topk=5, pad_multiple=16, block_size=16, dense_threshold=50000)))
    # Random params of a non-trivial scale (norm scales around 1), without an eager init.
    abstract = nnx.eval_shape(lambda: ConceptBottleneckLM(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(3)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: ((1.0 if path[-1].key == "scale" else 0.0)
                         + (0.2 if path[-1].key == "scale" else 0.3) * rng.standard_normal(x.shape)
                         ).astype(np.float32),
        nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    model = build_model(ml_collections.ConfigDict({"model": cfg.to_dict()}), params)
    export_steerling(model, tmp_path)
    ref_model = steerling_from_export(str(tmp_path))
    assert ref_model.config.diff_block_size == 1
    ids = sample_ids(7)
    assert_parity(ours_forward(model, ids), steerling_forward(ref_model, ids))
