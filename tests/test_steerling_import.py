"""Importing Steerling checkpoints: the CLI tools, the config mapping, and bad inputs.

tools/import_steerling.py -> dump_forward.py -> export_steerling.py end to end,
broken checkpoints and bad ids failing with clear messages, the Steerling config
defaults and the 8B parameter count matching Steerling's own, the mask id a
config without one imports, and warnings for Steerling behaviours cbm_lm lacks.
Forward and export parity are in test_steerling_parity.py; the shared
checkpoints and helpers in steerling_fixtures.py.
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

import safetensors.numpy  # noqa: E402
from steerling.configs.causal_diffusion import CausalDiffusionConfig  # noqa: E402
from steerling.configs.concept import ConceptConfig  # noqa: E402
from steerling.models.interpretable import InterpretableCausalDiffusionLM  # noqa: E402

from cbm_lm.config import ModelConfig  # noqa: E402
from cbm_lm.interop import SteerlingFormatError  # noqa: E402
from cbm_lm.interop.steerling import read_steerling  # noqa: E402
from cbm_lm.interop.steerling_config import CONCEPT_DEFAULTS, MODEL_DEFAULTS  # noqa: E402
from steerling_fixtures import (CASES, REPO, VOCAB, assert_parity, sample_ids,  # noqa: E402
                                steerling_forward, steerling_from_export)
from steerling_fixtures import steerling_cases  # noqa: E402, F401  (fixture)


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
    """The id checks tools/dump_forward.py runs (the library's load_prompt_ids with [B,T]),
    in process (no checkpoint needed)."""
    from cbm_lm.inference.prompts import load_prompt_ids

    def load_ids(path, vocab):
        return load_prompt_ids(path, vocab_size=vocab, ndims=(2,))

    cases = {"rank.npy": (sample_ids(0)[0], "shape [B,T], got [40] (a single sequence"),
             "float.npy": (sample_ids(0).astype(np.float32), "must be integers"),
             "neg.npy": (sample_ids(0) - 1, "outside the vocabulary [0, 301)")}
    for fname, (arr, msg) in cases.items():
        np.save(tmp_path / fname, arr)
        with pytest.raises(ValueError, match=re.escape(msg)):
            load_ids(str(tmp_path / fname), VOCAB)
    with pytest.raises(FileNotFoundError, match="no such file"):
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
