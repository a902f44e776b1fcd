"""Config validation names the offending field; plan counts match Steerling."""

import pathlib

import pytest

from cbm_lm.config import ConfigError, MeshConfig, ModelConfig
from cbm_lm.default_config import load_config_file
from cbm_lm.parallel.mesh import resolve_axis_sizes
from cbm_lm.train.planning import count_params

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name):
    return load_config_file(ROOT / "gin_configs" / f"{name}.py")


def test_steerling_8b_param_count_matches_steerling():
    # The count Steerling's own code gives for the released model (concept
    # tables padded to a multiple of 16).
    assert count_params(ModelConfig.from_config(load_config("steerling_8b").model)) == 8391778304


def test_steerling_8b_param_count_by_hand():
    cfg = ModelConfig.from_config(load_config("steerling_8b").model)
    d, f, v, hd = 4096, 16384, 100281, 128
    per_layer = d * (32 * hd) + 2 * d * (4 * hd) + 32 * hd * d + 3 * d * f + 2 * d + 2 * hd
    known = 2 * 33744 * d
    unknown = 2 * 101200 * 256 + 2 * 256 * d
    assert count_params(cfg) == v * d + 32 * per_layer + d + known + unknown


@pytest.mark.parametrize("name", ["tiny", "tiny_diffusion", "small", "1b", "steerling_8b"])
def test_every_scale_config_validates(name):
    cfg = ModelConfig.from_config(load_config(name).model)
    assert cfg.concepts.n_known_padded % cfg.concepts.pad_multiple == 0


@pytest.mark.parametrize("field,value,needle", [
    ("n_kv_heads", 3, "model.n_kv_heads"),
    ("attention", "sliding", "model.attention"),
    ("objective", "mlm", "model.objective"),
    ("norm_order", "sandwich", "model.norm_order"),
])
def test_bad_model_fields_are_named(field, value, needle):
    cfg = load_config("tiny")
    cfg.model[field] = value
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_config(cfg.model)


def test_bad_concept_field_and_unknown_field_are_named():
    cfg = load_config("tiny")
    cfg.model.concepts.known_topk = 10**6
    with pytest.raises(ConfigError, match="model.concepts.known_topk"):
        ModelConfig.from_config(cfg.model)
    with pytest.raises(ConfigError, match="unknown field.*'d_modle'"):
        ModelConfig.from_config({**load_config("tiny").model.to_dict(), "d_modle": 3})


def test_mesh_axis_fill():
    assert resolve_axis_sizes((-1, 2, 2), 8, "mesh") == (2, 2, 2)
    with pytest.raises(ConfigError, match="at most one axis"):
        resolve_axis_sizes((-1, -1, 1), 8, "mesh")
    with pytest.raises(ConfigError, match="use 6 devices"):
        resolve_axis_sizes((3, 2, 1), 8, "mesh")
    assert MeshConfig.from_config({"data": 2}).data == 2
