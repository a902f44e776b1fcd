"""Tiny random Steerling checkpoints and forward helpers shared by the Steerling tests.

make_steerling builds a random InterpretableCausalDiffusionLM (weights scaled so
the top-k concept choices depend on them), save_steerling writes it as a
Steerling checkpoint dir (nested or flat config, optional prefix / shards /
bf16), steerling_forward and ours_forward run the reference and cbm_lm on the
same ids, assert_parity compares the two (1e-4, identical top-k sets), and
steerling_from_export loads an exported dir back into Steerling with
load_state_dict(strict=True). steerling_cases builds each of CASES once per
module (a pytest fixture: import it into the test module).

Imports torch and the steerling package: a test module importing this one is
skipped when either is absent.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("steerling.models.interpretable")

import jax.numpy as jnp  # noqa: E402
import safetensors.numpy  # noqa: E402
from flax import nnx  # noqa: E402
from steerling.configs.causal_diffusion import CausalDiffusionConfig  # noqa: E402
from steerling.configs.concept import ConceptConfig  # noqa: E402
from steerling.models.interpretable import InterpretableCausalDiffusionLM  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 301
B, T = 2, 40          # T is 5 diffusion blocks of 8: the block mask matters
ATOL = 1e-4

BASE_ARCH = dict(n_layers=2, n_head=4, n_embd=64, n_kv_heads=2, block_size=64, diff_block_size=8,
                 norm_order="post", use_qk_norm=True, clip_qkv=None, intermediate_size=96,
                 weight_sharing=True)
BASE_CONCEPT = dict(n_concepts=100, n_unknown_concepts=150, concept_dim=64, topk_known=6,
                    topk_known_features=6, use_unknown=True, factorize_unknown=True,
                    factorize_rank=16, unknown_topk=10, apply_topk_to_unknown=True,
                    use_epsilon_correction=True, block_size=32, pad_multiple=16)

# id -> (arch overrides, concept overrides, save options)
CASES = {
    "post_gqa_qknorm_factorized_nested": ({}, {}, dict(layout="nested")),
    "pre_mha_clip_dense_unknown_flat_prefix": (
        dict(norm_order="pre", n_kv_heads=None, use_qk_norm=False, clip_qkv=1.5,
             intermediate_size=None, mlp_ratio=2),
        dict(factorize_unknown=False, unknown_topk=12),
        dict(layout="flat", prefix="model.", drop_lm_head=True)),
    "features_gt_topk_no_unknown_topk_no_eps_untied": (
        dict(weight_sharing=False, clip_qkv=0.5, n_kv_heads=1),
        dict(topk_known=4, topk_known_features=9, apply_topk_to_unknown=False,
             use_epsilon_correction=False),
        dict(layout="nested", prefix="module.", shards=2)),
    "no_unknown_bf16": ({"norm_order": "pre"}, dict(use_unknown=False),
                        dict(layout="flat", bf16=True)),
    "dense_unknown_no_topk": (
        {}, dict(factorize_unknown=False, apply_topk_to_unknown=False, n_unknown_concepts=90),
        dict(layout="nested")),
}


def make_steerling(arch: dict, concept: dict, seed: int = 0, bf16: bool = False):
    """A random InterpretableCausalDiffusionLM whose concept logits have a spread of ~2.

    Steerling's own init (std 0.02) makes every concept logit ~0; the stds here
    make the top-k choices depend on the weights.
    """
    cfg = CausalDiffusionConfig(**{**BASE_ARCH, **arch})
    ccfg = ConceptConfig(**{**BASE_CONCEPT, **concept})
    torch.manual_seed(seed)
    model = InterpretableCausalDiffusionLM(cfg, ccfg, vocab_size=VOCAB)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".ln_" in name or "ln_f" in name:
                std, mean = 0.2, 1.0
            elif "predictor_down" in name:
                std, mean = 0.15, 0.0
            elif "predictor_up" in name:
                std, mean = 0.6, 0.0
            elif "concept_predictor" in name:
                std, mean = 0.3, 0.0
            elif "c_attn" in name or "c_fc" in name:
                std, mean = 0.2, 0.0
            else:
                std, mean = 0.3, 0.0
            p.copy_(mean + std * torch.randn(p.shape, generator=gen))
            if bf16:
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return model.eval(), cfg, ccfg


def save_steerling(model, cfg, ccfg, path, *, layout="nested", prefix="", drop_lm_head=False,
                   shards=1, bf16=False):
    """Writes a Steerling checkpoint dir: config.json (nested or flat) + safetensors."""
    os.makedirs(path, exist_ok=True)
    arch = cfg.model_dump()
    arch.pop("model_type")
    concept = ccfg.model_dump()
    if layout == "nested":
        raw = {**arch, "interpretable": True, "vocab_size": VOCAB, "concept": concept}
    else:  # HuggingFace SteerlingConfig layout
        flat = {("concept_block_size" if k == "block_size" else k): v for k, v in concept.items()}
        raw = {"model_type": "steerling", "architectures": ["SteerlingForCausalLM"], **arch,
               **flat, "vocab_size": VOCAB, "mask_token_id": VOCAB - 1, "torch_dtype": "float32"}
        raw.pop("interpretable")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    state = {}
    for k, v in model.state_dict().items():
        if drop_lm_head and k == "transformer.lm_head.weight":
            continue
        arr = v.detach().to(torch.float32).numpy().copy()
        if bf16:
            import ml_dtypes
            arr = arr.astype(ml_dtypes.bfloat16)
        state[prefix + k] = arr
    names = sorted(state)
    for i in range(shards):
        part = {k: state[k] for k in names[i::shards]}
        safetensors.numpy.save_file(part, os.path.join(path, f"model-{i:05d}.safetensors"))
    return raw


def sample_ids(seed: int = 0) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(0, VOCAB, size=(B, T)).astype(np.int32)
    ids[:, -11:] = VOCAB - 1       # a masked tail, as in diffusion decoding
    return ids


def steerling_forward(model, ids: np.ndarray) -> dict:
    with torch.no_grad():
        logits, out = model(torch.from_numpy(ids).long())
    eps = out.epsilon if out.epsilon is not None else torch.zeros_like(out.hidden)
    res = dict(logits=logits.numpy(), epsilon=eps.numpy(),
               known_topk_indices=out.known_topk_indices.numpy(),
               known_topk_weights=torch.sigmoid(out.known_topk_logits).numpy())
    if out.unknown_topk_indices is not None:
        res.update(unknown_topk_indices=out.unknown_topk_indices.numpy(),
                   unknown_topk_weights=torch.sigmoid(out.unknown_topk_logits).numpy())
    return res


@nnx.jit
def _jit_forward(model, ids):
    return model(ids)


def ours_forward(model, ids: np.ndarray) -> dict:
    out = _jit_forward(model, jnp.asarray(ids))
    res = dict(logits=np.asarray(out.logits), epsilon=np.asarray(out.epsilon),
               known_topk_indices=np.asarray(out.known.topk_indices),
               known_topk_weights=np.asarray(out.known.topk_weights))
    if out.unknown is not None:
        res.update(unknown_topk_indices=np.asarray(out.unknown.topk_indices),
                   unknown_topk_weights=np.asarray(out.unknown.topk_weights))
    return res


def assert_same_topk(ours_idx, ours_w, ref_idx, ref_w, what: str):
    """Identical top-k sets per position, and the same weight for each concept."""
    assert ours_idx.shape == ref_idx.shape, (what, ours_idx.shape, ref_idx.shape)
    o_order, r_order = np.argsort(ours_idx, -1), np.argsort(ref_idx, -1)
    o_sorted = np.take_along_axis(ours_idx, o_order, -1)
    r_sorted = np.take_along_axis(ref_idx.astype(np.int64), r_order, -1)
    diff = np.argwhere((o_sorted != r_sorted).any(-1))
    assert diff.size == 0, (f"{what}: top-k sets differ at {len(diff)} positions, first "
                            f"{diff[0].tolist()}: ours {sorted(o_sorted[tuple(diff[0])])} vs "
                            f"steerling {sorted(r_sorted[tuple(diff[0])])}")
    np.testing.assert_allclose(np.take_along_axis(ours_w, o_order, -1),
                               np.take_along_axis(ref_w, r_order, -1), atol=ATOL,
                               err_msg=f"{what} weights")


def assert_parity(ours: dict, ref: dict):
    np.testing.assert_allclose(ours["logits"], ref["logits"], atol=ATOL, rtol=0, err_msg="logits")
    np.testing.assert_allclose(ours["epsilon"], ref["epsilon"], atol=ATOL, rtol=0, err_msg="epsilon")
    assert_same_topk(ours["known_topk_indices"], ours["known_topk_weights"],
                     ref["known_topk_indices"], ref["known_topk_weights"], "known top-k")
    assert ("unknown_topk_indices" in ours) == ("unknown_topk_indices" in ref)
    if "unknown_topk_indices" in ref:
        assert_same_topk(ours["unknown_topk_indices"], ours["unknown_topk_weights"],
                         ref["unknown_topk_indices"], ref["unknown_topk_weights"], "unknown top-k")


def steerling_from_export(path: str):
    """Loads an exported dir the way SteerlingGenerator.from_pretrained's direct path does,
    but with load_state_dict(strict=True)."""
    from steerling.inference.checkpoint_utils import load_config, load_state_dict

    raw = load_config(path)
    assert raw["interpretable"] is True
    fields = set(CausalDiffusionConfig.model_fields)
    cfg = CausalDiffusionConfig.model_validate({k: v for k, v in raw.items() if k in fields})
    ccfg = ConceptConfig.model_validate(raw["concept"])
    model = InterpretableCausalDiffusionLM(cfg, ccfg, vocab_size=raw["vocab_size"])
    model.load_state_dict(load_state_dict(path), strict=True)
    model.transformer._restore_weight_tying()
    return model.eval()


@pytest.fixture(scope="module")
def steerling_cases(tmp_path_factory):
    """case id -> (torch model, checkpoint dir, reference outputs), built once."""
    cases = {}
    for i, (name, (arch, concept, opts)) in enumerate(CASES.items()):
        model, cfg, ccfg = make_steerling(arch, concept, seed=i, bf16=opts.get("bf16", False))
        path = str(tmp_path_factory.mktemp(name))
        save_steerling(model, cfg, ccfg, path, **opts)
        cases[name] = (model, path, steerling_forward(model, sample_ids(i)))
    return cases
