"""Parity with the Steerling PyTorch reference (the independent oracle).

Random tiny InterpretableCausalDiffusionLMs are saved as Steerling checkpoint
directories, imported through cbm_lm.interop, and run on the same ids:
logits and epsilon must agree to 1e-4 in float32 and the known / unknown
top-k concept sets must be identical per position. Exports must load back
into Steerling with load_state_dict(strict=True) and reproduce the logits.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("steerling.models.interpretable")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import safetensors.numpy  # noqa: E402
from flax import nnx  # noqa: E402
from steerling.configs.causal_diffusion import CausalDiffusionConfig  # noqa: E402
from steerling.configs.concept import ConceptConfig  # noqa: E402
from steerling.models.interpretable import InterpretableCausalDiffusionLM  # noqa: E402

from cbm_lm.config import ModelConfig  # noqa: E402
from cbm_lm.interop import SteerlingFormatError, export_steerling, import_steerling  # noqa: E402
from cbm_lm.interop.steerling import build_model, read_steerling  # noqa: E402
from cbm_lm.interop.steerling_config import CONCEPT_DEFAULTS, MODEL_DEFAULTS  # noqa: E402
from cbm_lm.model import ConceptBottleneckLM  # noqa: E402

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


@pytest.mark.parity
def test_config_defaults_mirror_steerling():
    assert CONCEPT_DEFAULTS == ConceptConfig().model_dump()
    model_defaults = CausalDiffusionConfig().model_dump()
    model_defaults.pop("model_type")
    assert MODEL_DEFAULTS == model_defaults


@pytest.mark.parity
def test_bad_checkpoints_fail_clearly(steerling_cases, tmp_path):
    _, path, _ = steerling_cases["post_gqa_qknorm_factorized_nested"]
    raw = json.loads(open(os.path.join(path, "config.json")).read())
    state = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            state.update(safetensors.numpy.load_file(os.path.join(path, f)))

    def write(name, raw_cfg, tensors):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(raw_cfg))
        safetensors.numpy.save_file(tensors, str(d / "model.safetensors"))
        return d

    missing = dict(state)
    missing.pop("transformer.blocks.1.mlp.c_fc.weight")
    with pytest.raises(SteerlingFormatError, match=r"transformer\.blocks\.1\.mlp\.c_fc\.weight.*\[192, 64\]"):
        read_steerling(write("missing", raw, missing))
    bad_shape = {**state, "known_head.concept_predictor.weight": np.zeros((100, 64), np.float32)}
    with pytest.raises(SteerlingFormatError, match=r"known_head\.concept_predictor\.weight.*\[112, 64\]"):
        read_steerling(write("shape", raw, bad_shape))
    extra = {**state, "transformer.blocks.2.ln_1.weight": np.ones(64, np.float32)}
    with pytest.raises(SteerlingFormatError, match=r"unexpected.*blocks\.2\.ln_1"):
        read_steerling(write("extra", raw, extra))
    with pytest.raises(SteerlingFormatError, match="'use_bias'"):
        read_steerling(write("bias", {**raw, "use_bias": True}, state))
    with pytest.raises(SteerlingFormatError, match="'use_attention_known'"):
        read_steerling(write("attn", {**raw, "concept": {**raw["concept"], "use_attention_known": True}},
                             state))
    with pytest.raises(SteerlingFormatError, match="no \\*.safetensors"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text(json.dumps(raw))
        read_steerling(tmp_path / "empty")


def _run_tool(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parity
def test_cli_import_dump_export(steerling_cases, tmp_path):
    """tools/import_steerling.py -> tools/dump_forward.py -> tools/export_steerling.py."""
    name = "pre_mha_clip_dense_unknown_flat_prefix"
    _, path, ref = steerling_cases[name]
    ckpt, ids_path, out = tmp_path / "ckpt", tmp_path / "ids.npy", tmp_path / "fwd.npz"
    np.save(ids_path, sample_ids(list(CASES).index(name)))
    r = _run_tool("tools/import_steerling.py", f"--src={path}", f"--out={ckpt}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "done" in r.stdout
    r = _run_tool("tools/dump_forward.py", f"--checkpoint={ckpt}", f"--input_ids={ids_path}",
                  f"--out={out}")
    assert r.returncode == 0, r.stdout + r.stderr
    dump = dict(np.load(out))
    assert sorted(dump) == sorted(["logits", "epsilon", "known_topk_indices", "known_topk_weights",
                                   "unknown_topk_indices", "unknown_topk_weights"])
    assert_parity(dump, ref)
    r = _run_tool("tools/export_steerling.py", f"--checkpoint={ckpt}", f"--out={tmp_path / 'exp'}")
    assert r.returncode == 0, r.stdout + r.stderr
    reloaded = steerling_from_export(str(tmp_path / "exp"))
    assert_parity(steerling_forward(reloaded, sample_ids(list(CASES).index(name))), ref)
    # A bad input fails with a clear message and writes nothing.
    bad = sample_ids(0)
    bad[1, 3] = VOCAB
    np.save(tmp_path / "bad.npy", bad)
    r = _run_tool("tools/dump_forward.py", f"--checkpoint={ckpt}", f"--input_ids={tmp_path / 'bad.npy'}",
                  f"--out={tmp_path / 'x.npz'}")
    assert r.returncode != 0 and "id 301 at [b,t]=[1, 3] is outside the vocabulary" in r.stderr, r.stderr
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parity
def test_dump_forward_rejects_bad_ids(tmp_path):
    """tools/dump_forward.py's id checks, in process (no checkpoint needed)."""
    import importlib.util

    name = "cbm_lm_tools_dump_forward"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", "dump_forward.py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    load_ids = sys.modules[name].load_ids
    cases = {"rank.npy": (sample_ids(0)[0], "shape [B,T], got [40] (a single sequence"),
             "float.npy": (sample_ids(0).astype(np.float32), "must be integers"),
             "neg.npy": (sample_ids(0) - 1, "outside the vocabulary [0, 301)")}
    for fname, (arr, msg) in cases.items():
        np.save(tmp_path / fname, arr)
        with pytest.raises(SystemExit, match=re.escape(msg)):
            load_ids(str(tmp_path / fname), VOCAB)
    with pytest.raises(SystemExit, match="no such file"):
        load_ids(str(tmp_path / "missing.npy"), VOCAB)
    np.save(tmp_path / "ok.npy", sample_ids(0).astype(np.int64))
    ok = load_ids(str(tmp_path / "ok.npy"), VOCAB)
    assert ok.dtype == np.int32
    np.testing.assert_array_equal(ok, sample_ids(0))


@pytest.mark.parity
def test_steerling_8b_param_count_matches_steerlings_module():
    """Our planner's count for gin_configs/steerling_8b.py equals the parameter count of
    Steerling's own module built from that config (on torch's meta device: no memory)."""
    import pathlib

    from cbm_lm.default_config import load_config_file
    from cbm_lm.interop.steerling_config import model_to_steerling_config
    from cbm_lm.train.planning import count_params

    root = pathlib.Path(__file__).resolve().parents[1]
    cfg = ModelConfig.from_config(load_config_file(root / "gin_configs" / "steerling_8b.py").model)
    raw = model_to_steerling_config(cfg)
    fields = set(CausalDiffusionConfig.model_fields)
    scfg = CausalDiffusionConfig.model_validate({k: v for k, v in raw.items() if k in fields})
    with torch.device("meta"):
        ref = InterpretableCausalDiffusionLM(scfg, ConceptConfig.model_validate(raw["concept"]),
                                             vocab_size=raw["vocab_size"])
    want = sum(p.numel() for p in ref.parameters())     # tied lm_head counted once
    assert want > 8e9
    assert count_params(cfg) == want


def test_import_without_a_mask_id_takes_steerlings_tokenizer_layout():
    """Steerling's tokenizer puts <|mask|> at 100277 + 3 = 100280 (cl100k_base, then pad,
    bos, endofchunk, mask); the instruct vocabulary (100284) adds 3 chat tokens after it,
    so its last id is <|eot_id|>. A config.json without mask_token_id imports that layout;
    a vocabulary too small for it keeps the last id."""
    import pathlib

    from cbm_lm.default_config import load_config_file
    from cbm_lm.interop.steerling_config import model_to_steerling_config, steerling_to_model_dict

    root = pathlib.Path(__file__).resolve().parents[1]
    cfg = ModelConfig.from_config(load_config_file(root / "gin_configs" / "steerling_8b.py").model)
    raw = model_to_steerling_config(cfg)
    raw.pop("mask_token_id")
    for vocab in (100281, 100284):
        assert steerling_to_model_dict(dict(raw, vocab_size=vocab))["mask_token_id"] == 100280
    assert steerling_to_model_dict(dict(raw, vocab_size=512))["mask_token_id"] is None


@pytest.mark.parametrize("field,where", [("topk_on_logits", "concept"),
                                         ("rope_full_precision", "arch")])
def test_import_warns_of_steerling_behaviours_cbm_lm_does_not_have(field, where):
    import pathlib

    from cbm_lm.default_config import load_config_file
    from cbm_lm.interop.steerling_config import model_to_steerling_config, steerling_to_model_dict

    root = pathlib.Path(__file__).resolve().parents[1]
    raw = model_to_steerling_config(ModelConfig.from_config(
        load_config_file(root / "gin_configs" / "steerling_8b.py").model))
    if where == "concept":
        raw["concept"] = dict(raw["concept"], **{field: True})
    else:
        raw[field] = False
    with pytest.warns(UserWarning, match=field):
        steerling_to_model_dict(raw)
